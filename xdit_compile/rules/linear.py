"""Linear and matmul-like ops, all through one einsum-labelled rule.

    linear(x: S(1)[B, S, K], W[N, K])    -> S(1)     tokens stay where they are
    einsum("bsk,bkd->bsd", S(1), R)      -> S(1)
    einsum("bsk,bsd->bkd", S(1), S(1))   -> P        a sum over the sharded tokens (k^T v)
    outer(pos: S(0), freqs: R)           -> S(0)
"""

from __future__ import annotations

import dataclasses
import string

import torch.fx as fx

from ..graph import shape
from ..placements import PARTIAL, REPLICATE, Placement, Replicate, Shard, same_layout
from .core import Decision, OpView, local_op


def einsum_rule(op: OpView, spec: str, operands: list[fx.Node]) -> Decision | None:
    """Placement of ``einsum(spec, *operands)`` when at most one label is sharded."""
    spec = spec.replace(" ", "")
    if "->" not in spec:
        return None
    lhs, out_labels = spec.split("->")
    labels = lhs.split(",")
    if "..." in spec:
        expanded = _expand_ellipsis(labels, out_labels, operands)
        if expanded is None:
            return None
        labels, out_labels = expanded
    if len(labels) != len(operands) or any(len(set(lab)) != len(lab) for lab in labels):
        return None
    pls = [op.pl(x) for x in operands]
    if all(isinstance(p, Replicate) for p in pls):
        return Decision(REPLICATE)
    if any(not isinstance(p, (Replicate, Shard)) for p in pls):
        return None
    for x, lab, p in zip(operands, labels, pls):
        if not isinstance(p, Shard):
            continue
        label = lab[p.dim]
        needs: dict[fx.Node, Placement] = {}
        ok = True
        for y, lab_y, q in zip(operands, labels, pls):
            if label not in lab_y:
                if not isinstance(q, Replicate):
                    needs[y] = REPLICATE
                continue
            d = lab_y.index(label)
            if shape(y)[d] == 1 and label in out_labels:
                if not isinstance(q, Replicate):
                    needs[y] = REPLICATE
                continue
            want = p.with_dim(d)
            if shape(y)[d] != p.length:
                ok = False
                break
            if q != want and not same_layout(q, want, op.n):  # heads x head_dim vs its flat split: same rows
                needs[y] = want
        if not ok:
            continue
        out = p.with_dim(out_labels.index(label)) if label in out_labels else PARTIAL
        return Decision(out, needs)
    return None


def _expand_ellipsis(labels: list[str], out: str, operands: list[fx.Node]) -> tuple[list[str], str] | None:
    """Spell ``...`` out with fresh upper-case labels, right-aligned as broadcasting aligns them."""
    if len(labels) != len(operands):
        return None
    counts = []
    for lab, x in zip(labels, operands):
        named = len(lab.replace("...", ""))
        counts.append(len(shape(x)) - named if "..." in lab else 0)
    k = max(counts)
    fresh = "".join(c for c in string.ascii_uppercase if c not in "".join(labels) + out)[:k]
    if len(fresh) < k or any(c < 0 for c in counts):
        return None
    labels = [lab.replace("...", fresh[k - c:]) for lab, c in zip(labels, counts)]
    return labels, out.replace("...", fresh)


def _letters(k: int, skip: str = "") -> str:
    return "".join(c for c in string.ascii_lowercase if c not in skip)[:k]


def linear(op: OpView) -> Decision | None:
    x, w = op.node.args[0], op.arg(1, "weight")
    b = op.arg(2, "bias")
    nd = len(shape(x))
    xl = _letters(nd - 1) + "z"
    spec = f"{xl},yz->{xl[:-1]}y"
    d = einsum_rule(op, spec, [x, w])
    if d is not None and d.out is PARTIAL and isinstance(op.pl(w), Shard) and not d.needs.get(w):
        return _row_parallel(op, d, b)
    if d is None or d.out is PARTIAL:
        return None
    if isinstance(b, fx.Node):
        # The bias is added along the output features: sharded like them when the weight's
        # rows are sharded (out S(last)), whole otherwise.
        want: Placement = REPLICATE
        if isinstance(d.out, Shard) and d.out.dim == nd - 1:
            want = d.out.with_dim(len(shape(b)) - 1)
        if op.pl(b) != want:
            d.needs[b] = want
    return d


def _row_parallel(op: OpView, d: Decision, b: object) -> Decision:
    """A linear whose weight is split on its in-features (a tensor-parallel seed): each rank sums
    its share of the features, so the output is ``P``; the bias, whole on every rank, is added
    by rank 0 only (else the all-reduce would add it ``n`` times).

        linear(x: S(2)[B, S, K], W: S(1)[N, K], b: R)  ->  P   (rank > 0: linear(x, W))
    """
    if not isinstance(b, fx.Node):
        return d
    needs = dict(d.needs)
    if not isinstance(op.pl(b), Replicate):
        needs[b] = REPLICATE
    return dataclasses.replace(d, needs=needs, local=local_op("bias_on_rank0"))


def matmul(op: OpView) -> Decision | None:
    a, b = op.node.args[0], op.node.args[1]
    sa, sb = shape(a), shape(b)
    if len(sa) < 2 or len(sb) < 2:
        return None
    nb = max(len(sa), len(sb)) - 2
    batch = _letters(nb, "mkn")
    la = batch[nb - (len(sa) - 2):] + "mk"
    lb = batch[nb - (len(sb) - 2):] + "kn"
    # Broadcast batch dims of size 1 must not be treated as sharded-label partners.
    return einsum_rule(op, f"{la},{lb}->{batch}mn", [a, b])


def einsum(op: OpView) -> Decision | None:
    spec = op.node.args[0]
    operands = list(op.node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if not isinstance(spec, str) or not all(isinstance(x, fx.Node) for x in operands):
        return None
    return einsum_rule(op, spec, operands)


def outer(op: OpView) -> Decision | None:
    return einsum_rule(op, "i,j->ij", [op.node.args[0], op.node.args[1]])


def bmm(op: OpView) -> Decision | None:
    return einsum_rule(op, "bij,bjk->bik", [op.node.args[0], op.node.args[1]])


def mm(op: OpView) -> Decision | None:
    return einsum_rule(op, "ij,jk->ik", [op.node.args[0], op.node.args[1]])


TABLE = [
    (["linear"], linear),
    (["matmul"], matmul),
    (["einsum"], einsum),
    (["outer", "ger"], outer),
    (["bmm"], bmm),
    (["mm"], mm),
]
