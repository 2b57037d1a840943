"""Rules return data; the lowering alone performs graph surgery (issue 11).

- ``test_every_rule_returns_only_data``: every sample of every rule in ``rules.table.RULES``,
  under every placement combination the validator tries (6 per sample), gives decisions made
  of placements, nodes (as ``needs`` keys only), ``LocalOp`` / ``Comm`` / ``AttentionRole``
  values and constants: no callable anywhere. Propagating the same graph twice gives equal
  decisions, and every ``LocalOp`` kind met has a surgery in ``passes.local_ops.SURGERIES``.
- ``test_every_local_op_kind_has_a_surgery``: the same, read off the rules' source, both ways
  (a surgery nobody asks for is dead code).
- ``test_a_returned_replacement_node_is_used``: a surgery that builds a new node and returns it
  (instead of editing the node) gets it wired in: users, placement, report; the old code
  discarded it and left the global-shape op in the rank's program.

One process, simulated ranks (``testing.sim_ranks``); no spawn.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import operator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.fx as fx

from xdit_compile.axis import Axis
from xdit_compile.errors import ShardingError
from xdit_compile.graph import shape
from xdit_compile.passes.local_ops import SURGERIES, LocalContext
from xdit_compile.passes.lower import _Ctx, lower
from xdit_compile.passes.propagate import propagate
from xdit_compile.placements import REPLICATE, Replicate, Shard, local_shape
from xdit_compile.rules.core import AttentionRole, Comm, Decision, LocalOp, local_op
from xdit_compile.rules.table import RULES
from xdit_compile.testing import validate_rules as vr
from xdit_compile.testing.rule_samples import samples_for
from xdit_compile.testing.sim_ranks import SimWorld

RULES_DIR = Path(vr.__file__).resolve().parents[1] / "rules"
COMBOS = 6  # placement combinations per sample, as tests/rules/test_validate_rules.py


def _data_problems(v: Any, where: str) -> list[str]:
    """Where ``v`` (part of a Decision) holds something other than data."""
    if v is None or isinstance(v, (bool, int, float, str, enum.Enum)):
        return []
    if isinstance(v, fx.Node):
        return [f"{where}: graph node {v.name} outside needs"]
    if isinstance(v, (tuple, list)):
        return [p for i, x in enumerate(v) for p in _data_problems(x, f"{where}[{i}]")]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return [p for f in dataclasses.fields(v) for p in _data_problems(getattr(v, f.name), f"{where}.{f.name}")]
    if callable(v):
        return [f"{where}: callable {v!r}"]
    return [f"{where}: {type(v).__name__} {v!r} is not plain data"]


def _decision_problems(d: Decision, where: str) -> list[str]:
    out = []
    if not isinstance(d, Decision):
        return [f"{where}: {type(d).__name__}, not a Decision"]
    for x, p in d.needs.items():
        if not isinstance(x, fx.Node):
            out.append(f"{where}.needs key {x!r} is not a graph node")
        out += _data_problems(p, f"{where}.needs[{getattr(x, 'name', x)}]")
    out += _data_problems(d.out, f"{where}.out")
    if d.local is not None and not isinstance(d.local, LocalOp):
        out.append(f"{where}.local: {type(d.local).__name__}, not a LocalOp")
    if d.attention is not None and not isinstance(d.attention, AttentionRole):
        out.append(f"{where}.attention: {d.attention!r}, not an AttentionRole")
    if not isinstance(d.comm, Comm):
        out.append(f"{where}.comm: {type(d.comm).__name__}, not a Comm")
    out += _data_problems((d.local, d.note, d.attention, d.comm), where)
    return out


def _annotated(sample: Any, values: list[Any], group: str) -> tuple[fx.GraphModule, list[fx.Node]]:
    gm, _ = vr._build(sample, group)
    vr._annotate(gm, values)
    return gm, [nd for nd in gm.graph.nodes if nd.op == "placeholder"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # deprecated spellings, sampled on purpose
def test_every_rule_returns_only_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vr, "MAX_COMBOS", COMBOS)
    problems: list[str] = []
    kinds: dict[str, str] = {}  # LocalOp kind -> a sample that returned it
    roles: set[AttentionRole] = set()
    decided = 0
    with SimWorld(2) as world:
        group = world.single(0)
        for name in RULES:
            for sample in samples_for(name, 2):
                try:
                    gm, _ = vr._build(sample, group)
                    gm.recompile()
                    rec = vr._Recorder(gm)
                    needs_group = vr._has_group(sample.args) or vr._has_group(tuple(sample.kwargs.values()))
                    if needs_group:  # runtime ops met again: they run a collective on their group
                        ran = world.run([lambda: rec.run(*vr._clone_inputs(sample.inputs))] + [lambda: None])[0]
                        if isinstance(ran, BaseException):
                            raise ran
                    else:
                        with torch.no_grad():
                            rec.run(*vr._clone_inputs(sample.inputs))
                except Exception:  # noqa: BLE001 - a spelling torch refuses (the validator drops it too)
                    continue
                for combo in vr._combos(sample, 2):
                    gm, phs = _annotated(sample, rec.values, group)
                    seeds = {ph: p for ph, p in zip(phs, combo) if not isinstance(p, Replicate)}
                    try:
                        first = propagate(gm, 2, seeds)
                    except ShardingError:  # refused (a whole-graph fallback): no decisions to read
                        continue
                    where = f"{name}: {sample.spelling()} under {combo}"
                    # The same graph propagated twice: equal decisions (a closure would differ).
                    if propagate(gm, 2, seeds).decisions != first.decisions:
                        problems.append(f"{where}: two propagations of one graph decided differently")
                    for nd, d in first.decisions.items():
                        decided += 1
                        problems += _decision_problems(d, f"{where}, node {nd.name}")
                        if d.local is not None:
                            kinds.setdefault(d.local.kind, where)
                        if d.attention is not None:
                            roles.add(d.attention)
    assert decided > 1000, decided
    assert not problems, "\n".join(problems[:20])
    unknown = {k: w for k, w in kinds.items() if k not in SURGERIES}
    assert not unknown, f"local ops without a surgery in passes/local_ops: {unknown}"
    # The samples reach most kinds and both attention roles (the rest: test below, from the source).
    assert len(kinds) >= 10, sorted(kinds)
    assert roles == set(AttentionRole), roles


def _kinds_in_rules() -> dict[str, str]:
    """``local_op("kind", ...)`` / ``LocalOp("kind", ...)`` calls in ``rules/*.py``: kind -> file."""
    out: dict[str, str] = {}
    for path in sorted(RULES_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("local_op", "LocalOp")
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                out.setdefault(node.args[0].value, path.name)
    return out


def test_every_local_op_kind_has_a_surgery() -> None:
    kinds = _kinds_in_rules()
    assert len(kinds) >= 15, kinds
    missing = {k: f for k, f in kinds.items() if k not in SURGERIES}
    assert not missing, f"rules return local ops that no surgery in xdit_compile/passes/local_ops performs: {missing}"
    dead = sorted(set(SURGERIES) - set(kinds))
    assert not dead, f"surgeries no rule asks for: {dead}"
    # No rule module edits the graph any more.
    for path in RULES_DIR.glob("*.py"):
        text = path.read_text()
        for word in ("inserting_before", "inserting_after", "call_function(", "rewrite="):
            assert word not in text, f"{path.name} still performs graph surgery ({word})"


def test_local_op_is_printable_hashable_data() -> None:
    op = local_op("conv_halo", dim=2, before=1, after=1, padding=(0, 1))
    assert str(op) == "conv_halo(dim=2, before=1, after=1, padding=(0, 1))"
    assert op == local_op("conv_halo", dim=2, before=1, after=1, padding=(0, 1)) and hash(op) == hash(
        local_op("conv_halo", dim=2, before=1, after=1, padding=(0, 1)))
    assert op["padding"] == (0, 1)
    with pytest.raises(TypeError, match="not constants"):
        local_op("bad", fn=len)
    g = fx.Graph()
    with pytest.raises(TypeError, match="not constants"):
        local_op("bad", node=g.placeholder("x"))
    d = Decision(Shard(1, (8,), 1), local=op, comm=Comm(1, 64.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.out = REPLICATE  # type: ignore[misc]
    assert AttentionRole.SEQUENCE == "sequence"  # str enum: old comparisons still hold


def _view_graph() -> tuple[fx.GraphModule, fx.Node, fx.Node]:
    """x[2, 8, 4] -> view(2, 8, 2, 2) -> * 2 -> output; example values are the global ones."""
    g = fx.Graph()
    x = g.placeholder("x")
    v = g.call_method("view", (x, 2, 8, 2, 2))
    y = g.call_function(operator.mul, (v, 2))
    g.output(y)
    gm = fx.GraphModule(torch.nn.Module(), g)
    full = torch.arange(64.0).reshape(2, 8, 4)
    x.meta["example_value"] = full
    v.meta["example_value"] = full.view(2, 8, 2, 2)
    y.meta["example_value"] = full.view(2, 8, 2, 2) * 2
    return gm, x, v


def test_a_returned_replacement_node_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []

    def fresh_reshape(graph: fx.Graph, node: fx.Node, op: LocalOp, ctx: LocalContext) -> fx.Node:
        """Leaves ``node`` (the global-shape view) alone and returns a new local reshape."""
        seen.append(ctx)
        local = tuple(local_shape(shape(node), ctx.placement(node), ctx.size, ctx.rank))
        with graph.inserting_before(node):
            return graph.call_method("reshape", (node.args[0], local))

    monkeypatch.setitem(SURGERIES, "reshape_local", fresh_reshape)
    full = torch.arange(64.0).reshape(2, 8, 4)
    with SimWorld(2) as world:
        programs, olds = [], []
        for r in range(2):
            gm, x, v = _view_graph()
            prop = propagate(gm, 2, {x: Shard(1, (8,), 1)})
            assert prop.decisions[v].local == local_op("reshape_local")
            lowered = lower(gm, prop, Axis("sp", 2, r, world.group))
            assert v not in gm.graph.nodes, "the replacement was discarded: the global-shape view still runs"
            new = next(nd for nd in gm.graph.nodes if nd.op == "call_method" and nd.target == "reshape")
            assert new.meta["xdit"]["sp"] == Shard(1, (8,), 1)
            assert torch.equal(new.meta["example_value"], full.view(2, 8, 2, 2))  # global shape kept
            assert [k for k, _, _ in lowered.collectives] == ["all_gather"]  # the output only
            programs.append(gm)
            olds.append(v)
        outs = world.run([lambda gm=gm: gm(full) for gm in programs])
    for out in outs:
        assert not isinstance(out, BaseException), out
        assert torch.equal(out, full.view(2, 8, 2, 2) * 2)
    assert all(isinstance(ctx, LocalContext) for ctx in seen) and [c.rank for c in seen] == [0, 1]


def test_unknown_local_op_kind_names_node_and_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(SURGERIES, "reshape_local")
    gm, x, v = _view_graph()
    prop = propagate(gm, 2, {x: Shard(1, (8,), 1)})
    with pytest.raises(ShardingError, match=r"node view .*reshape_local.*passes/local_ops"):
        lower(gm, prop, Axis("sp", 2, 0, "0"))


def test_lowering_context_is_a_local_context() -> None:
    ctx = _Ctx(Axis("sp", 4, 3, "7"), {}, [])
    assert isinstance(ctx, LocalContext)
    assert (ctx.rank, ctx.size, ctx.group) == (3, 4, "7")
    assert ctx.placement(fx.Graph().placeholder("x")) == REPLICATE
