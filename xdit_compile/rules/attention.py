"""``scaled_dot_product_attention`` on [B, H, S, D] tensors.

    q, k, v: S(0) or S(1) alike (batch or heads)    -> same; local attention, no communication
    q: S(2), k, v: R  (cross-attention to text)      -> S(2); local attention, no communication
    q, k, v: S(2)     (self or joint attention)      -> S(2); lowered to Ulysses / Ring / USP
    anything else                                   -> gathered to R (reported)

Masks are broadcast to [B, H, Sq, Sk]; a replicated mask is sliced where the rows it
applies to are sharded. Causal attention over a sharded sequence is not lowered.
"""

from __future__ import annotations

import torch.fx as fx

from ..graph import shape
from ..placements import REPLICATE, Placement, Replicate, Shard
from .core import AttentionRole, Decision, OpView, replicate_all

SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_args(node: fx.Node) -> dict:
    """SDPA's arguments by name, whether the call was positional or by keyword."""
    out = dict(zip(SDPA_ARGS, node.args))
    out.update(node.kwargs)
    return out


def _mask_need(mask: object, mask_dim_from_end: int, p: Shard, op: OpView) -> dict[fx.Node, Placement] | None:
    """Slice a mask's dim (counted from the end of [B, H, Sq, Sk]) like ``p``, if it is full-size."""
    if not isinstance(mask, fx.Node):
        return {}
    ms = shape(mask)
    d = len(ms) - mask_dim_from_end
    if d < 0 or ms[d] == 1:
        return {} if isinstance(op.pl(mask), Replicate) else {mask: REPLICATE}
    want = p.with_dim(d)
    if ms[d] != p.length:
        return None
    return {} if op.pl(mask) == want else {mask: want}


def sdpa(op: OpView) -> Decision | None:
    a = sdpa_args(op.node)
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    pq, pk, pv = op.pl(q), op.pl(k), op.pl(v)
    pm = op.pl(mask) if isinstance(mask, fx.Node) else REPLICATE
    nd = len(shape(q))
    if all(isinstance(p, Replicate) for p in (pq, pk, pv, pm)):
        return Decision(REPLICATE)
    if not isinstance(pq, (Shard, Replicate)) or not isinstance(pk, (Shard, Replicate)):
        return None
    seq = nd - 2
    # Batch-like dims (anything but the sequence and head-dim): attention is independent there.
    if isinstance(pq, Shard) and pq.dim < seq:
        needs: dict[fx.Node, Placement] = {}
        for t in (k, v):
            want = pq.with_dim(pq.dim - (nd - len(shape(t))))
            if shape(t)[want.dim] != pq.length:
                return None
            if op.pl(t) != want:
                needs[t] = want
        m = _mask_need(mask, nd - pq.dim, pq, op)
        if m is None:
            return None
        needs.update(m)
        return Decision(pq, needs, attention=AttentionRole.LOCAL)
    if not isinstance(pq, Shard) or pq.dim != seq:
        return replicate_all(op, "attention inputs are sharded on a dim it cannot split")
    if a.get("is_causal"):
        # The causal mask depends on global query positions, which a rank's rows do not have.
        return replicate_all(op, "causal attention over a sharded sequence is not lowered")
    if isinstance(pk, Replicate) and isinstance(pv, Replicate):
        m = _mask_need(mask, 2, pq, op)
        if m is None:
            return replicate_all(op, "mask rows do not match the sharded queries")
        return Decision(pq, m, attention=AttentionRole.LOCAL)
    if not isinstance(pk, Shard) or pk.dim != seq:
        return replicate_all(op, "keys are sharded on a dim attention cannot split")
    needs = {}
    if pv != pk:
        if shape(v)[seq] != pk.length:
            return None
        needs[v] = pk
    if isinstance(mask, fx.Node) and not isinstance(pm, Replicate):
        needs[mask] = REPLICATE
    return Decision(pq, needs, attention=AttentionRole.SEQUENCE)


TABLE = [
    (["scaled_dot_product_attention"], sdpa),
]
