"""Step caching (First-Block Cache, TeaCache-style) for any DiT, with every rank deciding alike.

    options={"use_fbcache": True, "cache_threshold": 0.1}     # see docs/step_cache.md

``cut.py`` finds the blocks and marks the three parts before lowering; ``split.py`` cuts the lowered
per-rank graph into three programs; ``runtime.py`` (``StepCache``) runs them per call and decides,
with one all-reduce of two sums, whether the blocks after the first run; ``build.py`` is what the
backend calls; ``options.py`` validates the options (``plan.py`` imports it, so this package
imports nothing else eagerly).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Decision", "Generation", "StepCache", "StepCacheReport", "reset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
