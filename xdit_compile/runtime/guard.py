"""What wraps the backend: ranks agree before compiling; per call, same inputs and named timeouts.

``checked`` wraps the backend (``backend.py``): ``agreement.agree`` before it compiles a
graph, and ``Guarded`` around the program it returns. Nothing here runs inside a graph.

``Guarded`` runs one all-gather of two float64 sums per user input (the total, and the sum
weighted by position along dim 0, so that swapped CFG halves differ) before the compiled
program: ranks called with different inputs raise ``RankMismatchError`` naming the inputs and
ranks. ``check_inputs=False`` skips it. A raw backend timeout inside the program becomes a
``CollectiveTimeoutError`` (``timeouts.name_timeout``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.fx as fx

from .. import plan as plan_mod
from ..errors import CollectiveTimeoutError, RankMismatchError, XditError
from ..plan import ParallelPlan
from ..report import reports
from ..specialize import symbolic_inputs
from .agreement import MAX_LISTED, agree, list_ranks, plan_or_tell, same, user_inputs
from .timeouts import TIMEOUT_TEXT, name_timeout


# ---------------------------------------------------------------------- the backend wrapper
def checked(backend: Callable[..., Callable]) -> Callable[..., Callable]:
    """Wrap the backend: agreement before it compiles, ``Guarded`` around what it returns.

    A graph with symbolic sizes is handed on unchecked: the backend compiles it once per
    concrete shape by calling itself again, and that call is checked (a rank whose options
    make no plan still tells the others, which would otherwise wait for it there).
    """

    @functools.wraps(backend)
    def run(gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict | None = None, **kw: Any) -> Callable:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return backend(gm, example_inputs, options, **kw)
        if symbolic_inputs(gm):
            plan_or_tell(gm, example_inputs, options)
            return backend(gm, example_inputs, options, **kw)
        graph = f"graph {len(reports())}"
        inputs = user_inputs(gm, example_inputs)
        plan = agree(gm, example_inputs, options)
        fn = backend(gm, example_inputs, options, **kw)
        return Guarded(fn, plan, inputs, graph)

    return run


class Guarded:
    """The compiled per-rank program, behind the per-call input check and timeout naming."""

    def __init__(self, fn: Callable[..., Any], plan: ParallelPlan, inputs: list[tuple[int, str]], graph: str):
        self.fn, self.plan, self.inputs, self.graph = fn, plan, inputs, graph
        self.calls = 0
        self.mix: torch.Tensor | None = None  # [2 per input, rows of all inputs]: row sums -> the checksums
        self.check = plan.check_inputs and bool(inputs)
        self.group = plan_mod.world_group(plan) if self.check else None  # every rank creates it now, in order
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        backend = dist.get_backend(self.group) if self.group is not None else "gloo"
        self.host = str(backend) == "gloo"

    def __getattr__(self, name: str) -> Any:
        # What callers read off the compiled program (a PipeFusion driver's timings, ...).
        # Private names and dunders stay unanswered: Dynamo probes e.g. __wrapped__ (and would
        # unwrap the guard) or _boxed_call (and would change the calling convention).
        if name == "fn" or name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        try:
            if self.check:
                self.check_inputs(args)
            return self.fn(*args)
        except XditError:
            raise
        except RuntimeError as e:
            named = name_timeout(e, self.plan, self.graph, self.rank)
            if named is None:
                raise
            raise named from e

    def check_inputs(self, args: Sequence[Any]) -> None:
        """Raise ``RankMismatchError`` unless every rank got the same user inputs (one all-gather)."""
        per_input = [row_sums(args[i]) for i, _ in self.inputs]
        rows = torch.cat([r.to(per_input[0].device) for r in per_input])  # inputs may sit on several devices
        if self.mix is None or self.mix.shape[1] != rows.numel() or self.mix.device != rows.device:
            self.mix = _mixer([r.numel() for r in per_input], rows.device)
        local = self.mix @ rows
        if self.host:
            local = local.cpu()
        gathered = torch.empty(self.world * local.numel(), dtype=local.dtype, device=local.device)
        try:
            dist.all_gather_single(gathered, local, group=self.group)  # all_gather_into_tensor is deprecated in 2.13
        except RuntimeError as e:
            if not TIMEOUT_TEXT.search(str(e)):
                raise
            waited = f"{self.plan.timeout:g} s" if self.plan.timeout is not None else "the default group's timeout"
            raise CollectiveTimeoutError(
                f"xdit: rank {self.rank} timed out after {waited} in the per-call input check (an all_gather over "
                f"every rank, {list(range(self.world))}) before call {self.calls} of {self.graph} (plan "
                f"{self.plan.describe()}): some rank did not call the compiled model; it is stuck, died, or "
                "took another path. Its own traceback shows where it is; raise the option timeout if it "
                f"legitimately needs longer. The backend said: {str(e).strip().splitlines()[0][:300]}"
            ) from e
        rows = gathered.view(self.world, -1).tolist()
        if all(all(map(same, rows[0], row)) for row in rows[1:]):
            return
        lines = []
        for k, (_, label) in enumerate(self.inputs):
            pair = lambda r: (rows[r][2 * k], rows[r][2 * k + 1])  # noqa: E731
            odd = [r for r in range(1, self.world) if not all(map(same, pair(0), pair(r)))]
            if odd:
                sums = "; ".join(f"rank {r}: sum {pair(r)[0]!r}, weighted by batch row {pair(r)[1]!r}"
                                 for r in [0, *odd[:MAX_LISTED]])
                lines.append(f"input {label}: {list_ranks(odd)} got different values than rank 0 ({sums})")
        raise RankMismatchError(
            f"xdit: call {self.calls} of {self.graph} (plan {self.plan.describe()}): the ranks were called with "
            "different inputs, which would give a wrong result on every rank:\n  - " + "\n  - ".join(lines)
            + "\nEvery rank must pass the same inputs: seed every rank's generator alike (torch.manual_seed(s) or "
            "generator=torch.Generator().manual_seed(s) on every rank) or broadcast the inputs from rank 0. The "
            "option check_inputs=False turns this check off."
        )


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """float64 sums of ``x`` along everything but dim 0 (one per batch row; a scalar is one row)."""
    x = x.detach()
    if x.is_complex():
        x = torch.view_as_real(x)
    rows = x.reshape(x.shape[0], -1) if x.dim() >= 1 and x.shape[0] else x.reshape(1, -1)
    return torch.sum(rows, dim=1, dtype=torch.float64)


def _mixer(counts: list[int], device: torch.device) -> torch.Tensor:
    """Matrix turning concatenated row sums into (sum, sum weighted by row position) per input.

    Equal inputs give equal checksums on every rank; the weighted one tells apart inputs whose
    rows were swapped (the CFG halves), which the plain sum cannot.
    """
    mix = torch.zeros(2 * len(counts), sum(counts), dtype=torch.float64, device=device)
    start = 0
    for k, n in enumerate(counts):
        mix[2 * k, start:start + n] = 1
        mix[2 * k + 1, start:start + n] = torch.arange(1, n + 1, dtype=torch.float64, device=device)
        start += n
    return mix


