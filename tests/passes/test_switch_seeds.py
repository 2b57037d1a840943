"""The plan search's switch seeds (``passes/switch_seeds.py``), on captured graphs, without processes.

A spatial-temporal model's across-frames attention becomes local by one switch of the activation
(frames -> positions) and one back, priced as two all-to-alls; an image DiT, whose attention has
only the batch besides its sequence, gets no switch; and the cost model prices each change by
the collective the lowering emits for it (``runtime/reshard.py``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from examples.tiny_dits_st import make
from tests.passes.test_propagate import capture as capture_image_dit
from xdit_compile.graph import is_user_input, op_name, shape
from xdit_compile.passes.choose_seeds import choose_seeds
from xdit_compile.passes.propagate import redistribution_bytes
from xdit_compile.placements import PARTIAL, REPLICATE, shard


def _capture(name: str) -> fx.GraphModule:
    graphs: list[fx.GraphModule] = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    model, inputs = make(name)
    torch.compile(model, backend=backend, fullgraph=True)(**inputs, return_dict=False)
    return graphs[0]


def test_spatial_temporal_switches_instead_of_ulysses() -> None:
    gm = _capture("opensora")
    prop = choose_seeds(gm, 2, False, 2)
    sdpa = [n for n in gm.graph.nodes if op_name(n) == "scaled_dot_product_attention"]
    assert [prop.decisions[n].attention for n in sdpa] == ["local"] * 4
    assert len(prop.switched) == 2  # one switch into positions per block; the residual add switches back
    activation = 2 * 8 * 64 * 64 * 4  # (B, T, S, D) float32, global
    latent = 2 * 4 * 8 * 16 * 16 * 4
    # Per block two all-to-alls, each a rank receiving activation * (n-1)/n^2; the output gathered once.
    assert prop.comm_bytes == 2 * 2 * activation / 4 + latent / 2


def test_image_dit_gets_no_switch() -> None:
    gm = capture_image_dit()
    latent = next(n for n in gm.graph.nodes if n.op == "placeholder" and is_user_input(n) and len(shape(n)) == 4)
    prop = choose_seeds(gm, 2, False, 2)
    assert not prop.switched and latent in prop.seeds


def test_redistribution_bytes_price_the_direct_collective() -> None:
    v = torch.empty(2, 8, 6)  # 384 bytes
    n = 4
    assert redistribution_bytes(shard(1, 8), shard(2, 6), v, n) == 384 * 3 / 16  # all-to-all
    assert redistribution_bytes(PARTIAL, shard(1, 8), v, n) == 384 * 3 / 4  # reduce-scatter
    assert redistribution_bytes(PARTIAL, REPLICATE, v, n) == 2 * 384 * 3 / 4  # all-reduce
    assert redistribution_bytes(shard(1, 8), REPLICATE, v, n) == 384 * 3 / 4  # all-gather
    assert redistribution_bytes(REPLICATE, shard(1, 8), v, n) == 0.0  # a slice
