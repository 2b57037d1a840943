"""Recognisers on captured graphs: hand-written functions, then real tiny DiTs."""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from examples.tiny_dits import make
from xdit_compile.passes.recognise import recognise


def capture(fn, *args, **kwargs) -> fx.GraphModule:
    graphs = []
    torch.compile(fn, backend=lambda gm, ex: graphs.append(gm) or gm.forward, fullgraph=True)(*args, **kwargs)
    torch._dynamo.reset()
    return graphs[0]


class Parts(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = torch.nn.Conv2d(4, 32, 2, stride=2)
        self.txt = torch.nn.Linear(8, 32)
        self.w = torch.nn.Parameter(torch.ones(32))

    def forward(self, latent: torch.Tensor, text: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
        x = self.patch(latent).flatten(2).transpose(1, 2)  # [B, 16, 32]
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + 1e-6) * self.w  # diffusers-style decomposed RMSNorm
        t = self.txt(text)  # [B, 5, 32]
        joint = torch.cat([t, x], dim=1).view(2, 21, 2, 16).transpose(1, 2)
        q = joint * freqs.cos()[None, None]  # a positional table spanning the 21 tokens
        o = F.scaled_dot_product_attention(q, joint, joint)
        xq = x.view(2, 16, 2, 16).transpose(1, 2)
        tk = t.view(2, 5, 2, 16).transpose(1, 2)
        c = F.scaled_dot_product_attention(xq, tk, tk)
        return o.sum() + c.sum() + F.layer_norm(x, (32,)).sum()


def test_hand_written_parts() -> None:
    gm = capture(Parts(), torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8), torch.randn(21, 16))
    counts = recognise(gm)
    assert counts["attention:joint"] == 1 and counts["attention:cross"] == 1
    assert counts["norm:rms_decomposed"] == 1 and counts["norm:layer_norm"] == 1
    assert counts["patch_embed:conv"] == 1 and counts["token_embed:linear"] == 1
    assert counts["rope"] >= 1


def test_real_models() -> None:
    for name, expected in [("pixart", {"attention:self": 2, "attention:cross": 2, "patch_embed:conv": 1}),
                           ("flux", {"attention:joint": 2, "token_embed:linear": 2}),
                           ("sd3", {"attention:joint": 2, "patch_embed:conv": 1})]:
        model, inputs = make(name)
        with torch.no_grad():
            counts = recognise(capture(model, **inputs))
        for role, n in expected.items():
            assert counts.get(role) == n, (name, counts)
        assert ("rope" in counts) == (name == "flux"), (name, counts)
