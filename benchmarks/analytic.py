"""Analytical minimum communication per rank per forward, after xDiT's communication cost table.

Notation (global sizes): B batch, S tokens that take part in self/joint attention (image tokens,
plus the text tokens for joint attention, which are sharded with the image), C = heads x head_dim,
L self/joint attention layers, O output elements per image token, S_img image tokens, e bytes per
element. N = ulysses x ring sequence-parallel ranks, G = cfg degree (batch split).

Two units, both computed from the same records of ``record_collectives()``:

* **handed**: bytes of the buffer a rank hands to each collective call (what the recorder logs).
  For an all-to-all that is the whole local send buffer (including the 1/n that stays home);
  for an all-gather the local shard; for a ring shift the block sent.
* **received**: bytes a rank must receive from other ranks (the wire traffic any algorithm
  needs): all-to-all ``b (n-1)/n``, all-gather ``b (n-1)``, shift ``b``, all-reduce
  ``2 b (n-1)/n`` (ring algorithm).

Minimum per method (per rank, per forward), with ``b_loc = (B/G) (S/N) C e`` the local shard of
one of q, k, v or the attention output, and ``o_loc = (B/G) (S_img/N) O e`` the local output shard:

* Ulysses U (N = U): per self/joint layer q, k, v go out and the output comes back through an
  all-to-all: handed ``4 b_loc``, received ``4 b_loc (U-1)/U``. Cross-attention against replicated
  text needs nothing. The output is gathered once: handed ``o_loc``, received ``o_loc (U-1)``.
* Ring R (N = R): per layer the local K and V blocks pass R-1 times: handed = received
  ``2 b_loc (R-1)``. Output gather as above.
* USP U x R (N = U R): the Ulysses all-to-alls on the local shard (``4 b_loc``, received
  ``4 b_loc (U-1)/U``) and then R-1 ring passes of K and V after the all-to-all, whose blocks hold
  S/R tokens and C/U channels, i.e. ``b_loc`` each: ``2 b_loc (R-1)``. Output gathered over all N.
* CFG G: no communication inside the model; the output is gathered over the batch once:
  handed ``(B/G) S_img O e``, received ``(G-1)`` times that.
* CFG G x Ulysses U: Ulysses on each batch half plus one gather of the output over all G U ranks:
  handed ``o_loc`` (one all-gather over G U ranks), received ``o_loc (G U - 1)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .models import Shape


@dataclass(frozen=True)
class Method:
    """One parallel configuration: a name, its degrees and the xdit options that select it."""

    name: str
    cfg: int = 1
    ulysses: int = 1
    ring: int = 1

    @property
    def world(self) -> int:
        return self.cfg * self.ulysses * self.ring

    def options(self, inner: str) -> dict:
        opts: dict = {"inner": inner, "ulysses_degree": self.ulysses, "ring_degree": self.ring}
        opts["use_cfg_parallel"] = self.cfg == 2
        return opts


def minimum(method: Method, s: Shape) -> dict[str, float]:
    """Minimum bytes per rank per forward: {'handed': ..., 'received': ...} (see the module doc)."""
    g, u, r = method.cfg, method.ulysses, method.ring
    n = u * r
    b_loc = (s.batch / g) * (s.attn_tokens / n) * s.hidden * s.elem
    o_loc = (s.batch / g) * (s.image_tokens / n) * s.out_per_token * s.elem
    handed = received = 0.0
    if n > 1:
        if u > 1:  # all-to-all of q, k, v and the output, per self/joint layer
            handed += s.self_layers * 4 * b_loc
            received += s.self_layers * 4 * b_loc * (u - 1) / u
        if r > 1:  # K and V blocks around the ring
            handed += s.self_layers * 2 * b_loc * (r - 1)
            received += s.self_layers * 2 * b_loc * (r - 1)
    world = g * n
    if world > 1:  # one gather of the output over every rank that holds a piece of it
        handed += o_loc
        received += o_loc * (world - 1)
    return {"handed": handed, "received": received}


def received_bytes(kind: str, nbytes: int, group: int) -> float:
    """Bytes a rank receives from others for one recorded collective call (see the module doc)."""
    if group <= 1:
        return 0.0
    if kind == "all_to_all":
        return nbytes * (group - 1) / group
    if kind == "all_gather":
        return float(nbytes * (group - 1))
    if kind == "shift":
        return float(nbytes)
    if kind == "all_reduce":
        return 2.0 * nbytes * (group - 1) / group
    if kind == "reduce_scatter":  # handed: the whole summand; received: the other ranks' parts of one block
        return nbytes * (group - 1) / group
    return float(nbytes)
