"""The backend used the way a careless or hostile user would: every case gives the single-rank
result or a clear ``XditError``; never a silently wrong tensor, never a hang.

Multi-process cases run in one spawn per world size (``tests/adversarial/cases.py``):
in-place statements with unused results (12 spellings) on CFG 2, Ulysses 2, Ring 2 and USP 2x2;
a hand-written DiT full of in-place writes on those plans and PipeFusion 2; backward under
every plan (one rank's gradients, or ``GradientError`` under PipeFusion); misused switches.
Single-process cases check annotations and the side-effect analysis on hand-built graphs. Rank disagreement, timeouts, option types and shape changes
have their own modules (``test_agreement.py``, ``test_timeout.py``, ``test_plan.py``,
``test_shapes.py``).
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import xdit_compile
from tests.adversarial.cases import INPLACE, world_job
from xdit_compile.graph import eliminate_dead_code, has_side_effects, written_inputs
from xdit_compile.testing.harness import run_spmd

PLANS2 = {"cfg2": {"use_cfg_parallel": True}, "ulysses2": {"ulysses_degree": 2}, "ring2": {"ring_degree": 2}}
PLANS4 = {"usp2x2": {"ulysses_degree": 2, "ring_degree": 2}}
PP2 = {"pp2": {"pipefusion_parallel_degree": 2}}
_cache: dict[int, list[dict]] = {}


def _world(size: int) -> list[list[dict]]:
    if size not in _cache:
        if size == 2:
            args = (PLANS2, {**PLANS2, **PP2}, {**PLANS2, **PP2}, True)
        else:
            args = (PLANS4, PLANS4, PLANS4, False)
        _cache[size] = run_spmd(world_job, size, *args, timeout=900)
    return _cache[size]


def _case(size: int, name: str) -> list[dict]:
    """The case's result on every rank."""
    return [next(r for r in per_rank if r["case"] == name) for per_rank in _world(size)]


def _exact(r: dict) -> None:
    assert r["err"] <= 1e-5 * max(r["scale"], 1.0), f"{r['case']}: error {r['err']}\n{r.get('report', '')}"


INPLACE_CASES = [(2, f"{fn.__name__}/{p}") for fn in INPLACE for p in PLANS2] + [
    (4, f"{fn.__name__}/{p}") for fn in INPLACE for p in PLANS4]


@pytest.mark.parametrize("size,name", INPLACE_CASES, ids=[n for _, n in INPLACE_CASES])
def test_inplace_statement_is_kept(size: int, name: str) -> None:
    for r in _case(size, name):
        _exact(r)


TOY_CASES = [(2, f"toy_{w}_writes/{p}") for w in ("whole", "local") for p in [*PLANS2, *PP2]] + [
    (4, f"toy_{w}_writes/{p}") for w in ("whole", "local") for p in PLANS4]


@pytest.mark.parametrize("size,name", TOY_CASES, ids=[n for _, n in TOY_CASES])
def test_toy_dit_with_inplace_writes(size: int, name: str) -> None:
    for r in _case(size, name):
        _exact(r)
        if name.endswith("/pp2"):
            continue
        if name.startswith("toy_local"):
            assert "sharded inputs: L[" in r["report"], r["report"]  # really split, not replicated
        else:
            # The tables are written whole before anything reads them: settle_writes reads them
            # through a clone made after the last write, so the plan may split (exact, checked
            # above); where sharding would still make a write land in a copy, the report says why.
            rep = r["report"]
            assert "sharded inputs: L[" in rep or ("input not sharded as" in rep and "in-place write" in rep), rep


GRAD_CASES = [(2, f"backward/{p}") for p in [*PLANS2, *PP2]] + [(4, f"backward/{p}") for p in PLANS4]


@pytest.mark.parametrize("size,name", GRAD_CASES, ids=[n for _, n in GRAD_CASES])
def test_backward_is_exact_or_raises(size: int, name: str) -> None:
    for r in _case(size, name):
        _exact(r)  # the forward under grad mode stays exact
        if name.endswith("/pp2"):  # PipeFusion has no gradient rules: refused, never wrong
            assert r["raised"].startswith("GradientError: backward through a graph"), r["raised"]
            assert "PipeFusion" in r["raised"] and "torch.no_grad()" in r["raised"], r["raised"]
        else:  # gradients of the input and every weight equal one rank's
            assert r["raised"] == "no error", r["raised"]
            assert r["grad_err"] <= 1e-4, f"{name}: gradient error {r['grad_err']}\n{r['report']}"
            assert "sharded inputs: L[" in r["report"], r["report"]  # really split, not replicated


def test_disabling_a_needed_pass_skips_its_dependents() -> None:
    for r in _case(2, "disable_plan_pass"):
        _exact(r)
        logs = "\n".join(r["logs"])
        assert "lower:sp skipped too: it needs pass plan:sp" in logs, logs
        assert "names no pass ['no_such_pass']" in logs, logs


def test_train_mode_dropout_warns() -> None:
    for r in _case(2, "train_mode_dropout"):
        assert "model.eval()" in r["report"] and "WARNING" in r["report"], r["report"]
        assert any("dropout" in line for line in r["logs"]), r["logs"]


def test_forced_split_is_reported() -> None:
    for r in _case(2, "forced_split_reported"):
        _exact(r)
        assert "annotated: " in r["report"] and "S(1)" in r["report"], r["report"]


# ---------------------------------------------------------------- single process
@pytest.mark.parametrize("dim", [3, 5, -4, 1.0, True])
def test_shard_dim_out_of_range(dim: object) -> None:
    with pytest.raises(xdit_compile.PlanError, match="out of range for a tensor of shape"):
        xdit_compile.shard(torch.zeros(2, 3, 4), dim)  # type: ignore[arg-type]


def _spellings(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x.masked_fill_(y > 0, 0.0)
    F.silu(x, inplace=True)
    F.relu(y, True)
    torch.add(x, y, out=y)
    return x + 1


def test_side_effects_survive_dead_code_elimination() -> None:
    gm = fx.symbolic_trace(_spellings)
    writes = {n.name: [w.name for w in written_inputs(n)] for n in gm.graph.nodes if written_inputs(n)}
    assert writes == {"masked_fill_": ["x"], "silu": ["x"], "relu": ["y"], "add": ["y"]}, writes
    assert all(has_side_effects(n) for n in gm.graph.nodes if n.name in writes)
    before = len(gm.graph.nodes)
    eliminate_dead_code(gm.graph)
    assert len(gm.graph.nodes) == before
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    gm.recompile()
    torch.testing.assert_close(gm(x.clone(), y.clone()), _spellings(x.clone(), y.clone()))


def test_pure_nodes_are_still_eliminated() -> None:
    g = fx.Graph()
    x = g.placeholder("x")
    g.call_function(operator.setitem, (x, 0, 1.0))  # x[0] = 1.0: kept
    g.call_function(operator.mul, (x, 2))  # unused, pure
    g.call_method("relu", (x,))  # unused, pure
    g.output(x)
    assert eliminate_dead_code(g)
    assert [n.op for n in g.nodes] == ["placeholder", "call_function", "output"]
