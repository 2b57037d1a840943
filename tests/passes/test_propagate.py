"""Propagation on a graph captured from a small module, without any process group.

Checks placements node by node, the attention decision, and the seed search's choice.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from xdit_compile.graph import is_user_input, op_name
from xdit_compile.passes.choose_seeds import choose_seeds
from xdit_compile.passes.propagate import propagate
from xdit_compile.placements import Partial, Replicate, Shard, shard


class TinyBlock(torch.nn.Module):
    """Patch embed (conv, kernel == stride), self-attention, cross-attention to text, unpatchify."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Conv2d(4, 32, 2, stride=2)
        self.qkv = torch.nn.Linear(32, 96)
        self.txt = torch.nn.Linear(8, 64)
        self.out = torch.nn.Linear(32, 16)

    def forward(self, latent: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent).flatten(2).transpose(1, 2)  # [B, 64, 32]
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 2, 16).permute(2, 0, 3, 1, 4)
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, 32)
        tk, tv = self.txt(text).view(b, -1, 2, 2, 16).permute(2, 0, 3, 1, 4)
        q2 = x.view(b, s, 2, 16).transpose(1, 2)
        x = x + F.scaled_dot_product_attention(q2, tk, tv).transpose(1, 2).reshape(b, s, 32)
        return self.out(F.layer_norm(x, (32,))).view(b, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 4, 16, 16)


def capture() -> fx.GraphModule:
    graphs = []

    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    torch.compile(TinyBlock(), backend=backend, fullgraph=True)(torch.randn(2, 4, 16, 16), torch.randn(2, 5, 8))
    return graphs[0]


def test_latent_rows_shard_through_the_block() -> None:
    gm = capture()
    latent = next(n for n in gm.graph.nodes if n.op == "placeholder" and is_user_input(n) and len(n.meta["example_value"].shape) == 4)
    prop = propagate(gm, 2, {latent: shard(2, 16)})
    sdpa = [n for n in gm.graph.nodes if op_name(n) == "scaled_dot_product_attention"]
    assert [prop.decisions[n].attention for n in sdpa] == ["sequence", "local"]  # self, then cross
    assert not prop.fallbacks
    out = [n for n in gm.graph.nodes if n.op == "output"][0]
    final = out.all_input_nodes[0]
    assert isinstance(prop.placements[final], Shard) and prop.placements[final].dim == 2
    conv = next(n for n in gm.graph.nodes if op_name(n) == "conv2d")
    assert prop.placements[conv] == Shard(2, (8,), 1)


def test_no_seed_means_everything_replicated() -> None:
    gm = capture()
    prop = propagate(gm, 2, {})
    assert all(isinstance(p, Replicate) or p is None or isinstance(p, tuple) for p in prop.placements.values())
    assert prop.comm_bytes == 0


def test_seed_search_picks_the_tokens() -> None:
    gm = capture()
    prop = choose_seeds(gm, 2, batch_axis=False, batch=2)
    (seed_node, p), = prop.seeds.items()
    assert len(seed_node.meta["example_value"].shape) == 4 and p.dim in (2, 3)
    assert prop.compute < 0.6 * propagate(gm, 2, {}).compute


def test_sum_over_shards_is_partial() -> None:
    def fn(x: torch.Tensor) -> torch.Tensor:
        return (x.sum(1, keepdim=True) * 2 + 1).softmax(-1)

    graphs = []
    torch.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(torch.randn(2, 8, 4))
    gm = graphs[0]
    x = next(n for n in gm.graph.nodes if n.op == "placeholder")
    prop = propagate(gm, 2, {x: shard(1, 8)})
    placements = {op_name(n): prop.placements[n] for n in gm.graph.nodes if n.op == "call_method" or n.op == "call_function"}
    assert isinstance(placements["sum"], Partial) and isinstance(placements["mul"], Partial)
    # add of a constant to a partial sum must reduce first (1 would be added N times).
    add = next(n for n in gm.graph.nodes if op_name(n) == "add")
    assert isinstance(prop.placements[add], Replicate)
