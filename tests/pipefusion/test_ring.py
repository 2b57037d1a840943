"""PipeFusion with ring (and USP) inside each stage, on 4 gloo ranks.

Ring inside a stage is an all-gather of the current patch's K/V over the ring group into the
whole-sequence stale K/V buffer (``xdit_compile/pipefusion/kv.py``), so a patch sees exactly
what it sees with PipeFusion alone: fresh K/V for itself, the buffer for the rest.

* The general ops (``fill_kv_attention`` / ``stale_kv_attention``) against plain attention on
  the whole tensors, for ring 4, Ulysses 4 and ring 2 x Ulysses 2 (USP) on 4 ranks, with
  shards made of scattered tokens, uneven sizes and a full mask (fp32, atol 1e-5).
* pp 2 x ring 2 (ranks {0, 1} stage 0, {2, 3} stage 1) on the tiny diffusers pipelines of
  ``examples/tiny_pipelines.py``, 8 steps (one spawn for every case). Exact (fp32, 1e-4 of the
  image's scale): M = 1. Stale K/V (W = 1, M = 2): patch ``i`` covers the same tokens as with
  PipeFusion alone, so the error equals PipeFusion alone's (to 1e-6 of the scale).

PipeFusion x USP (pp 2 x ring 2 x Ulysses 2) needs 8 ranks, too many processes for CI on a
small machine; the ops' USP path is covered here on 4 ranks.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.pipefusion import test_diffusers_pipelines as alone
from tests.pipefusion.jobs import Spawn
from xdit_compile.graph import op_name
from xdit_compile.pipefusion import kv
from xdit_compile.testing.harness import run_spmd

ATOL = 1e-5
STEPS = alone.STEPS
RING = {"ring_degree": 2}

# ---------------------------------------------------------------------------- the ops

# (ring, ulysses) on 4 ranks; sp rank = ring_rank * U + ulysses_rank = global rank.
MESHES = [(4, 1), (1, 4), (2, 2)]
HEADS, TOKENS, DIM = 4, 22, 8


def _groups(r: int, u: int) -> tuple[Any, Any]:
    """(Ulysses group name or None, ring group name or None) of this rank; every rank makes every group."""
    rank = dist.get_rank()
    ug = rg = None
    if u > 1:
        gs = [dist.new_group(list(range(i * u, (i + 1) * u))) for i in range(r)]
        ug = gs[rank // u].group_name
    if r > 1:
        gs = [dist.new_group(list(range(j, r * u, u))) for j in range(u)]
        rg = gs[rank % u].group_name
    return ug, rg


def _shards(g: torch.Generator, tokens: list[int], n: int) -> list[list[int]]:
    """``tokens`` shuffled and cut into ``n`` uneven non-empty shards (sp-rank order)."""
    perm = [tokens[i] for i in torch.randperm(len(tokens), generator=g).tolist()]
    cuts = sorted(torch.randperm(len(tokens) - 1, generator=g)[: n - 1].add(1).tolist())
    return [perm[a:b] for a, b in zip([0, *cuts], [*cuts, len(tokens)])]


def _flat(idx: list[int]) -> list[int]:
    return [x for t in idx for x in (t, 1)]


def _ops_job(meshes: list[tuple[int, int]]) -> dict[str, float]:
    rank = dist.get_rank()
    out: dict[str, float] = {}
    for seed, (r, u) in enumerate(meshes):
        ug, rg = _groups(r, u)
        g = torch.Generator().manual_seed(seed)
        q, k, v, k2, v2, q2 = (torch.randn(1, HEADS, TOKENS, DIM, generator=g) for _ in range(6))
        mask = torch.randn(1, HEADS, TOKENS, TOKENS, generator=g)
        n, j, ui = r * u, rank // u, rank % u
        heads = slice(ui * HEADS // u, (ui + 1) * HEADS // u)
        # Fill: the whole sequence in scattered uneven shards.
        shards = _shards(g, list(range(TOKENS)), n)
        gathered = [t for s in shards for t in s]
        queries = [t for s in shards[j * u:(j + 1) * u] for t in s] if u > 1 else shards[rank]
        sizes = [len(s) for s in shards]
        store = kv.KVStore()
        with store.current(0):
            mine = shards[rank]
            got = kv.fill_kv_attention(q[:, :, mine], k[:, :, mine], v[:, :, mine], mask[:, :, queries][..., gathered],
                                       None, False, "l", _flat(gathered), ug, rg, sizes, sizes)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[:, :, mine]
            out[f"fill r{r}u{u}"] = float((got - want).abs().max())
            kb, vb = store.get("l")
            out[f"fill buffer r{r}u{u}"] = float(torch.stack([kb - k[:, heads], vb - v[:, heads]]).abs().max())
            # Stale: a patch of scattered tokens with fresh K/V; the rest of the buffer stays.
            patch = sorted(torch.randperm(TOKENS, generator=g)[: 2 * n + 1].tolist())
            shards = _shards(g, patch, n)
            gathered = [t for s in shards for t in s]
            queries = [t for s in shards[j * u:(j + 1) * u] for t in s] if u > 1 else shards[rank]
            sizes = [len(s) for s in shards]
            mine = shards[rank]
            got = kv.stale_kv_attention(q2[:, :, mine], k2[:, :, mine], v2[:, :, mine], mask[:, :, queries], None,
                                        False, "l", _flat(gathered), ug, rg, sizes, sizes)
            k_now, v_now = k.clone(), v.clone()
            k_now[:, :, patch], v_now[:, :, patch] = k2[:, :, patch], v2[:, :, patch]
            want = F.scaled_dot_product_attention(q2, k_now, v_now, attn_mask=mask)[:, :, mine]
            out[f"stale r{r}u{u}"] = float((got - want).abs().max())
            kb, vb = store.get("l")
            out[f"stale buffer r{r}u{u}"] = float(torch.stack([kb - k_now[:, heads], vb - v_now[:, heads]]).abs().max())
    return out


def _patch_program_job() -> dict[str, Any]:
    """Patch 1 of 2 of pixart with ring 4 inside the stage: what its stale ops and gathers name."""
    from tests.pipefusion.test_stage_split import captured
    from xdit_compile.axis import Axis
    from xdit_compile.pipefusion.programs import PATCH_GROUP, patch_program, stamp_layers

    gm, ex, _ = captured("pixart")
    stamp_layers(gm)
    world = dist.group.WORLD.group_name
    g, assembly, layers, _ = patch_program(gm, 2, 1, 2, ex, Axis("sp", 4, dist.get_rank(), world, ring=4))
    return {
        "world": world, "layers": len(layers), "assembled": assembly.gathers[0] is not None,
        "stale": [(n.args[8], n.args[9], len(n.args[10]), len(n.args[11]), sum(n.args[7][1::2]) == sum(n.args[11]))
                  for n in g.graph.nodes if op_name(n) == "stale_kv_attention"],
        "gathers": [n.args[3] for n in g.graph.nodes if op_name(n) == "xdit_gather"],
        "patch_group_left": any(PATCH_GROUP in map(str, n.args) for n in g.graph.nodes),
    }


def _unit_job(meshes: list[tuple[int, int]]) -> tuple[dict[str, float], dict[str, Any]]:
    return _ops_job(meshes), _patch_program_job()


_unit_cache: list = []


def _unit() -> list[tuple[dict[str, float], dict[str, Any]]]:
    if not _unit_cache:
        _unit_cache.append(run_spmd(_unit_job, 4, MESHES, timeout=300))
    return _unit_cache[0]


@pytest.mark.parametrize("mesh", MESHES, ids=[f"ring{r}_ulysses{u}" for r, u in MESHES])
def test_general_ops_match_plain_attention(mesh: tuple[int, int]) -> None:
    r, u = mesh
    for errors, _ in _unit():
        for what in ("fill", "fill buffer", "stale", "stale buffer"):
            assert errors[f"{what} r{r}u{u}"] < ATOL, (what, errors)


def test_patch_program_with_ring_uses_the_real_ring_group() -> None:
    for _, p in _unit():
        assert p["layers"] == len(p["stale"]) == 2, p  # self-attention; cross-attention to text stays local
        # No Ulysses; the ring is the real sp group; sizes of the patch on the 4 ranks; the
        # pieces cover the patch's keys on every rank.
        assert all(s == (None, p["world"], 4, 4, True) for s in p["stale"]), p
        assert p["gathers"] == [p["world"]] and p["assembled"] and not p["patch_group_left"], p


def test_general_ops_without_groups_are_plain_attention() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v, k2, v2 = (torch.randn(2, HEADS, 6, DIM, generator=g) for _ in range(5))
    store = kv.KVStore()
    with store.current(0):
        got = kv.FILL(q, k, v, None, 0.5, False, "l", [0, 6], None, None, [6], [6])
        assert torch.equal(got, F.scaled_dot_product_attention(q, k, v, scale=0.5))
        got = kv.STALE(q[:, :, 2:4], k2[:, :, 2:4], v2[:, :, 2:4], None, 0.5, False, "l", [2, 2], None, None, [2], [2])
    k[:, :, 2:4], v[:, :, 2:4] = k2[:, :, 2:4], v2[:, :, 2:4]
    assert torch.equal(got, F.scaled_dot_product_attention(q[:, :, 2:4], k, v, scale=0.5))


# ---------------------------------------------------------------------------- real pipelines

# (id, pipeline, options, true CFG, exact?, the 2-rank case with the same patches)
CASES = [
    ("ring_pixart_m1", "pixart", {**alone._pf(1, 1), **RING}, False, True, None),
    ("ring_pixart_m2_w1", "pixart", {**alone._pf(2, 1), **RING}, False, False, "pixart_m2_w1"),
    ("ring_flux_truecfg_m1", "flux", {**alone._pf(1, 1), **RING}, True, True, None),
]
IDS = [c[0] for c in CASES]
_results = Spawn(CASES, 4, STEPS)


@pytest.mark.parametrize("case", IDS)
def test_image_matches_single_rank(case: str) -> None:
    alone.check_like_alone(case, CASES, _results())


@pytest.mark.parametrize("case", IDS)
def test_ring_inside_each_stage(case: str) -> None:
    i = IDS.index(case)
    exact = CASES[i][4]
    for rank, per_rank in enumerate(_results()):
        r = per_rank[i]
        assert r["plan"] == "pp=2 x ring=2", r["plan"]
        assert r["stage"] == rank // 2  # rank = pp * 2 + ring
        # Transfers only between the same ring index of neighbouring stages.
        peer = rank + 2 if rank < 2 else rank - 2
        kinds = {(kind, p) for kind, p, _ in r["p2p"]}
        assert kinds == ({("send", peer), ("broadcast", peer)} if rank < 2 else {("recv", peer), ("broadcast", rank)})
        # The ring's collectives run inside the stage, over 2 ranks.
        coll = r["collectives"]
        assert coll and all(size == 2 for _, _, size in coll), coll
        if exact:  # M = 1: the core's ring attention (K/V shifts)
            assert any(kind == "shift" for kind, _, _ in coll), coll
        else:  # stale layers: the patch's K/V all-gathered into the buffer, no circulating ring
            assert r["stale_layers"] and any(kind == "all_gather" for kind, _, _ in coll), r["report"]
            assert not any(kind == "shift" for kind, _, _ in coll), coll
            if r["stage"] == 0:  # (stage 1 also gathers its output) each patch moves 1/M of the fill's K/V
                m = CASES[i][2]["num_pipeline_patch"]
                sent = [nbytes for kind, nbytes, _ in coll if kind == "all_gather"]
                fill = max(sent)
                assert sorted(set(sent)) == [fill // m, fill], sent
                assert sent.count(fill // m) == m * (STEPS - 1) * sent.count(fill), sent  # W = 1


def odd_heads_job() -> list[dict[str, Any]]:
    """PixArt with 3 heads under pp 2 x ulysses 2: the heads do not split, so attention inside a
    stage rings over both sp ranks (all-gathering the patch's K/V) instead of Ulysses."""
    from diffusers import PixArtTransformer2DModel

    from tests.pipefusion.test_stream import STEPS as steps_n
    from tests.pipefusion.test_stream import _step_fn, _steps
    from xdit_compile import pipefusion
    from xdit_compile.runtime.collectives import record_collectives

    out = []
    for warmup in (steps_n, 1):
        torch._dynamo.reset()
        pipefusion.reset()
        torch.manual_seed(0)
        model = PixArtTransformer2DModel(
            num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            norm_type="ada_norm_single", use_additional_conditions=False, sample_size=16, patch_size=2,
            caption_channels=32, cross_attention_dim=48).eval()
        g = torch.Generator().manual_seed(1)
        inputs = {"hidden_states": torch.randn(2, 4, 16, 16, generator=g),
                  "encoder_hidden_states": torch.randn(2, 8, 32, generator=g),
                  "timestep": torch.zeros(2, dtype=torch.long), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        steps = _steps("pixart", inputs)
        with torch.no_grad():
            ref = x = inputs["hidden_states"]
            for a in steps:
                ref = _step_fn(model, inputs)(ref, *a)
            options = {"inner": "eager", "pipefusion_parallel_degree": 2, "num_pipeline_patch": 2,
                       "warmup_steps": warmup, "ulysses_degree": 2}
            step = torch.compile(_step_fn(model, inputs), backend="xdit", dynamic=False, options=options)
            with record_collectives() as coll:
                for a in steps:
                    x = step(x, *a)
        rep = pipefusion.reports()[-1]
        out.append({"warmup": warmup, "err": float((x - ref).abs().max() / ref.abs().max()),
                    "patches": rep.patches, "stale": rep.stale_layers, "report": str(rep),
                    "kinds": sorted({(c.kind, c.group_size) for c in coll})})
    return out


def test_heads_that_do_not_divide_ulysses_ring_inside_the_stage() -> None:
    for per_rank in run_spmd(odd_heads_job, 4, timeout=600):
        exact, stale = per_rank
        for r in per_rank:
            assert r["patches"] == 2 and r["stale"], r["report"]
            assert not any(kind == "all_to_all" for kind, _ in r["kinds"]), r["kinds"]  # no Ulysses: 3 heads
            assert ("all_gather", 2) in r["kinds"], r["kinds"]
        assert exact["err"] < 1e-4, exact  # warmup covers every step: the full-sequence program only
        assert 0 < stale["err"] < 1e-2, stale
