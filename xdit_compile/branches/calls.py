"""CFG parallel across separate calls: the guidance branches of a step, computed at once.

Pipelines such as Wan or Flux with true CFG call the transformer once per guidance branch, each
call with batch 1, so the batch axis has nothing to split. ``CallStream`` wraps the per-rank
program (planned for the sequence axes only: the ranks of one cfg group are replicas of each
other's groups) and works on the stream of calls instead::

    step 0 (learning)      call(x0, t0, pos) -> every group computes it
                           call(x0, t0, neg) -> every group computes it; learned: input
                                                "encoder_hidden_states" differs, 2 branches
    step 1 (predicted)     call(x1, t1, pos) -> group 0 computes (x1, t1, pos), group 1 (x1, t1, neg);
                                                one all-gather of the outputs; returns branch 0's
                           call(x1, t1, neg) -> inputs equal the prediction: branch 1's output, no compute

A *step* is a run of calls with the same timestep-like inputs (the small user tensors: their
values) and the same latent (the largest user tensor); the calls of one step are its *branches*,
in call order. The first step of a generation runs normally and learns which inputs differ
between the branches (``diff``), keeping branch ``b``'s values of them. From the next step, the
first call must carry branch 0's learned values; group ``g`` then computes branch ``g`` (and
``g + k``, ... with more branches than groups) on this call's other inputs with branch ``g``'s
learned ones, and each later call returns its cached output only when every one of its inputs
equals the predicted one bit for bit (same tensor object and version, or equal bits; weights by
identity first). Anything else is a *miss*: that call runs normally on every group, exactly,
and the report names the input that broke the prediction. A generation restarts (and relearns)
when the timestep values return to the generation's first ones or rise, or when the first call
of a step does not carry branch 0's learned inputs.

Every rank decides alike: every rank gets the same inputs (``runtime/guard.py`` checks that per
call) and the decisions read only those inputs.

Memory: the learned branch inputs (references; a clone only for tensors without a version
counter, i.e. inference-mode tensors), references to the step's first-call inputs, and one
cached output per branch until its call arrives.

Autograd: a call that needs gradients (grad mode on and an input requiring grad) runs normally:
an output computed by another group carries no history here.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..context import current
from ..runtime.collectives import all_gather

log = logging.getLogger("xdit_compile")

# The guidance branch the running call computes (None outside a call stream). A program that keeps
# per-branch state across steps reads it (PipeFusion's driver: one K/V stream per branch), since a
# cfg group that computes only branch b in a predicted step cannot tell b from the call count.
_BRANCH: contextvars.ContextVar[int | None] = contextvars.ContextVar("xdit_branch", default=None)


def current_branch() -> int | None:
    """The guidance branch the ``CallStream`` is running now (its index in the step), or None."""
    return _BRANCH.get()


@contextlib.contextmanager
def _branch(b: int) -> Any:
    token = _BRANCH.set(b)
    try:
        yield
    finally:
        _BRANCH.reset(token)


# More calls than this in one step are no guidance pattern (e.g. a loop calling the model with one
# timestep and latent over and over): the step stops being learned, and its calls just run.
MAX_BRANCHES = 16


# ---------------------------------------------------------------------- exact comparison
@dataclass
class Snap:
    """One argument as a call saw it: a reference plus its version counter (a clone when the
    tensor has none, e.g. made under ``torch.inference_mode``), or a non-tensor value."""

    value: Any
    version: int | None = None

    @staticmethod
    def of(x: Any) -> "Snap":
        if not isinstance(x, torch.Tensor):
            return Snap(x)
        try:
            return Snap(x, x._version)
        except RuntimeError:  # inference tensors track no version: keep a copy instead
            return Snap(x.detach().clone())

    def held(self) -> Any:
        """The value the call saw, or None when the tensor was written in place since."""
        x = self.value
        if isinstance(x, torch.Tensor) and self.version is not None and _version(x) != self.version:
            return None
        return x

    def matches(self, x: Any) -> bool:
        """Whether ``x`` equals what this snapshot saw, bit for bit."""
        ref = self.held()
        if not isinstance(x, torch.Tensor) or not isinstance(self.value, torch.Tensor):
            return not isinstance(x, torch.Tensor) and not isinstance(self.value, torch.Tensor) and x == self.value
        if ref is None:
            return False  # written in place after the call: what it held then is unknown
        if x is ref and self.version is not None:
            return True
        return same_bits(x, ref)


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:
        return None


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shape, dtype, device and bits (so -0.0 differs from 0.0 and equal NaNs match)."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.is_complex():
        a, b = torch.view_as_real(a), torch.view_as_real(b)
    if a.is_floating_point() and a.element_size() in _INT_OF_SIZE:
        as_int = _INT_OF_SIZE[a.element_size()]
        return torch.equal(a.detach().view(as_int), b.detach().view(as_int))
    return torch.equal(a.detach(), b.detach())


# ---------------------------------------------------------------------- the report
@dataclass
class Miss:
    """A call that did not match its prediction and ran normally."""

    step: int
    call: int
    why: str


@dataclass
class CallsReport:
    """What the call stream of one compiled graph did on this rank (live: it counts as calls run).

    ``hits``: calls answered from the step's exchanged outputs; ``runs``: runs of the per-rank
    program on this rank (``runs_by_step[s]`` in step ``s`` of the latest generation).
    """

    graph: str
    groups: int  # cfg groups (the cfg degree)
    group: int  # this rank's cfg group
    branches: int = 0  # calls per step learned (0: nothing learned yet)
    branch_inputs: list[str] = field(default_factory=list)  # inputs that differ between the branches
    generations: int = 0
    steps: int = 0  # steps of the latest generation
    calls: int = 0
    hits: int = 0
    predicted_steps: int = 0  # steps whose branches ran at once
    exchanges: int = 0  # all-gathers of branch outputs
    runs: int = 0
    runs_by_step: list[int] = field(default_factory=list)
    hits_by_step: list[int] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    bypassed: int = 0  # calls that needed gradients
    note: str | None = None

    def __str__(self) -> str:
        lines = [f"  calls across cfg groups ({self.graph}, group {self.group} of {self.groups}): "
                 f"{self.branches or '?'} branch(es) per step learned"
                 + (f", differing in {', '.join(self.branch_inputs)}" if self.branch_inputs else ""),
                 f"    {self.calls} calls, {self.hits} hits, {len(self.misses)} misses, {self.predicted_steps} "
                 f"predicted steps, {self.exchanges} exchanges, {self.runs} runs here, {self.generations} "
                 f"generation(s)" + (f", {self.bypassed} calls needing gradients ran normally" if self.bypassed else "")]
        if self.branches == 1:
            lines.append("    NOTE: one call per step: nothing to run at once; every cfg group computes every call")
        if self.note:
            lines.append(f"    NOTE: {self.note}")
        lines.extend(f"    miss at step {m.step} call {m.call}: {m.why}" for m in self.misses[:8])
        if len(self.misses) > 8:
            lines.append(f"    ... and {len(self.misses) - 8} more misses")
        return "\n".join(lines)


# ---------------------------------------------------------------------- the runtime
@dataclass
class Learned:
    """A generation's branch pattern: which flat inputs differ, and each branch's values of them."""

    diff: list[int]
    values: list[dict[int, Snap]]  # per branch: flat index -> its value in the learning step


@dataclass
class Pending:
    """A branch computed ahead of its call: the arguments it was computed with and its output."""

    args: list[Snap]
    out: Any


class CallStream:
    """The per-rank program behind the step / branch logic of the module docstring.

    ``fn``: the per-rank program (sequence axes lowered inside the cfg group); ``labels``: a
    readable name per flat input; ``key_inputs``: flat indices of the timestep-like inputs;
    ``latent``: flat index of the latent (None: none); ``group``: this rank's cfg process group,
    ``groups`` its size, ``group_index`` this rank's cfg index; ``order``: the cfg index of each
    group rank (the all-gather's order).
    """

    def __init__(self, fn: Callable[..., Any], labels: Sequence[str], key_inputs: Sequence[int],
                 latent: int | None, group: Any, groups: int, group_index: int, order: Sequence[int],
                 report: CallsReport):
        self.fn, self.labels = fn, list(labels)
        self.key_inputs, self.latent = list(key_inputs), latent
        self.group, self.k, self.me, self.order = group, groups, group_index, list(order)
        self.report = report
        self.key: tuple | None = None  # the current step's timestep values
        self.first_key: tuple | None = None  # the generation's first step's
        self.latent_snap: Snap | None = None
        self.learning: list[list[Snap]] | None = None  # calls of the learning step
        self.learned: Learned | None = None
        self.pending: list[Pending | None] = []  # per branch of the current step
        self.call_in_step = 0

    # ------------------------------------------------------------------ helpers
    def _key(self, args: Sequence[Any]) -> tuple:
        return tuple(float(v) for i in self.key_inputs for v in args[i].detach().reshape(-1).tolist())

    def _run(self, args: Sequence[Any], branch: int | None = None) -> Any:
        """Run the program on ``args`` as guidance branch ``branch`` (``None``: a call every group runs
        alike; PipeFusion's K/V then follow this call's index in the step)."""
        self.report.runs += 1
        if self.report.runs_by_step:
            self.report.runs_by_step[-1] += 1
        if hasattr(self.fn, "call_branch"):  # a step cache keeps one cache per branch (cache/runtime.py)
            self.fn.call_branch = branch  # None: every group runs this call alike
        with _branch(self.call_in_step if branch is None else branch):
            return self.fn(*args)

    def _miss(self, why: str) -> None:
        m = Miss(self.report.steps - 1, self.call_in_step, why)
        self.report.misses.append(m)
        log.info("xdit: %s: miss at step %d call %d: %s; ran it normally", self.report.graph, m.step, m.call, why)

    def _first_difference(self, snaps: Sequence[Snap], args: Sequence[Any]) -> int | None:
        for i, (s, x) in enumerate(zip(snaps, args)):
            if not s.matches(x):
                return i
        return None

    def _needs_grad(self, args: Sequence[Any]) -> bool:
        return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)

    # ------------------------------------------------------------------ the call
    def __call__(self, *args: Any) -> Any:
        if current().captures:
            # ``pipefusion.run_steps`` recording a step (the driver runs nothing): not a call of the stream.
            return self.fn(*args)
        r = self.report
        r.calls += 1
        if self._needs_grad(args):
            r.bypassed += 1
            return self.fn(*args)
        key = self._key(args)
        same_step = (self.key is not None and key == self.key
                     and (self.latent is None or (self.latent_snap is not None and self.latent_snap.matches(args[self.latent]))))
        if same_step:
            self.call_in_step += 1
            return self._later_call(args)
        return self._first_call(args, key)

    def _first_call(self, args: Sequence[Any], key: tuple) -> Any:
        r = self.report
        if self.learning is not None:  # the learning step ended with the previous call
            self.learned = self._learn(self.learning)
            self.learning = None
        restart = (self.key is None or key == self.first_key or (key and self.key and sum(key) > sum(self.key))
                   or (self.latent is not None and self.latent_snap is not None
                       and tuple(args[self.latent].shape) != tuple(self.latent_snap.value.shape)))
        unused = [j for j, p in enumerate(self.pending) if p is not None]
        if unused:  # the step ended before these predicted calls came
            self._miss(f"the step ended without the call(s) of branch(es) {unused} that were computed ahead "
                       "(a branch skipped in this step)")
        self.key, self.call_in_step, self.pending = key, 0, []
        self.latent_snap = Snap.of(args[self.latent]) if self.latent is not None else None
        if restart:
            self.first_key = key
            r.generations += 1
            r.steps, r.runs_by_step, r.hits_by_step = 0, [], []
        r.steps += 1
        r.runs_by_step.append(0)
        r.hits_by_step.append(0)
        if restart or self.learned is None:
            return self._learning_call(args)
        learned = self.learned
        if len(learned.values) < 2:
            return self._run(args)
        wrong = next((i for i in learned.diff if not learned.values[0][i].matches(args[i])), None)
        if wrong is not None:
            self._miss(f"input {self.labels[wrong]} of the step's first call differs from the first branch's "
                       "learned value (new prompt embeddings, or the calls came in another order): learning this "
                       "step's branches again")
            return self._learning_call(args)
        return self._predicted_step(args, learned)

    def _learning_call(self, args: Sequence[Any]) -> Any:
        self.learned = None
        if self.learning is not None and len(self.learning) >= MAX_BRANCHES:
            self.learning, self.learned = None, Learned([], [])  # nothing predicted until a new generation
            self.report.branches = 0
            self.report.note = (f"more than {MAX_BRANCHES} calls in one step (same timestep and latent): not a "
                                "guidance pattern; calls run normally until the timesteps restart")
            return self._run(args)
        self.learning = [*(self.learning or []), [Snap.of(a) for a in args]]
        return self._run(args)

    def _learn(self, calls: list[list[Snap]]) -> Learned:
        first = calls[0]
        diff = sorted({i for c in calls[1:] for i, s in enumerate(c) if not _snaps_equal(first[i], s)})
        learned = Learned(diff, [{i: c[i] for i in diff} for c in calls])
        self.report.branches = len(calls)
        self.report.branch_inputs = [self.labels[i] for i in diff]
        return learned

    def _predicted_step(self, args: Sequence[Any], learned: Learned) -> Any:
        """Compute every branch across the groups (rounds of ``k``), exchange, return branch 0's."""
        r = self.report
        n = len(learned.values)
        branch_args = []
        for b in range(n):
            a = list(args)
            for i in learned.diff:
                a[i] = learned.values[b][i].held()
            branch_args.append(a)
        if any(x is None for a in branch_args for x in (a[i] for i in learned.diff)):
            self._miss("a learned branch input was written in place since it was learned: learning again")
            return self._learning_call(args)
        outs: list[Any] = [None] * n
        for start in range(0, n, self.k):
            # A group past the last branch recomputes one already taken: it would idle otherwise.
            mine = (start + self.me) % n
            out = self._run(branch_args[mine], mine)
            gathered = self._exchange(out)
            for j, g in enumerate(gathered):
                b = start + j
                if b < n and outs[b] is None:
                    outs[b] = out if b == mine else g
        self.pending = [None] + [Pending([Snap.of(x) for x in branch_args[b]], outs[b]) for b in range(1, n)]
        r.predicted_steps += 1
        return outs[0]

    def _exchange(self, out: Any) -> list[Any]:
        """Every group's output (index = cfg group), as ``out``'s structure; one all-gather per dtype."""
        if self.k == 1:  # one group computes every branch itself (rounds of one)
            return [out]
        leaves, spec = tree_flatten(out)
        tensors = [(i, x) for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        per_group = [list(leaves) for _ in range(self.k)]
        for dtype in dict.fromkeys(x.dtype for _, x in tensors):
            same = [(i, x) for i, x in tensors if x.dtype == dtype]
            flat = torch.cat([x.detach().reshape(-1) for _, x in same])
            got = all_gather(flat.unsqueeze(0), 0, [1] * self.k, self.group)
            self.report.exchanges += 1
            for pos, row in enumerate(got):
                g = self.order[pos]
                offset = 0
                for i, x in same:
                    per_group[g][i] = row[offset:offset + x.numel()].view(x.shape)
                    offset += x.numel()
        return [tree_unflatten(leaves_g, spec) for leaves_g in per_group]

    def _later_call(self, args: Sequence[Any]) -> Any:
        r = self.report
        if self.learning is not None:
            return self._learning_call(args)
        j = self.call_in_step
        slot = self.pending[j] if j < len(self.pending) else None
        if slot is None:
            if self.pending:
                self._miss(f"call {j} of the step was not predicted (the learned steps had {len(self.pending)} "
                           "calls, or this branch's prediction was used up)")
            return self._run(args)
        self.pending[j] = None  # one use: the output goes to the caller
        wrong = self._first_difference(slot.args, args)
        if wrong is not None:
            self._miss(f"input {self.labels[wrong]} differs from the prediction for branch {j} (a branch skipped, "
                       "calls in another order, or inputs that change between steps)")
            return self._run(args)
        r.hits += 1
        r.hits_by_step[-1] += 1
        return slot.out


def _snaps_equal(a: Snap, b: Snap) -> bool:
    """Whether two calls saw the same value (the same tensor at the same version: equal even if it
    was written in place since, e.g. a latent the scheduler updates in place after the step)."""
    if isinstance(a.value, torch.Tensor) and a.value is b.value and a.version is not None and a.version == b.version:
        return True
    x = b.held()
    return x is not None and a.matches(x)
