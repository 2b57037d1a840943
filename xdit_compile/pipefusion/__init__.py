"""PipeFusion: patch-level pipeline stages with stale K/V (work in progress)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch.fx as fx

from ..errors import PlanError
from ..plan import ParallelPlan
from ..report import PlanReport


def pipefusion_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], plan: ParallelPlan,
                       report: PlanReport, inner: Callable[..., Callable]) -> Callable:
    """Compile ``gm`` for this rank's pipeline stage (not implemented yet)."""
    raise PlanError("pipefusion_parallel_degree > 1 is not implemented yet; use ulysses/ring/cfg degrees")
