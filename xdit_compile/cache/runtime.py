"""``StepCache``: the callable a cached graph returns; decides per call whether the blocks run.

Per call (one transformer forward)::

    part 0 (prologue + first block, or its modulated input)  always
    decision: statistic from part 0's probe vs this stream's previous one; its two sums are
              all-reduced over every rank, so every rank takes the same decision
    part 1 (the other blocks)     computed: run it, cache y - x for each pair
                                  skipped:  y = x + cached (y - x) of the last computed step
    part 2 (epilogue)             always

FBCache (diffusers' ``FirstBlockCacheConfig`` rule): ``r = probe - base`` (the first block's
residual), ``diff = sum|r - r_prev| / sum|r_prev|`` against the last *computed* step's ``r``;
skip when ``diff <= threshold``. TeaCache: ``rel = sum|m - m_prev| / sum|m_prev|`` of the
modulated input against the previous call's, rescaled by the polynomial when given and
accumulated; skip while the sum stays below the threshold, reset it when computing. A
threshold of 0 never skips (and issues no collective).

Steps, streams, generations: as PipeFusion's (``pipefusion/kv.py``): the values of the small
user inputs (timestep, guidance) name a step; a call repeating the previous call's values is
another *stream* of that step (CFG's second call) with its own cache; values going up, or
repeating an earlier step, or ``reset()``, start a new *generation*, which clears every
stream's cache. The first ``cache_first_steps`` steps, the last ``cache_last_steps`` (of
``cache_num_steps``) and each stream's first call are always computed.

Each rank's cache holds its own shard of its own batch group (sequence and CFG / data
parallel ranks never mix), so only the decision is shared.

Behind ``branches.CallStream`` (CFG across separate calls, ``across_calls``): a cfg group runs
one branch per predicted step, so the stream is the branch the call stream names
(``call_branch``, set before each call), not the call's place in the step: group ``g`` keeps
branch ``g``'s cache and decides over its own sequence ranks, as one rank running every call
would for that branch. A call every group runs alike (the learning step, a miss) computes the
blocks, so that every group's cache of its branch stays what one rank's would be.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from ..context import current
from .split import Part

log = logging.getLogger("xdit_compile")


def reset() -> None:
    """Start a new generation on the next call of every step-cached (and PipeFusion) graph."""
    current().kv_epoch += 1


@dataclass(frozen=True)
class Decision:
    """One call: its step and stream, whether the blocks ran, the statistic and why."""

    step: int
    stream: int
    computed: bool
    statistic: float | None  # FBCache: relative L1 of the residual; TeaCache: the accumulated sum
    why: str


@dataclass
class Generation:
    """The calls of one generation (one denoising loop)."""

    index: int
    calls: list[Decision] = field(default_factory=list)

    @property
    def computed(self) -> list[int]:
        """Steps whose blocks ran in every stream."""
        return sorted({d.step for d in self.calls if d.computed} - {d.step for d in self.calls if not d.computed})

    @property
    def skipped(self) -> list[int]:
        """Steps skipped in at least one stream."""
        return sorted({d.step for d in self.calls if not d.computed})

    def __str__(self) -> str:
        n = len(self.calls)
        done = sum(d.computed for d in self.calls)
        return (f"generation {self.index}: {n} call(s), blocks computed in {done}, skipped in {n - done}; "
                f"skipped steps {self.skipped}")


@dataclass
class StepCacheReport:
    """What the cache of one graph does (``PlanReport.step_cache``): the cut, the options, each generation."""

    cut: str
    options: str
    generations: list[Generation] = field(default_factory=list)
    program_ref: Any = field(default=None, repr=False, compare=False)  # weakref to the StepCache

    @property
    def program(self) -> "StepCache | None":
        """The cached program (None once it is gone: the report does not keep it and its cache alive)."""
        return self.program_ref() if self.program_ref is not None else None

    def __str__(self) -> str:
        lines = [f"step cache ({self.options}): {self.cut}"]
        lines += [f"  {g}" for g in self.generations]
        return "\n".join(lines)


@dataclass
class _Stream:
    """One stream's cache: the last computed step's differences and the decision's memory."""

    cached: dict[str, torch.Tensor] = field(default_factory=dict)
    previous: torch.Tensor | None = None  # FBCache: last computed residual; TeaCache: last modulated input
    accumulated: float = 0.0


@dataclass
class _Steps:
    """Which step, stream and generation a call belongs to (the rule of ``pipefusion/kv.StepState``)."""

    step: int = -1
    stream: int = 0
    last_key: tuple | None = None
    seen: set = field(default_factory=set)
    epoch: int = -1

    def on_call(self, key: tuple | None) -> tuple[bool, int, int]:
        """(new generation, step, stream) of the next call."""
        new = self.step < 0 or self.epoch != current().kv_epoch
        same = key is not None and key == self.last_key and not new
        if key is not None and not new and not same and (key in self.seen or sum(key) > sum(self.last_key or key)):
            new = True
        if new:
            self.epoch, self.step, self.stream, self.seen = current().kv_epoch, 0, 0, set()
        elif same:
            self.stream += 1
        else:
            self.step, self.stream = self.step + 1, 0
        if key is not None:
            self.seen.add(key)
        self.last_key = key
        return new, self.step, self.stream


class StepCache:
    """See the module docstring. ``parts``: the three programs, with their compiled callables."""

    def __init__(self, parts: Sequence[Part], fns: Sequence[Callable[..., Any]], method: str,
                 pairs: Sequence[tuple[str, str]], probe: str, base: str | None, step_inputs: Sequence[int],
                 placeholder_names: Sequence[str], report: StepCacheReport, plan: Any, group: Any = None,
                 example_inputs: Sequence[Any] = (), across_calls: bool = False):
        self.parts, self.fns, self.method = list(parts), list(fns), method
        self.pairs, self.probe, self.base = list(pairs), probe, base
        self.step_inputs, self.names = list(step_inputs), list(placeholder_names)
        self.report, self.group = report, group
        self.threshold = float(plan.cache_threshold)
        self.first_steps, self.last_steps, self.num_steps = plan.cache_first_steps, plan.cache_last_steps, plan.cache_num_steps
        self.poly = plan.teacache_coefficients
        self.steps = _Steps()
        self.streams: dict[int, _Stream] = {}
        self.example_inputs = list(example_inputs)  # for ``run_part`` (the parts' FLOPs, in tests and benchmarks)
        report.program_ref = weakref.ref(self)
        self.across_calls = across_calls
        # Set by ``branches.CallStream`` before each call: the guidance branch it computes, or None
        # for a call every cfg group runs alike (read only with ``across_calls``).
        self.call_branch: int | None = None

    def run_part(self, k: int) -> Any:
        """Run part ``k`` alone on the example inputs (zeros for what earlier parts hand it)."""
        p = self.parts[k]
        return self.fns[k](*p.example_inputs(self.example_inputs))

    # ------------------------------------------------------------------ the call
    def __call__(self, *args: Any) -> Any:
        key = tuple(float(x) for i in self.step_inputs for x in args[i].detach().reshape(-1).tolist()) \
            if self.step_inputs else None
        new, step, stream = self.steps.on_call(key)
        branch, self.call_branch = self.call_branch, None
        replicated = self.across_calls and branch is None
        if self.across_calls and branch is not None:
            stream = branch
        if new:
            if self.report.generations:
                log.info("xdit: step cache %s", self.report.generations[-1])
            self.streams.clear()
            self.report.generations.append(Generation(len(self.report.generations)))
        state = self.streams.setdefault(stream, _Stream())
        env: dict[str, Any] = dict(zip(self.names, args))
        self._run(0, args, env)
        with torch.no_grad():
            compute, statistic, why = self._decide(step, state, env, replicated)
        if compute:
            self._run(1, args, env)
            with torch.no_grad():
                state.cached = {y: env[y] - env[x] for y, x in self.pairs}
        else:
            for y, x in self.pairs:
                env[y] = env[x] + state.cached[y]
        self.report.generations[-1].calls.append(Decision(step, stream, compute, statistic, why))
        p = self.parts[2]
        return self.fns[2](*[args[i] for i in p.inputs], *[env[n] for n in p.recv])

    def _run(self, k: int, args: Sequence[Any], env: dict[str, Any]) -> None:
        p = self.parts[k]
        out = self.fns[k](*[args[i] for i in p.inputs], *[env[n] for n in p.recv])
        env.update(zip(p.send, out))

    # ------------------------------------------------------------------ the decision
    def _decide(self, step: int, state: _Stream, env: dict[str, Any],
                replicated: bool = False) -> tuple[bool, float | None, str]:
        """(compute the blocks, statistic, why); updates the stream's memory. ``replicated``: every cfg
        group runs this call (behind a ``CallStream``): computed, so the groups' caches stay alike."""
        if self.method == "fbcache":
            now = env[self.probe] - env[self.base]
        else:
            now = env[self.probe]
        previous, forced = state.previous, self._forced(step, state)
        if forced is None and replicated:
            forced = "a call every cfg group runs (learning step or a miss of the call stream)"
        if self.method == "teacache":
            state.previous = now  # TeaCache compares consecutive calls, computed or not
        if forced is not None:
            state.accumulated = 0.0
            if self.method == "fbcache":
                state.previous = now
            return True, None, forced
        rel = self._relative_l1(now, previous)
        if self.method == "fbcache":
            if rel <= self.threshold:
                return False, rel, f"first block's residual changed {rel:.4g} <= threshold {self.threshold:g}"
            state.previous = now
            return True, rel, f"first block's residual changed {rel:.4g} > threshold {self.threshold:g}"
        if self.poly is not None:
            rel = sum(c * rel ** (len(self.poly) - 1 - i) for i, c in enumerate(self.poly))
        state.accumulated += rel
        acc = state.accumulated
        if acc < self.threshold:
            return False, acc, f"accumulated change {acc:.4g} < threshold {self.threshold:g}"
        state.accumulated = 0.0
        return True, acc, f"accumulated change {acc:.4g} >= threshold {self.threshold:g}"

    def _forced(self, step: int, state: _Stream) -> str | None:
        """Why this call must compute the blocks, or None when the statistic decides."""
        if self.threshold == 0:
            return "cache_threshold 0"
        if state.previous is None or not state.cached:
            return "first call of this stream"
        if step < self.first_steps:
            return f"one of the first {self.first_steps} step(s)"
        if self.num_steps is not None and step >= self.num_steps - self.last_steps:
            return f"one of the last {self.last_steps} step(s) of {self.num_steps}"
        return None

    def _relative_l1(self, now: torch.Tensor, previous: torch.Tensor) -> float:
        """``sum|now - previous| / sum|previous|`` over the whole tensor: the sums of every rank's shard,
        all-reduced, so that every rank gets the same number."""
        sums = torch.stack([(now - previous).abs().sum(dtype=torch.float64),
                            previous.abs().sum(dtype=torch.float64)])
        if self.group is not None:
            dist.all_reduce(sums, group=self.group)
        num, den = float(sums[0]), float(sums[1])
        return num / den if den > 0 else float("inf")
