"""Attention lowering strategies and their registry (see ``registry.py`` and ``base.py``).

One file per strategy: ``ulysses``, ``usp``, ``ring``, ``local`` (chosen by the attention
rule), and PipeFusion's ``fill_kv`` / ``stale_kv`` (chosen by PipeFusion). The local kernel every
strategy's runtime op calls is chosen in ``runtime/kernels.py``.
"""

from __future__ import annotations

from .base import AttentionCall, AttentionRecord, Cost, Site, Strategy, record_of
from .registry import STRATEGIES, choose, get, planning_cost, register, registered, unregister

__all__ = ["AttentionCall", "AttentionRecord", "Cost", "STRATEGIES", "Site", "Strategy", "choose", "get",
           "planning_cost", "record_of", "register", "registered", "unregister"]
