"""Validate every sharding rule against the full computation, in one process.

In the spirit of DTensor's ``torch/distributed/tensor/_ops/strategy_validation.py``: for
every op name of ``rules.table.RULES``, the samples of :mod:`.rule_samples` (several shapes
and dtypes, and the argument spellings Dynamo produces: positional, tuple and keyword dims,
dims as separate arguments, in-place variants, methods and functions) are each built into a
one-op fx graph as Dynamo would hand it over (global example values in
``node.meta["example_value"]``). Then, for every combination of input placements
(``Replicate``, ``Shard`` on each dim including uneven lengths, multi-segment and
``inner``-unit shards, ``Partial`` with random unequal summands):

1. ``passes.propagate`` decides the op's placement by its rule, exactly as in the backend;
2. ``passes.lower`` writes each rank's program (rank-local slices, collectives, rewrites);
3. every rank's program runs on a simulated rank (:class:`.sim_ranks.SimWorld`: threads
   over torch's threaded process group, so halos, GroupNorm statistics and Ulysses / Ring
   attention run their real collectives) and returns its outputs gathered to ``Replicate``;
4. each rank's result is compared with the op run once on the full tensors.

A case is *exercised* when some input or output of the op stays non-replicated in the
per-rank program (a case the rule answered with "gather everything" is not). The report
lists, per op, the cases run and exercised, every wrong case (op, spelling, placements,
error) and the ops never exercised; :data:`EXEMPT` names the ops that cannot be exercised
and why.

    python -m xdit_compile.testing.validate_rules                 # every op
    python -m xdit_compile.testing.validate_rules flip to div     # some ops
"""

from __future__ import annotations

import argparse
import itertools
import operator
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.fx as fx

from ..axes import SEQUENCE
from ..axis import Axis
from ..graph import op_name
from ..placements import PARTIAL, REPLICATE, Partial, Placement, Replicate, Shard, fmt
from ..passes.lower import lower
from ..passes.propagate import WholeGraphFallback, propagate
from ..rules.table import RULES
from .rule_samples import In, OtherGroup, Sample, samples_for
from .sim_ranks import SimWorld

# Ops no sample can exercise with a non-replicated placement, and why.
EXEMPT: dict[str, str] = {
    **{name: "takes no tensor input: propagation answers R without asking the rule" for name in (
        "arange", "zeros", "ones", "full", "empty", "randn", "rand", "randint", "linspace", "logspace", "eye",
        "scalar_tensor")},
    "cuda": "needs a CUDA device; the same pointwise rule as cpu, which is validated",
    **{name: "copies a tensor's data into a new replicated tensor: the rule gathers a sharded input first, "
             "so no case keeps a non-replicated placement (its cases run and are checked)" for name in (
        "tensor", "as_tensor")},
}

# Most placement combinations tried per sample (single non-replicated inputs and matching
# placements come first; the rest is a fixed random pick).
MAX_COMBOS = 16


@dataclass
class CaseResult:
    """One sample under one placement combination."""

    op: str
    spelling: str
    placements: str
    world: int
    status: str  # "ok", "wrong", "error", "fallback" (whole graph replicated), "replicated"
    error: float = 0.0
    detail: str = ""

    def __str__(self) -> str:
        what = self.detail
        return f"{self.op}: {self.spelling} with inputs {self.placements} on {self.world} ranks: {self.status}, {what}"


@dataclass
class OpReport:
    """What the validator did for one op name."""

    name: str
    cases: int = 0
    exercised: int = 0
    wrong: list[CaseResult] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # sample spellings torch refuses (dropped)


@dataclass
class ValidationReport:
    """Per op: cases run, cases exercised, wrong cases; ops never exercised; time taken."""

    ops: dict[str, OpReport]
    exempt: dict[str, str]
    seconds: float = 0.0

    @property
    def wrong(self) -> list[CaseResult]:
        return [c for r in self.ops.values() for c in r.wrong]

    @property
    def never_exercised(self) -> list[str]:
        return sorted(name for name, r in self.ops.items() if r.exercised == 0 and name not in self.exempt)

    @property
    def cases(self) -> int:
        return sum(r.cases for r in self.ops.values())

    @property
    def ok(self) -> bool:
        return not self.wrong and not self.never_exercised

    def __str__(self) -> str:
        return self.text()

    def text(self, verbose: bool = False) -> str:
        """The report; ``verbose`` adds the sample spellings torch refused (dropped)."""
        lines = [f"rule validation: {len(self.ops)} ops, {self.cases} cases, "
                 f"{sum(r.exercised for r in self.ops.values())} exercised with a non-replicated placement, "
                 f"{len(self.wrong)} wrong, {len(self.never_exercised)} never exercised ({self.seconds:.1f} s)"]
        for c in self.wrong:
            lines.append(f"  WRONG {c}")
        for name in self.never_exercised:
            lines.append(f"  NEVER EXERCISED {name} ({self.ops[name].cases} cases ran, all replicated)")
        for name, r in sorted(self.ops.items()):
            for why in r.invalid if verbose else ():
                lines.append(f"  dropped sample of {name} (torch refuses it): {why}")
        for name in sorted(self.exempt):
            if name in self.ops:
                lines.append(f"  exempt {name}: {self.exempt[name]}")
        lines.append("  per op (cases / exercised): " + ", ".join(
            f"{name} {r.cases}/{r.exercised}" for name, r in sorted(self.ops.items())))
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- placements


def candidate_placements(t: torch.Tensor, n: int, partial: bool = True) -> list[Placement]:
    """Non-replicated placements worth trying for ``t`` on ``n`` ranks.

    ``Shard`` on every dim at least ``n`` long (uneven lengths included), a two-segment shard
    of uneven segments and a shard in units of 2 on the longest dims, and ``Partial`` for
    numbers that add (not bool).
    """
    out: list[Placement] = []
    shape = tuple(t.shape)
    for d, s in enumerate(shape):
        if s >= n:
            out.append(Shard(d, (s,), 1))
    longest = sorted((d for d, s in enumerate(shape) if s >= 2 * n + 1), key=lambda d: -shape[d])[:1]
    for d in longest:
        a = shape[d] // 2
        out.append(Shard(d, (a, shape[d] - a), 1))
    paired = [d for d, s in enumerate(shape) if s % 2 == 0 and s // 2 >= n][-1:]
    for d in paired:
        out.append(Shard(d, (shape[d] // 2,), 2))
    if partial and t.dtype != torch.bool:
        out.insert(0, PARTIAL)  # first: the subtle cases (linearity) survive a small cap
    return out


def _combos(sample: Sample, n: int) -> list[tuple[Placement, ...]]:
    k = len(sample.inputs)
    vary = range(k) if sample.vary is None else sample.vary
    lists: list[list[Placement]] = []
    for i, t in enumerate(sample.inputs):
        if sample.candidates is not None and i in sample.candidates:
            lists.append([REPLICATE] + list(sample.candidates[i]))
        elif i in vary and t.dim() > 0:
            lists.append([REPLICATE] + candidate_placements(t, n, sample.partial))
        else:
            lists.append([REPLICATE])
    every = [c for c in itertools.product(*lists) if any(not isinstance(p, Replicate) for p in c)]
    if len(every) <= MAX_COMBOS:
        return every
    # Matching placements first (what graphs hold: operands sharded alike), then one
    # non-replicated input at a time, taking turns, then a fixed random pick.
    varied = [i for i in range(k) if len(lists[i]) > 1]
    matched = [c for c in every if len({c[i] for i in varied}) == 1]
    single = [c for c in every if sum(not isinstance(p, Replicate) for p in c) == 1]
    by_input = [[c for c in single if not isinstance(c[i], Replicate)] for i in range(k)]
    turns = [c for group in itertools.zip_longest(*by_input) for c in group if c is not None]
    chosen = list(dict.fromkeys(matched + turns))[:MAX_COMBOS]
    rest = [c for c in every if c not in set(chosen)]
    random.Random(len(every)).shuffle(rest)
    return chosen + rest[: max(0, MAX_COMBOS - len(chosen))]


def _summands(t: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """``n`` unequal random summands whose sum is ``t`` (exactly, for values on a 1/64 grid)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        # Multiples of 1/64, like the samples' values: the summands add up to t exactly.
        parts = [(torch.randn(t.shape, generator=gen, dtype=torch.float64) * 128).round().div(64).to(t.dtype)
                 for _ in range(n - 1)]
    else:
        parts = [torch.randint(-5, 6, t.shape, generator=gen).to(t.dtype) for _ in range(n - 1)]
    rest = t
    for p in parts:
        rest = rest - p
    return parts + [rest]


# ----------------------------------------------------------------------------------- graphs


def _subst(a: Any, env: Callable[[Any], Any]) -> Any:
    if isinstance(a, (In, OtherGroup)):
        return env(a)
    if isinstance(a, list):
        return [_subst(x, env) for x in a]
    if isinstance(a, tuple):
        return tuple(_subst(x, env) for x in a)
    if isinstance(a, dict):
        return {k: _subst(v, env) for k, v in a.items()}
    return a


class _Program(fx.GraphModule):
    """A GraphModule whose constructor skips code generation: ``lower`` generates it once."""

    ready = False

    def recompile(self) -> Any:
        return super().recompile() if self.ready else None


def _module(g: fx.Graph) -> fx.GraphModule:
    gm = _Program(torch.nn.Module(), g)
    gm.ready = True
    return gm


def _build(sample: Sample, group: str | None) -> tuple[fx.GraphModule, fx.Node]:
    """The one-op graph of ``sample`` (no example values yet) and its op node."""
    g = fx.Graph()
    phs = [g.placeholder(f"in{i}") for i in range(len(sample.inputs))]
    first = None
    if sample.inplace:
        first = g.call_method("clone", (phs[0],))

    def env(a: Any) -> Any:
        if isinstance(a, OtherGroup):
            return group
        return first if (first is not None and a.i == 0) else phs[a.i]

    args, kwargs = _subst(sample.args, env), _subst(sample.kwargs, env)
    if isinstance(sample.call, str):
        node = g.call_method(sample.call, args, kwargs)
    else:
        node = g.call_function(sample.call, args, kwargs)
    if isinstance(sample.returns, int):
        outs = tuple(g.call_function(operator.getitem, (node, i)) for i in range(sample.returns))
    elif sample.returns == "arg0":
        target = args[0]
        outs = (g.call_method("clone", (target,)),)
    else:
        outs = (node,)
    g.output(outs)
    return _module(g), node


class _Recorder(fx.Interpreter):
    """Runs a graph on full values and records them as Dynamo's example values."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.values: list[Any] = []

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.values.append(_detach_copy(out))
        return out


def _detach_copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)):
        return type(v)(_detach_copy(x) for x in v) if not hasattr(v, "_fields") else tuple(_detach_copy(x) for x in v)
    return v


def _annotate(gm: fx.GraphModule, values: list[Any]) -> None:
    for node, v in zip(gm.graph.nodes, values):
        if node.op != "output":
            node.meta["example_value"] = v


def _clone_inputs(xs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [x.clone() for x in xs]


# ----------------------------------------------------------------------------------- comparing


def _tolerance(dtype: torch.dtype) -> float:
    if dtype in (torch.float16, torch.bfloat16, torch.complex32):
        return 2e-2
    if dtype in (torch.float64, torch.complex128):
        return 1e-9
    if dtype.is_floating_point or dtype.is_complex:
        return 1e-4
    return 0.0


def _error(got: Any, ref: Any, exact: bool) -> tuple[float, str]:
    """(error relative to the reference's scale, what differs); 0 when within tolerance."""
    if isinstance(ref, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(ref):
            return float("inf"), f"got {type(got).__name__} instead of {len(ref)} outputs"
        worst = (0.0, "")
        for g, r in zip(got, ref):
            worst = max(worst, _error(g, r, exact), key=lambda e: e[0])
        return worst
    if not isinstance(ref, torch.Tensor):
        return (0.0, "") if got == ref else (float("inf"), f"got {got!r}, expected {ref!r}")
    if not isinstance(got, torch.Tensor):
        return float("inf"), f"got {type(got).__name__}, expected a tensor"
    if got.shape != ref.shape or got.dtype != ref.dtype:
        return float("inf"), f"got {list(got.shape)} {got.dtype}, expected {list(ref.shape)} {ref.dtype}"
    if not exact or ref.numel() == 0:
        return 0.0, ""
    if ref.is_complex():
        got, ref = torch.view_as_real(got), torch.view_as_real(ref)
    if not (ref.dtype.is_floating_point):
        bad = int((got != ref).sum())
        return (float(bad), f"{bad} of {ref.numel()} elements differ") if bad else (0.0, "")
    g, r = got.double(), ref.double()
    if not torch.equal(torch.isnan(g), torch.isnan(r)):
        return float("inf"), "NaNs in different places"
    fin = torch.isfinite(r)
    if not torch.equal(g[~fin & ~torch.isnan(r)], r[~fin & ~torch.isnan(r)]) or not torch.isfinite(g[fin]).all():
        return float("inf"), "infinities in different places"
    if not fin.any():
        return 0.0, ""
    scale = max(1.0, float(r[fin].abs().max()))
    err = float((g[fin] - r[fin]).abs().max()) / scale
    return (err, f"max error {err:.3g} of scale {scale:.3g}") if err > _tolerance(ref.dtype) else (0.0, "")


# ----------------------------------------------------------------------------------- one case


def _exercised(op_node: fx.Node, prop: Any) -> bool:
    d = prop.decisions.get(op_node)
    if d is None:
        return False
    placements = [d.needs.get(x, prop.placements.get(x)) for x in op_node.all_input_nodes]
    out = d.out if isinstance(d.out, tuple) else (d.out,)
    return any(isinstance(p, (Shard, Partial)) for p in placements + list(out))


def _rank_inputs(sample: Sample, combo: tuple[Placement, ...], n: int, seed: int) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Full inputs (sums of the summands for ``Partial``) and every rank's inputs."""
    gen = torch.Generator().manual_seed(seed)
    full, per_rank = [], [[] for _ in range(n)]
    for t, p in zip(sample.inputs, combo):
        if isinstance(p, Partial):
            parts = _summands(t, n, gen)
            total = torch.stack(parts).sum(0)
            same = torch.equal(total, t) and (not t.is_floating_point() or torch.equal(total.signbit(), t.signbit()))
            full.append(t if same else total)
            for r in range(n):
                per_rank[r].append(parts[r])
        else:
            full.append(t)
            for r in range(n):
                per_rank[r].append(t)
    return full, per_rank


def _axis(sample: Sample, n: int, rank: int, group: str) -> Axis:
    if sample.attention == "ring":
        return Axis(SEQUENCE, n, rank, group, ulysses=1, ring=n)
    return Axis(SEQUENCE, n, rank, group, ulysses=n, ring=1)


# Full results of samples whose inputs are their own (no Partial summing to something else).
_REFERENCES: dict[int, tuple[Sample, Any]] = {}


def run_case(sample: Sample, combo: tuple[Placement, ...], world: SimWorld, seed: int = 0) -> tuple[CaseResult, bool]:
    """Run ``sample`` with inputs placed as ``combo`` on ``world``; (result, exercised)."""
    n = world.n
    spelled = sample.spelling()
    where = fmt(tuple(combo))

    def result(status: str, error: float = 0.0, detail: str = "") -> CaseResult:
        return CaseResult(sample.op, spelled, where, n, status, error, detail)

    full, per_rank = _rank_inputs(sample, combo, n, seed)
    needs_group = _has_group(sample.args) or _has_group(tuple(sample.kwargs.values()))

    def reference(group: str | None) -> Callable[[], Any]:
        def job() -> Any:
            gm, _ = _build(sample, group)
            gm.recompile()
            rec = _Recorder(gm)
            with torch.no_grad():
                out = rec.run(*_clone_inputs(full))
            return rec.values, out
        return job

    cached = all(f is t for f, t in zip(full, sample.inputs))
    if cached and id(sample) in _REFERENCES:
        ran = _REFERENCES[id(sample)][1]
    elif needs_group:
        ran = world.run([reference(world.single(0))] + [lambda: None] * (n - 1))[0]
    else:
        try:
            ran = reference(None)()
        except Exception as exc:  # noqa: BLE001 - a sample spelling torch refuses
            ran = exc
    if cached:
        _REFERENCES[id(sample)] = (sample, ran)  # the sample is kept alive, so its id stays unique
    if isinstance(ran, BaseException):
        return result("invalid", detail=f"the full computation raised {type(ran).__name__}: {ran}"), False
    values, ref = ran

    programs: list[fx.GraphModule] = []
    exercised = False
    for r in range(n):
        gm, op_node = _build(sample, world.single(r))
        _annotate(gm, values)
        phs = [nd for nd in gm.graph.nodes if nd.op == "placeholder"]
        seeds = {ph: p for ph, p in zip(phs, combo) if not isinstance(p, Replicate)}
        try:
            prop = propagate(gm, n, seeds)
        except WholeGraphFallback as exc:
            return result("fallback", detail=f"whole graph replicated: {exc}"), False
        except Exception as exc:  # noqa: BLE001 - a rule that raises is a bug in it
            return result("error", float("inf"), f"propagation raised {type(exc).__name__}: {exc}"), False
        if r == 0:
            exercised = _exercised(op_node, prop)
            if not exercised:
                return result("replicated"), False
        for ph, p in seeds.items():
            if isinstance(p, Partial):
                del prop.seeds[ph]  # fed as this rank's summand, not sliced from a full value
        try:
            lower(gm, prop, _axis(sample, n, r, world.group))
        except Exception as exc:  # noqa: BLE001
            return result("error", float("inf"), f"lowering raised {type(exc).__name__}: {exc}"), exercised
        programs.append(gm)

    def job(r: int) -> Callable[[], Any]:
        def run() -> Any:
            with torch.no_grad():
                return programs[r](*_clone_inputs(per_rank[r]))
        return run

    outs = world.run([job(r) for r in range(n)])
    worst, why = 0.0, ""
    for r, out in enumerate(outs):
        if isinstance(out, BaseException):
            return result("error", float("inf"), f"rank {r} raised {type(out).__name__}: {out}"), exercised
        err, detail = _error(out, ref, sample.exact)
        if err > worst:
            worst, why = err, f"rank {r}: {detail}"
    if worst > 0:
        return result("wrong", worst, why), exercised
    return result("ok"), exercised


def _has_group(args: tuple) -> bool:
    found = False

    def look(a: Any) -> Any:
        nonlocal found
        found = True
        return a

    _subst(args, lambda a: look(a) if isinstance(a, OtherGroup) else a)
    return found


# ----------------------------------------------------------------------------------- all ops


def validate_rules(names: Iterable[str] | None = None, worlds: tuple[int, ...] = (2,),
                   max_combos: int | None = None) -> ValidationReport:
    """Run every sample of every requested op (default: all of ``RULES``) on ``worlds`` ranks."""
    global MAX_COMBOS
    start = time.perf_counter()
    wanted = list(RULES) if names is None else list(names)
    unknown = [name for name in wanted if name not in RULES]
    if unknown:
        raise KeyError(f"no rule named {unknown} in rules.table.RULES; known: {sorted(RULES)}")
    report = ValidationReport({name: OpReport(name) for name in wanted}, {k: v for k, v in EXEMPT.items() if k in wanted})
    old, interval = MAX_COMBOS, sys.getswitchinterval()
    if max_combos is not None:
        MAX_COMBOS = max_combos
    # Rank threads hand the interpreter lock back and forth at every collective.
    sys.setswitchinterval(1e-5)
    quiet = warnings.catch_warnings()
    quiet.__enter__()
    warnings.simplefilter("ignore")  # deprecated spellings (F.upsample, torch.tensor(t)) sampled on purpose
    try:
        for n in worlds:
            with SimWorld(n) as world:
                for name in wanted:
                    rep = report.ops[name]
                    for k, sample in enumerate(samples_for(name, n)):
                        try:
                            called = op_name_of(sample)
                        except Exception as exc:  # noqa: BLE001 - a spelling fx cannot write down
                            rep.invalid.append(f"{sample.spelling()}: {type(exc).__name__}: {exc}")
                            continue
                        if called != name:
                            raise KeyError(f"sample {sample.spelling()} is named {called!r} in graphs, "
                                           f"not {name!r}: fix rule_samples")
                        for j, combo in enumerate(_combos(sample, n)):
                            res, exercised = run_case(sample, combo, world, seed=k * 1000 + j)
                            if res.status == "invalid":
                                rep.invalid.append(f"{res.spelling}: {res.detail}")
                                break
                            rep.cases += 1
                            rep.exercised += int(exercised)
                            if res.status in ("wrong", "error"):
                                rep.wrong.append(res)
    finally:
        quiet.__exit__(None, None, None)
        MAX_COMBOS = old
        sys.setswitchinterval(interval)
        _REFERENCES.clear()
    report.seconds = time.perf_counter() - start
    return report


def op_name_of(sample: Sample) -> str | None:
    """The name the graph gives the sample's op node (what the rule table is keyed by)."""
    gm, node = _build(sample, None)
    return op_name(node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xdit_compile.testing.validate_rules",
                                     description="Validate the sharding rules against the full computation.")
    parser.add_argument("ops", nargs="*", help="op names of rules.table.RULES (default: all)")
    parser.add_argument("--worlds", default="2", help="comma-separated simulated world sizes (default 2)")
    parser.add_argument("-v", "--verbose", action="store_true", help="also list the sample spellings torch refused")
    parser.add_argument("--max-combos", type=int, default=None, help=f"placement combinations per sample ({MAX_COMBOS})")
    a = parser.parse_args(argv)
    report = validate_rules(a.ops or None, tuple(int(w) for w in a.worlds.split(",")), a.max_combos)
    print(report.text(a.verbose))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
