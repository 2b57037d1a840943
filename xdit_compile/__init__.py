"""xdit_compile: run any Diffusion Transformer in parallel with one line.

    model = torch.compile(model, backend="xdit", options={"ulysses_degree": 2})

The backend traces the model with Dynamo, finds attention, norms and patch embeddings in the
graph, propagates sequence/batch sharding through it and rewrites it into per-rank programs
that call torch.distributed collectives (Ulysses, Ring, USP, CFG and data parallel).
"""

from __future__ import annotations

from .annotate import replicate, shard
from .backend import xdit_backend
from . import tensor_parallel as _tensor_parallel  # noqa: F401  (registers the tp mesh dim and axis)
from .errors import (CollectiveError, CollectiveTimeoutError, GradientError, PassError, PlanError,
                     RankMismatchError, ShardingError, XditError, unwrap, unwrap_errors)
from .passes.attention_kernels import KernelCall, register_attention_kernel
from .placements import Partial, Replicate, Shard
from .plan import ParallelPlan, check_plan
from .report import PlanReport, clear_reports, reports

__all__ = [
    "CollectiveTimeoutError", "RankMismatchError", "check_plan", "unwrap", "unwrap_errors",
    "KernelCall", "register_attention_kernel",
    "CollectiveError", "GradientError", "ParallelPlan", "Partial", "PassError", "PlanError", "PlanReport", "Replicate",
    "Shard", "ShardingError", "XditError", "clear_reports", "replicate", "reports", "shard", "xdit_backend",
]
__version__ = "0.1.0"
