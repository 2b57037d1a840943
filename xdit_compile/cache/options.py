"""Validation of the step-cache options of ``ParallelPlan`` (xDiT's flag names).

    use_fbcache           First-Block Cache: decide from the first block's residual
    use_teacache          TeaCache-style: decide from the first block's timestep-modulated input
    cache_threshold       0 (default) never skips; larger skips more steps
    cache_first_steps     the first steps of every generation always computed (default 1)
    cache_last_steps      the last steps always computed (needs cache_num_steps)
    cache_num_steps       steps per generation (to know which are the last ones)
    teacache_coefficients rescaling polynomial of TeaCache's relative L1 (highest power first)

Kept apart from ``plan.py`` (which calls ``check_cache_options`` from ``__post_init__``) so the
cache package owns its option rules; nothing here imports the plan.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import PlanError


def _int(name: str, value: Any, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise PlanError(f"option {name}={value!r} ({type(value).__name__}) is not accepted: use an int >= {low}"
                        + (" or None" if optional else ""))


def check_cache_options(plan: Any) -> None:
    """Raise ``PlanError`` naming the option unless the step-cache options of ``plan`` are consistent."""
    for name in ("use_fbcache", "use_teacache"):
        v = getattr(plan, name)
        if not isinstance(v, bool):
            raise PlanError(f"option {name}={v!r} ({type(v).__name__}) is not accepted: use True or False")
    if plan.use_fbcache and plan.use_teacache:
        raise PlanError("options use_fbcache=True and use_teacache=True exclude each other: pick one "
                        "(use_fbcache decides from the first block's output, use_teacache from its modulated input)")
    t = plan.cache_threshold
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
        raise PlanError(f"option cache_threshold={t!r} ({type(t).__name__}) is not accepted: use a number >= 0 "
                        "(0 never skips a step; e.g. 0.1 for use_fbcache, 0.3 for use_teacache)")
    _int("cache_first_steps", plan.cache_first_steps, 1)
    _int("cache_last_steps", plan.cache_last_steps, 0)
    _int("cache_num_steps", plan.cache_num_steps, 1, optional=True)
    if plan.cache_last_steps and plan.cache_num_steps is None:
        raise PlanError(f"option cache_last_steps={plan.cache_last_steps} needs cache_num_steps (the steps of one "
                        "generation, e.g. num_inference_steps) to know which steps are the last ones")
    c = plan.teacache_coefficients
    if c is not None:
        if not isinstance(c, tuple) or not c or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in c):
            raise PlanError(f"option teacache_coefficients={c!r} is not accepted: use a non-empty list of numbers "
                            "(the rescaling polynomial, highest power first, as numpy.poly1d takes it), or None")
        if not plan.use_teacache:
            raise PlanError("option teacache_coefficients is given without use_teacache=True: it rescales "
                            "TeaCache's statistic only")
    if not (plan.use_fbcache or plan.use_teacache) and (t or plan.cache_last_steps or plan.cache_num_steps):
        raise PlanError("cache options (cache_threshold, cache_last_steps, cache_num_steps) are given without "
                        "use_fbcache=True or use_teacache=True: set one of them to cache steps")
    if (plan.use_fbcache or plan.use_teacache) and (plan.pp or 1) > 1:
        which = "use_fbcache" if plan.use_fbcache else "use_teacache"
        raise PlanError(f"{which} does not work with pipefusion_parallel_degree={plan.pp}: PipeFusion's stages each "
                        "hold some blocks, so no rank can skip the rest. Step caching works with ulysses_degree, "
                        "ring_degree, use_cfg_parallel and data_parallel_degree (and their combinations); drop "
                        f"{which} or pipefusion_parallel_degree")
