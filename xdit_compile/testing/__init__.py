"""Helpers for tests that need several real ranks (see :mod:`xdit_compile.testing.harness`)."""

from xdit_compile.testing.harness import SpmdError, rank, run_spmd, world_size

__all__ = ["SpmdError", "rank", "run_spmd", "world_size"]
