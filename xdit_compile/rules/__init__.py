"""Sharding rules, one module per op family; ``rules.table.RULES`` merges them by op name."""
