"""Sample calls of every op of the rule table, for :mod:`.validate_rules`.

``samples_for(name, n)`` returns calls of op ``name`` in the spellings Dynamo hands over
(method and function, positional / keyword / tuple / separate-argument dims, in-place
variants), on several shapes and dtypes. Sharded lengths are ``3n + 1`` (uneven on ``n``
ranks) or even ones long enough for two-segment and paired-unit shards. A spelling torch
itself refuses is dropped by the validator before any placement is tried.
"""

from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..runtime import halo
from ..runtime import redistribute as rt
from ..placements import Placement, Replicate, Shard

@dataclass(frozen=True)
class In:
    """Marks input ``i`` of a sample inside its arguments."""

    i: int


@dataclass(frozen=True)
class OtherGroup:
    """Marks the group of "another mesh axis" (a single-rank group) in a runtime op's arguments."""


@dataclass
class Sample:
    """One call of one op: its spelling, full inputs, and how its result is read.

    ``call`` is a function (``call_function``) or a method name (``call_method``).
    ``inplace``: the op writes its first input; the graph feeds it a clone (as Dynamo
    graphs write into intermediate values). ``returns``: ``"value"`` (the op's result),
    an int k (a tuple of k tensors, read through ``getitem`` nodes) or ``"arg0"`` (the
    written first input, for ``setitem``). ``exact=False`` compares shapes and dtypes only
    (random or uninitialised results). ``vary``: the inputs whose placement is varied
    (default all). ``candidates``: explicit placements per input instead of the automatic
    ones. ``attention``: the strategy the simulated axis prefers for attention.
    """

    op: str
    call: Callable[..., Any] | str
    args: tuple
    inputs: tuple[torch.Tensor, ...]
    kwargs: dict = field(default_factory=dict)
    inplace: bool = False
    returns: str | int = "value"
    exact: bool = True
    vary: tuple[int, ...] | None = None
    candidates: dict[int, list[Placement]] | None = None
    attention: str = "ulysses"
    partial: bool = True

    def spelling(self) -> str:
        names = [f"in{i}" for i in range(len(self.inputs))]

        def show(a: Any) -> str:
            if isinstance(a, In):
                return names[a.i]
            if isinstance(a, OtherGroup):
                return "<group>"
            if isinstance(a, list):
                return "[" + ", ".join(show(x) for x in a) + "]"
            if isinstance(a, tuple):
                return "(" + ", ".join(show(x) for x in a) + ("," if len(a) == 1 else "") + ")"
            if isinstance(a, torch.dtype):
                return str(a)
            if isinstance(a, slice):
                return ":".join("" if v is None else str(v) for v in (a.start, a.stop)) + (
                    f":{a.step}" if a.step is not None else "")
            return repr(a)

        parts = [show(a) for a in self.args] + [f"{k}={show(v)}" for k, v in self.kwargs.items()]
        if isinstance(self.call, str):
            text = f"{parts[0]}.{self.call}({', '.join(parts[1:])})"
        else:
            text = f"{_qualname(self.call)}({', '.join(parts)})"
        shapes = ", ".join(f"{names[i]}{list(t.shape)}:{str(t.dtype).replace('torch.', '')}"
                           for i, t in enumerate(self.inputs))
        return f"{text}  [{shapes}]"


def _qualname(fn: Callable[..., Any]) -> str:
    if fn in vars(operator).values():
        return f"operator.{fn.__name__}"
    if isinstance(fn, torch._ops.OpOverload):
        return f"aten.{fn._opname}.{fn._overloadname}"
    mod = getattr(fn, "__module__", "") or ""
    name = getattr(fn, "__name__", str(fn))
    if mod.startswith("torch.nn.functional"):
        return f"F.{name}"
    if mod.startswith("xdit_compile"):
        return name
    return f"torch.{name}"


X, Y, Z = In(0), In(1), In(2)
_INT_OPS = {"bitwise_not", "invert", "bitwise_and", "bitwise_or", "bitwise_xor", "and_", "or_", "xor"}
_BOOL_OK = {"logical_not", "logical_and", "logical_or", "logical_xor", "and_", "or_", "xor", "bitwise_and",
            "bitwise_or", "bitwise_xor", "bitwise_not", "invert"}


class _Gen:
    """Deterministic tensors for one op name (the same on every run)."""

    def __init__(self, name: str):
        self.g = torch.Generator().manual_seed(zlib.crc32(name.encode()))

    # Values lie on a 1/64 grid, so Partial summands add up to them exactly.
    def randn(self, *shape: int, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ((torch.randn(shape, generator=self.g) * scale * 64).round().div(64) + 0.0).to(dtype)  # no -0.0

    def pos(self, *shape: int) -> torch.Tensor:
        return (torch.rand(shape, generator=self.g) * 64).round().div(64) + 0.5

    def nonzero(self, *shape: int) -> torch.Tensor:
        return self.pos(*shape) * torch.where(torch.rand(shape, generator=self.g) > 0.5, 1.0, -1.0)

    def ints(self, *shape: int, low: int = -9, high: int = 10) -> torch.Tensor:
        return torch.randint(low, high, shape, generator=self.g)

    def bools(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.g) > 0.5


def _functions(name: str) -> list[Callable[..., Any]]:
    """torch / torch.nn.functional / operator functions named ``name`` (distinct objects)."""
    out: list[Callable[..., Any]] = []
    for mod in (torch, F, operator):
        fn = getattr(mod, name, None)
        if callable(fn) and not isinstance(fn, type) and all(fn is not f for f in out):
            out.append(fn)
    return out


def _spellings(name: str, args: tuple, kwargs: dict | None = None, inputs: tuple = (), method: bool = True,
               functions: int = 2, **extra: Any) -> list[Sample]:
    """The same call as a method (when ``torch.Tensor`` has it) and as up to ``functions`` functions."""
    kwargs = kwargs or {}
    out = []
    if method and hasattr(torch.Tensor, name) and args and args[0] == X:
        out.append(Sample(name, name, args, inputs, kwargs, **extra))
    for fn in _functions(name)[:functions]:
        out.append(Sample(name, fn, args, inputs, kwargs, **extra))
    return out


# --------------------------------------------------------------------------------- pointwise

# Extra arguments of unary ops: a list of (args after x, kwargs) per op.
_UNARY_ARGS: dict[str, list[tuple[tuple, dict]]] = {
    "clamp": [((-1.0, 1.0), {}), ((), {"min": -0.5}), ((), {"max": Y})],
    "clip": [((-1.0, 1.0), {})],
    "clamp_min": [((0.5,), {})],
    "clamp_max": [((0.5,), {})],
    "leaky_relu": [((0.2,), {})],
    "elu": [((), {"alpha": 0.5})],
    "softplus": [((), {"beta": 2.0})],
    "round": [((), {}), ((), {"decimals": 1})],
    "nan_to_num": [((), {"nan": 0.0})],
    "dropout": [((0.5, False), {}), ((), {"p": 0.5, "training": False})],
    "alpha_dropout": [((0.5, False), {})],
    "feature_alpha_dropout": [((0.5, False), {})],
    "to": [((torch.float64,), {}), ((), {"dtype": torch.int64}), ((torch.int32,), {}), ((torch.float16,), {}),
           (("cpu",), {}), ((Y,), {}), ((torch.bool,), {}), (("cpu", torch.int64), {})],
    "type": [((torch.float64,), {}), ((torch.int64,), {}), (("torch.IntTensor",), {})],
    "requires_grad_": [((False,), {})],
}
_TENSOR_ARG_OF = {"clamp": lambda gen: gen.randn(6, scale=0.5), "to": lambda gen: gen.ints(3)}


def _unary(name: str, n: int, inplace: bool = False) -> list[Sample]:
    base = name[:-1] if inplace else name
    gen = _Gen(name)
    shape = (2, 3 * n + 1, 2 * n + 2)
    if base in _INT_OPS:
        xs = [gen.ints(*shape), gen.bools(*shape)]
    elif base in ("logical_not",):
        xs = [gen.randn(*shape), gen.bools(*shape)]
    else:
        xs = [gen.randn(*shape)]
    out: list[Sample] = []
    for x in xs:
        for args, kwargs in _UNARY_ARGS.get(base, [((), {})]):
            inputs: tuple = (x,)
            if Y in args or Y in kwargs.values():
                inputs = (x, _TENSOR_ARG_OF[base](gen))
            if inplace:
                fns = [name] if hasattr(torch.Tensor, name) else _functions(name)[:1]
                out += [Sample(name, fn, (X, *args), inputs, kwargs, inplace=True) for fn in fns]
            else:
                out += _spellings(name, (X, *args), kwargs, inputs)
    if not inplace and base in ("relu", "silu", "gelu", "hardswish", "elu", "leaky_relu", "relu6", "hardsigmoid",
                                "selu", "mish", "dropout"):
        fn = getattr(F, base)
        extra = (0.5, False) if base == "dropout" else ()
        out.append(Sample(name, fn, (X, *extra), (xs[0],), {"inplace": True}, inplace=True))
    return out


def _binary_inputs(name: str, gen: _Gen, n: int) -> list[tuple[tuple, dict, tuple]]:
    """(args, kwargs, inputs) of binary op ``name``: same shapes, broadcasting, scalars."""
    s = (2, 3 * n + 1, 2 * n + 2)
    L, E = s[1], s[2]
    if name in _INT_OPS:
        a, b = gen.ints(*s), gen.ints(*s)
        return [((X, Y), {}, (a, b)), ((X, Y), {}, (a, gen.ints(L, E))), ((X, 3), {}, (a,)),
                ((X, Y), {}, (gen.bools(*s), gen.bools(1, L, 1)))]
    if name in ("where",):
        c = gen.bools(*s)
        return [((X, Y, Z), {}, (c, gen.randn(*s), gen.randn(*s))), ((X, Y, Z), {}, (gen.bools(L, 1), gen.randn(*s), gen.randn(E))),
                ((X, Y, 0.0), {}, (c, gen.randn(*s)))]
    if name == "masked_fill":
        return [((X, Y, -1.5), {}, (gen.randn(*s), gen.bools(*s))), ((X, Y, 0.0), {}, (gen.randn(*s), gen.bools(L, 1)))]
    if name == "lerp":
        return [((X, Y, 0.3), {}, (gen.randn(*s), gen.randn(*s))), ((X, Y, Z), {}, (gen.randn(*s), gen.randn(E), gen.pos(*s)))]
    if name in ("addcmul", "addcdiv"):
        c = gen.nonzero(*s) if name == "addcdiv" else gen.randn(*s)
        return [((X, Y, Z), {"value": 0.5}, (gen.randn(*s), gen.randn(*s), c)), ((X, Y, Z), {}, (gen.randn(*s), gen.randn(E), c))]
    if name == "type_as":
        return [((X, Y), {}, (gen.randn(*s), gen.ints(3))), ((X, Y), {}, (gen.randn(*s), gen.randn(3, dtype=torch.float64)))]
    if name == "pow":
        base = gen.pos(*s) * 2
        return [((X, Y), {}, (base, gen.randn(*s, scale=1.0))), ((X, 2), {}, (gen.randn(*s),)), ((2.0, X), {}, (gen.randn(*s, scale=1.0),)),
                ((X, Y), {}, (base, gen.randn(E, scale=1.0)))]
    divides = name in ("truediv", "div", "floordiv", "floor_divide", "mod", "remainder")
    other = (lambda *sh: gen.nonzero(*sh) * 2) if divides else gen.randn
    a = other(*s)
    cases = [((X, Y), {}, (a, other(*s))), ((X, Y), {}, (a, other(L, E))), ((X, Y), {}, (a, other(2, 1, E))),
             ((X, 2.5), {}, (a,)), ((Y, X), {}, (a, other(L, E))), ((2.5, X), {}, (a,))]
    if name in ("add", "sub", "rsub"):
        cases += [((X, Y), {"alpha": 2}, (a, other(*s))), ((X,), {"other": 1.5}, (a,)), ((1.5, X), {}, (a,))]
    if name == "mul":
        cases += [((X, Y), {}, (a, gen.bools(*s)))]
    if name == "div":
        cases += [((X, Y), {"rounding_mode": "floor"}, (a, other(*s))), ((X, 2.0), {"rounding_mode": "trunc"}, (a,)),
                  ((X, Y), {"rounding_mode": None}, (a, other(L, E)))]
    if name in ("lt", "le", "gt", "ge", "eq", "ne"):
        cases += [((X, 0.0), {}, (a.round(),)), ((X, Y), {}, (a.round(), other(*s).round()))]
    if name in ("logical_and", "logical_or", "logical_xor"):
        cases += [((X, Y), {}, (gen.bools(*s), gen.bools(*s)))]
    return cases


def _binary(name: str, n: int, inplace: bool = False) -> list[Sample]:
    base = name[:-1] if inplace else name
    if name in ("iadd", "isub", "imul", "itruediv"):
        base, inplace = {"iadd": "add", "isub": "sub", "imul": "mul", "itruediv": "truediv"}[name], True
    gen = _Gen(name)
    out: list[Sample] = []
    for k, (args, kwargs, inputs) in enumerate(_binary_inputs(base, gen, n)):
        if inplace:
            if args[0] != X or inputs[0].dim() == 0:
                continue
            fn: Any = name if hasattr(torch.Tensor, name) else getattr(operator, name, None)
            if fn is None:
                continue
            out.append(Sample(name, fn, args, inputs, kwargs, inplace=True))
        elif k == 0:
            out += _spellings(name, args, kwargs, inputs, functions=3)
        else:
            # One spelling per further form, taking turns, keeps the case count down.
            every = _spellings(name, args, kwargs, inputs, functions=3)
            turn = every[k % len(every):] + every[:k % len(every)] if every else []
            out += [smp for smp in turn if _valid(smp)][:1]
    return out


def _valid(smp: Sample) -> bool:
    """Whether torch accepts the call on the full inputs (fx can write keywords for it too)."""
    if isinstance(smp.call, str) is False and smp.call in vars(operator).values() and smp.kwargs:
        return False
    try:
        _eager(smp)
    except Exception:  # noqa: BLE001 - torch refuses this spelling
        return False
    return True


def _complex(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    s = (2, 3 * n + 1, 3)
    if name == "view_as_complex":
        return [Sample(name, torch.view_as_complex, (X,), (gen.randn(*s, 2),))]
    if name == "view_as_real":
        return [Sample(name, torch.view_as_real, (X,), (torch.complex(gen.randn(*s), gen.randn(*s)),))]
    if name == "polar":
        return [Sample(name, torch.polar, (X, Y), (gen.pos(*s), gen.randn(*s)))]
    return [Sample(name, torch.complex, (X, Y), (gen.randn(*s), gen.randn(*s))),
            Sample(name, torch.complex, (X, Y), (gen.randn(*s), gen.randn(s[-1])))]


# --------------------------------------------------------------------------------- views

def _views(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x, y = gen.randn(2, L, E), gen.randn(2, 2 * E, E)  # y: an even token dim that splits
    S = Sample
    if name in ("view", "reshape"):
        out = []
        for shp in [(2, L, 2, E // 2), (2 * L, E), (2, L * E), (-1, E), (2, L, E)]:
            out += _spellings(name, (X, *shp), inputs=(x,), functions=0)
        out += _spellings(name, (X, (2 * L, E)), inputs=(x,))
        out += _spellings(name, (X, (2, 2, E, E)), inputs=(y,)) + _spellings(name, (X, 4 * E, E), inputs=(y,), functions=0)
        out += _spellings(name, (X, 2, E, 2, E // 2), inputs=(y,), functions=0)
        return out
    if name == "flatten":
        return (_spellings(name, (X, 1), inputs=(x,)) + _spellings(name, (X, 0, 1), inputs=(x,))
                + [S(name, "flatten", (X,), (x,)), S(name, torch.flatten, (X,), (x,), {"start_dim": 1, "end_dim": 2})])
    if name == "unflatten":
        return (_spellings(name, (X, 2, (2, E // 2)), inputs=(x,)) + _spellings(name, (X, 1, (E, 2)), inputs=(y,))
                + [S(name, "unflatten", (X, -2, (2, E)), (y,)), S(name, "unflatten", (X, 1, (L, 1)), (x,))])
    if name == "squeeze":
        z = gen.randn(2, 1, L, E)
        return (_spellings(name, (X, 1), inputs=(z,)) + [S(name, "squeeze", (X,), (z,)), S(name, torch.squeeze, (X,), (z,), {"dim": 1}),
                S(name, "squeeze", (X, (1,)), (z,))])
    if name == "unsqueeze":
        return _spellings(name, (X, 1), inputs=(x,)) + [S(name, torch.unsqueeze, (X, -1), (x,)), S(name, "unsqueeze", (X,), (x,), {"dim": 0})]
    if name in ("view_as", "reshape_as"):
        return [S(name, name, (X, Y), (x, gen.randn(2 * L, E))), S(name, name, (X, Y), (x, gen.randn(2, L, 2, E // 2))),
                S(name, name, (X, Y), (y, gen.randn(2, 2, E, E)))]
    if name == "_unsafe_view":
        return [S(name, torch.ops.aten._unsafe_view.default, (X, [2 * L, E]), (x,)),
                S(name, torch.ops.aten._unsafe_view.default, (X, [2, 2, E, E]), (y,))]
    if name == "permute":
        return (_spellings(name, (X, (2, 0, 1)), inputs=(x,)) + [S(name, "permute", (X, 1, 0, 2), (x,)),
                S(name, "permute", (X,), (x,), {"dims": [0, 2, 1]})])
    if name == "transpose":
        return _spellings(name, (X, 1, 2), inputs=(x,)) + [S(name, torch.transpose, (X, 0, -1), (x,)),
                                                           S(name, "transpose", (X,), (x,), {"dim0": 1, "dim1": 0})]
    if name in ("swapaxes", "swapdims"):
        return _spellings(name, (X, 0, 1), inputs=(x,)) + _spellings(name, (X, -1, 1), inputs=(x,))
    if name == "t":
        return _spellings(name, (X,), inputs=(gen.randn(L, E),))
    if name in ("movedim", "moveaxis"):
        return (_spellings(name, (X, 1, 0), inputs=(x,)) + _spellings(name, (X, (0, 1), (2, 0)), inputs=(x,))
                + [S(name, name, (X, -1, 0), (x,)), S(name, name, (X,), (x,), {"source": 2, "destination": 0})])
    if name == "expand":
        o = gen.randn(2, 1, E)
        return [S(name, "expand", (X, 2, L, E), (o,)), S(name, "expand", (X, (2, L, E)), (o,)),
                S(name, "expand", (X, -1, L, -1), (o,)), S(name, "expand", (X, 2, L, E), (gen.randn(L, E),)),
                S(name, "expand", (X, 3, 2, L, E), (x,))]
    if name == "expand_as":
        return [S(name, "expand_as", (X, Y), (gen.randn(2, 1, E), x)), S(name, "expand_as", (X, Y), (gen.randn(L, E), x))]
    if name == "broadcast_to":
        return _spellings(name, (X, (2, L, E)), inputs=(gen.randn(2, 1, E),)) + _spellings(name, (X, (2, L, E)), inputs=(gen.randn(L, E),))
    if name in ("repeat", "tile"):
        return (_spellings(name, (X, (1, 1, 2)), inputs=(x,)) + _spellings(name, (X, (2, 1)), inputs=(x,))
                + [S(name, name, (X, 2, 1, 1, 1), (x,)), S(name, name, (X, 1, 2, 1), (x,))])
    raise KeyError(name)


# --------------------------------------------------------------------------------- linear algebra

def _linear(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E, N = 3 * n + 1, 2 * n + 2, 2 * n + 1
    x = gen.randn(2, L, E, scale=1.0)
    S = Sample
    if name == "linear":
        w, b = gen.randn(N, E, scale=1.0), gen.randn(N, scale=1.0)
        return [S(name, F.linear, (X, Y), (x, w)), S(name, F.linear, (X, Y, Z), (x, w, b)),
                S(name, F.linear, (X,), (x, w, b), {"weight": Y, "bias": Z}),
                S(name, F.linear, (X, Y, Z), (x, gen.randn(2 * E, E, scale=1.0), gen.randn(2 * E, scale=1.0))),
                # Tensor parallel's row-parallel linear: weight split on in-features, input split
                # alike (as heads x head_dim, the same rows as the flat split), bias whole -> P.
                S(name, F.linear, (X, Y, Z), (gen.randn(2, L, 4 * n, scale=1.0), gen.randn(N, 4 * n, scale=1.0),
                                              gen.randn(N, scale=1.0)),
                  candidates={0: [Shard(2, (2 * n,), 2), Shard(2, (4 * n,))], 1: [Shard(1, (4 * n,))],
                              2: [Replicate()]})]
    if name == "matmul":
        out = []
        for a, b in [(x, gen.randn(E, N)), (x, gen.randn(2, E, N)), (gen.randn(L, E), gen.randn(2, E, N)),
                     (x, gen.randn(E)), (gen.randn(2, 1, L, E), gen.randn(3, E, N))]:
            out += _spellings(name, (X, Y), inputs=(a, b), functions=3)
        return out
    if name == "einsum":
        v = gen.randn(2, L, N, scale=1.0)
        q, k = gen.randn(2, 2, L, E, scale=1.0), gen.randn(2, 2, L, E, scale=1.0)
        return [S(name, torch.einsum, ("bsk,kd->bsd", X, Y), (x, gen.randn(E, N))),
                S(name, torch.einsum, ("bsk,bsd->bkd", X, Y), (x, v)),
                S(name, torch.einsum, ("b s k, k d -> b s d", X, Y), (x, gen.randn(E, N))),
                S(name, torch.einsum, ("...k,kd->...d", X, Y), (x, gen.randn(E, N))),
                S(name, torch.einsum, ("bij,bjk->bik", [X, Y]), (x, gen.randn(2, E, N))),
                S(name, torch.einsum, ("bhsd,bhtd->bhst", X, Y), (q, k)),
                S(name, torch.einsum, ("bsd->bd", X), (x,)),
                S(name, torch.einsum, ("bsd,bsd->bs", X, Y), (x, gen.randn(2, L, E)))]
    if name in ("outer", "ger"):
        return _spellings(name, (X, Y), inputs=(gen.randn(L), gen.randn(N)))
    if name == "bmm":
        return _spellings(name, (X, Y), inputs=(x, gen.randn(2, E, N))) + _spellings(name, (X, Y), inputs=(gen.randn(2, N, L), x))
    if name == "mm":
        return _spellings(name, (X, Y), inputs=(gen.randn(L, E), gen.randn(E, N))) + _spellings(name, (X, Y), inputs=(gen.randn(N, L), gen.randn(L, E)))
    raise KeyError(name)


# --------------------------------------------------------------------------------- norms and reductions

def _norms(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    w, b = gen.randn(E), gen.randn(E)
    S = Sample
    if name == "layer_norm":
        return [S(name, F.layer_norm, (X, (E,), Y, Z, 1e-5), (x, w, b)), S(name, F.layer_norm, (X, [E]), (x,)),
                S(name, F.layer_norm, (X, (L, E)), (x,)), S(name, F.layer_norm, (X,), (x, w), {"normalized_shape": (E,), "weight": Y}),
                S(name, torch.layer_norm, (X, [E], Y, Z), (x, w, b))]
    if name == "rms_norm":
        return [S(name, torch.rms_norm, (X, (E,), Y, 1e-6), (x, w)), S(name, F.rms_norm, (X, [E]), (x,), {"eps": 1e-6}),
                S(name, F.rms_norm, (X, (L, E)), (x,))]
    if name == "normalize":
        return [S(name, F.normalize, (X,), (x,), {"dim": 1}), S(name, F.normalize, (X,), (x,), {"p": 1.0, "dim": -1}),
                S(name, F.normalize, (X,), (x,)), S(name, F.normalize, (X, 2.0, 2), (x,))]
    out = []
    for d in (1, -1, 2):
        out += _spellings(name, (X, d), inputs=(x,))
    out.append(S(name, name, (X,), (x,), {"dim": 1}))
    if name in ("softmax", "log_softmax"):
        out += [S(name, getattr(F, name), (X,), (x,), {"dim": 1, "dtype": torch.float64})]
    return out


def _group_norm(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    H, W = 3 * n + 1, 2 * n + 2
    x, w, b = gen.randn(2, 4, H, W), gen.randn(4), gen.randn(4)
    if name == "xdit_group_norm":
        count = 2 * H * W
        return [Sample(name, halo.group_norm, (X, 2, Y, Z, 1e-5, count, OtherGroup()), (x, w, b), vary=(0,))]
    return [Sample(name, F.group_norm, (X, 2, Y, Z), (x, w, b)), Sample(name, F.group_norm, (X, 2), (x,)),
            Sample(name, F.group_norm, (X,), (x, w, b), {"num_groups": 2, "weight": Y, "bias": Z, "eps": 1e-3}),
            Sample(name, F.group_norm, (X, 1), (gen.randn(2, 3, H),)),
            Sample(name, torch.group_norm, (X, 2, Y, Z, 1e-5, False), (x, w, b))]


def _reductions(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    if name in ("all", "any"):
        x = gen.bools(2, L, E)
    forms: list[tuple[tuple, dict]] = [((X,), {}), ((X, 1), {}), ((X, -1), {}), ((X,), {"dim": 1, "keepdim": True}),
                                        ((X, 1, True), {})]
    if name in ("sum", "mean", "amax", "amin", "std", "var", "logsumexp", "norm"):
        forms += [((X, (0, 1)), {}), ((X,), {"dim": (1, 2), "keepdim": True})]
    if name in ("sum", "mean", "prod"):
        forms += [((X, 1), {"dtype": torch.float64})]
    if name in ("std", "var"):
        forms += [((X, 1, True, True), {}), ((X, 2, False, False), {}), ((X, 1), {"correction": 0, "keepdim": True})]
    if name == "norm":
        forms = [((X,), {}), ((X, 2, 1), {}), ((X,), {"p": 1, "dim": 2, "keepdim": True}), ((X,), {"dim": 1}),
                 ((X, 2.0, (1, 2)), {})]
    if name == "logsumexp":
        forms = [f for f in forms if len(f[0]) > 1 or f[1]]
    out = []
    for args, kwargs in forms:
        for smp in _spellings(name, args, kwargs, (x,)):
            tuple_out = name in ("max", "min") and (len(args) > 1 or "dim" in kwargs)
            if tuple_out:
                smp.returns = 2
            out.append(smp)
    if name == "sum":
        out += _spellings(name, (X, 1), inputs=(gen.bools(2, L, E),)) + _spellings(name, (X, 1), inputs=(gen.ints(2, L, E),))
    if name in ("max", "min"):
        out += _spellings(name, (X, Y), inputs=(x, gen.randn(2, L, E)))
    return out


# --------------------------------------------------------------------------------- cat and split

def _cat_split(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    a, a2 = gen.randn(2, L, E), gen.randn(2, L, E)
    S = Sample
    if name in ("cat", "concat", "concatenate"):
        fn = getattr(torch, name)
        t5 = gen.randn(2, n + 3, E)
        return [S(name, fn, ([X, Y], 1), (a, t5)), S(name, fn, ([X, Y], -1), (a, gen.randn(2, L, 4))),
                S(name, fn, ((X, Y), 0), (a, a2)), S(name, fn, ([Y, X],), (a, t5), {"dim": 1}),
                S(name, fn, ([X, Y, Z], 1), (a, t5, gen.randn(2, 0, E))),
                S(name, fn, ([X, Y], 1), (gen.randn(2, 2 * n, E), gen.randn(2, 2 * n, E))),
                S(name, fn, ([X, Y], -1), (a, gen.randn(2, L, 0))), S(name, fn, ([Y, X, Z], 1), (a, gen.randn(2, 0, 3), gen.randn(0))),
                S(name, fn, ([X, Y],), (a, t5), {"axis": 1}) if name == "concatenate" else S(name, fn, ([X, Y], 2), (a, a2))]
    if name == "stack":
        return [S(name, torch.stack, ([X, Y], 0), (a, a2)), S(name, torch.stack, ([X, Y],), (a, a2), {"dim": -1}),
                S(name, torch.stack, ((X, Y), 2), (a, a2)), S(name, torch.stack, ([X, Y], 1), (a, gen.randn(2, L, E)))]
    if name == "pad_sequence":
        fn = torch.nn.utils.rnn.pad_sequence
        return [S(name, fn, ([X, Y],), (gen.randn(L, E), gen.randn(L, E)), {"batch_first": True}),
                S(name, fn, ([X, Y],), (gen.randn(L, E), gen.randn(L, E))),
                S(name, fn, ([X, Y],), (gen.randn(L, E), gen.randn(n + 1, E)), {"batch_first": True})]
    forms: list[tuple[tuple, dict]]
    if name == "split":
        forms = [((X, 3, 1), {}), ((X, [n + 1, 2 * n]), {"dim": 1}), ((X, [E // 2, E // 2]), {"dim": -1}),
                 ((X, 2), {"dim": 2}), ((X, [3, L - 3], 1), {}), ((X, 1), {}), ((X, [0, L, 0], 1), {}),
                 ((X, [E, 0]), {"dim": -1})]
    elif name == "split_with_sizes":
        forms = [((X, [3, L - 3], 1), {}), ((X, [n + 1, 2 * n]), {"dim": 1}), ((X, [1, 1]), {}),
                 ((X, [3, 0, L - 3], 1), {})]
    elif name == "tensor_split":
        forms = [((X, 3, 1), {}), ((X, [0, L], 1), {}), ((X, [2, 2]), {"dim": 1}), ((X, [1]), {}),
                 ((X, 2 * L), {"dim": 1}), ((X, [3, -2], -1), {})]
    elif name == "chunk":
        forms = [((X, 2, 1), {}), ((X, 3), {"dim": 2}), ((X, 3, -2), {}), ((X, 2), {})]
    else:
        forms = [((X,), {}), ((X, 1), {}), ((X,), {"dim": 2}), ((X, -1), {})]
    out = []
    for args, kwargs in forms:
        for smp in _spellings(name, args, kwargs, (a,), functions=1):
            smp.returns = len(_eager(smp))
            out.append(smp)
    return out


def _eager(smp: Sample) -> Any:
    def sub(v: Any) -> Any:
        if isinstance(v, In):
            return smp.inputs[v.i]
        if isinstance(v, (list, tuple)):
            return type(v)(sub(x) for x in v)
        return v

    args, kwargs = sub(smp.args), {k: sub(v) for k, v in smp.kwargs.items()}
    if isinstance(smp.call, str):
        return getattr(args[0], smp.call)(*args[1:], **kwargs)
    return smp.call(*args, **kwargs)


# --------------------------------------------------------------------------------- convolution, attention

def _conv(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    H, W = 3 * n + 1, 2 * n + 2
    x2, w2, b = gen.randn(2, 3, H, W, scale=1.0), gen.randn(4, 3, 3, 3, scale=1.0), gen.randn(4, scale=1.0)
    xe = gen.randn(2, 3, 4 * n, W, scale=1.0)  # even rows: strided convolutions
    xo = gen.randn(2, 3, 4 * n + 2, W, scale=1.0)  # 2n+1 pairs of rows: uneven in whole strides
    odd = {0: [Shard(2, (2 * n + 1,), 2), Shard(2, (4 * n + 2,), 1), Shard(2, (n + 1, n), 2)]}
    S = Sample
    v0 = (0,)
    if name == "conv1d":
        x1, w1 = gen.randn(2, 3, H, scale=1.0), gen.randn(4, 3, 3, scale=1.0)
        return [S(name, F.conv1d, (X, Y, Z), (x1, w1, b), {"padding": 1}, vary=v0), S(name, F.conv1d, (X, Y), (x1, w1), vary=v0),
                S(name, F.conv1d, (X, Y, None, 2, 1), (gen.randn(2, 3, 4 * n, scale=1.0), w1), vary=v0)]
    if name == "conv2d":
        return [S(name, F.conv2d, (X, Y, Z), (x2, w2, b), {"padding": 1}, vary=v0), S(name, F.conv2d, (X, Y, Z, 2, 1), (xe, w2, b), vary=v0),
                S(name, F.conv2d, (X, Y), (x2, w2), {"padding": "same"}, vary=v0),
                S(name, F.conv2d, (X, Y), (x2, w2), {"padding": 2, "dilation": 2}, vary=v0),
                S(name, F.conv2d, (X, Y), (xe, gen.randn(4, 3, 2, 2, scale=1.0)), {"stride": 2}, vary=v0),
                S(name, F.conv2d, (X, Y), (x2, gen.randn(4, 3, 1, 1, scale=1.0)), vary=v0),
                S(name, F.conv2d, (X, Y), (x2, w2), {"padding": (1, 0)}, vary=v0),
                S(name, F.conv2d, (X, Y, Z), (x2, w2, b), {"padding": 1}, vary=(1, 2)),
                # An odd patch grid: 2n+1 patch rows of 2 latent rows, split in whole patches.
                S(name, F.conv2d, (X, Y), (xo, gen.randn(4, 3, 2, 2, scale=1.0)), {"stride": 2}, vary=v0, candidates=odd),
                S(name, F.conv2d, (X, Y, Z, 2, 1), (xo, w2, b), vary=v0, candidates=odd)]
    if name == "conv3d":
        x3, w3 = gen.randn(2, 2, H, 4, 4, scale=1.0), gen.randn(3, 2, 3, 3, 3, scale=1.0)
        return [S(name, F.conv3d, (X, Y), (x3, w3), {"padding": 1}, vary=v0)]
    if name == "_convolution":
        return [S(name, torch._convolution, (X, Y, Z, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, False, False, True, True),
                  (x2, w2, b), vary=v0)]
    if name == "convolution":
        wt = gen.randn(3, 4, 3, 3, scale=1.0)
        return [S(name, torch.convolution, (X, Y, Z, [1, 1], [1, 1], [1, 1], False, [0, 0], 1), (x2, w2, b), vary=v0),
                S(name, torch.convolution, (X, Y, None, [1, 1], [1, 1], [1, 1], True, [0, 0], 1), (x2, wt), vary=v0)]
    if name == "xdit_halo":
        return [S(name, halo.halo_exchange, (X, 2, 1, 1, OtherGroup()), (x2,))]
    raise KeyError(name)


def _attention(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, T = 3 * n + 1, n + 3
    q, k, v = (gen.randn(2, 2 * n, L, 8, scale=1.0) for _ in range(3))
    kt, vt = gen.randn(2, 2 * n, T, 8, scale=1.0), gen.randn(2, 2 * n, T, 8, scale=1.0)
    fn = F.scaled_dot_product_attention
    seq = Shard(2, (L,), 1)
    seg = Shard(2, (n + 1, L - n - 1), 1)
    qkv = {0: [seq, seg, Shard(0, (2,), 1), Shard(1, (2 * n,), 1)], 1: [seq, seg, Shard(0, (2,), 1)],
           2: [seq, seg, Shard(0, (2,), 1)]}
    S = Sample
    out = [S(name, fn, (X, Y, Z), (q, k, v), candidates=qkv), S(name, fn, (X, Y, Z), (q, k, v), candidates=qkv, attention="ring"),
           S(name, fn, (), (q, k, v), {"query": X, "key": Y, "value": Z, "scale": 0.5}, candidates=qkv),
           S(name, fn, (X, Y, Z), (q, kt, vt), vary=(0,)),
           S(name, fn, (X, Y, Z), (q, k, v), {"is_causal": True}, candidates=qkv)]
    mask = gen.bools(2, 1, L, L) | torch.eye(L, dtype=torch.bool)
    out.append(S(name, fn, (X, Y, Z, In(3)), (q, k, v, mask),
                 candidates={**qkv, 3: [Shard(2, (L,), 1), Shard(0, (2,), 1)]}))
    out.append(S(name, fn, (X, Y, Z), (q, kt, vt, gen.randn(2, 1, L, T, scale=1.0)), {"attn_mask": In(3)}, vary=(0, 3)))
    return out


# --------------------------------------------------------------------------------- indexing

def _indexing(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    S = Sample
    sl = slice
    if name == "getitem":
        idx = [(sl(None), sl(2, 5)), (sl(None), None), (Ellipsis, 0), (sl(None), 1), 0, (sl(None), sl(None, 3)),
               (sl(None), sl(None, None, 2)), (sl(1, None), sl(None), sl(None, 4)), (sl(None), sl(-3, None)),
               (sl(None), None, Ellipsis, sl(2, None)), (sl(None), sl(None, n + 1)),
               (sl(None), sl(L, None)), (Ellipsis, sl(E, None)), (sl(None), sl(3, 3)), (sl(None), sl(1, -1))]
        out = [S(name, operator.getitem, (X, i), (x,)) for i in idx]
        out.append(S(name, operator.getitem, (X, (sl(None), Y)), (x, torch.tensor([0, 2, 1]))))
        out.append(S(name, operator.getitem, (X, Y), (x, gen.bools(2, L, E))))
        return out
    if name == "setitem":
        return [S(name, operator.setitem, (X, (sl(None), sl(2, 5)), Y), (x, gen.randn(2, 3, E)), inplace=True, returns="arg0"),
                S(name, operator.setitem, (X, (Ellipsis, 0), 1.0), (x,), inplace=True, returns="arg0"),
                S(name, operator.setitem, (X, (sl(None), sl(None), sl(0, E, 2)), Y), (x, gen.randn(2, L, E // 2)), inplace=True, returns="arg0"),
                S(name, operator.setitem, (X, (sl(None), sl(None, n + 1)), Y), (x, gen.randn(2, n + 1, E)), inplace=True, returns="arg0"),
                S(name, operator.setitem, (X, (sl(None), sl(None), sl(None, 2)), Y), (x, gen.randn(L, 2)), inplace=True, returns="arg0"),
                S(name, operator.setitem, (X, Y, 0.0), (x, gen.bools(2, L, E)), inplace=True, returns="arg0")]
    if name == "narrow":
        return (_spellings(name, (X, 1, 2, 3), inputs=(x,)) + _spellings(name, (X, 2, 0, 3), inputs=(x,))
                + [S(name, "narrow", (X, 1, 0, n + 1), (x,)), S(name, "narrow", (X, 1, -3, 2), (x,)),
                   S(name, "narrow", (X, -2, n + 1, L - n - 1), (x,)), S(name, "narrow", (X, 1, 2, 0), (x,)),
                   S(name, "narrow", (X, 1, 1, L - 2), (x,))])
    if name == "index_select":
        i3 = torch.tensor([0, 2, 1])
        return _spellings(name, (X, 1, Y), inputs=(x, i3)) + _spellings(name, (X, 2, Y), inputs=(x, i3))
    if name == "select":
        return _spellings(name, (X, 1, 2), inputs=(x,)) + [S(name, torch.select, (X, 2, -1), (x,)),
                                                           S(name, "select", (X,), (x,), {"dim": 0, "index": 1})]
    if name == "repeat_interleave":
        return (_spellings(name, (X, 2), {"dim": 1}, (x,)) + [S(name, torch.repeat_interleave, (X, 2, 2), (x,)),
                S(name, "repeat_interleave", (X, 2), (x,)), S(name, "repeat_interleave", (X, Y), (x, torch.tensor([1, 2])), {"dim": 0})])
    if name == "flip":
        return [S(name, "flip", (X, 2, 1), (x,)), S(name, "flip", (X, 1), (x,)), S(name, torch.flip, (X, [0, 2]), (x,)),
                S(name, torch.flip, (X,), (x,), {"dims": (1,)}), S(name, "flip", (X, -1), (x,)), S(name, "flip", (X, (1, 2)), (x,)),
                S(name, "flip", (X, 0, 2), (x,))]
    if name == "embedding":
        idx, w = gen.ints(2, L, low=0, high=10), gen.randn(10, E)
        return [S(name, F.embedding, (X, Y), (idx, w), partial=False), S(name, torch.embedding, (Y, X), (idx, w), partial=False),
                S(name, F.embedding, (X, Y), (gen.ints(L, low=0, high=10), w), partial=False)]
    if name == "pad":
        return [S(name, F.pad, (X, (1, 1)), (x,)), S(name, F.pad, (X, (0, 0, 1, 2)), (x,)),
                S(name, F.pad, (X, [1, 1]), (x,), {"mode": "reflect"}), S(name, F.pad, (X,), (x,), {"pad": (1, 1), "value": 2.0}),
                S(name, F.pad, (X, (1, 1, 0, 0, 1, 0)), (x,))]
    if name == "copy_":  # written in place: the graph feeds a clone of in0 (a view of q in RoPE code)
        return [S(name, "copy_", (X, Y), (x, gen.randn(2, L, E)), inplace=True),
                S(name, torch.Tensor.copy_, (X, Y), (x, gen.randn(L, E)), inplace=True),
                S(name, "copy_", (X, Y), (x, gen.randn(2, 1, E)), inplace=True),
                S(name, "copy_", (X, Y), (x, gen.randn(2, L, E, dtype=torch.float64)), inplace=True),
                S(name, "copy_", (X, Y), (x, gen.randn(2, L, E)), {"non_blocking": False}, inplace=True),
                S(name, "copy_", (X, Y), (gen.randn(L, E), gen.randn(E)), inplace=True)]
    if name == "fill_":
        return [S(name, "fill_", (X, 2.5), (x,), inplace=True),
                S(name, torch.Tensor.fill_, (X, Y), (x, torch.tensor(1.5)), inplace=True),
                S(name, torch.fill_, (X, -1.0), (x,), inplace=True)]
    if name == "zero_":
        return [S(name, "zero_", (X,), (x,), inplace=True), S(name, torch.zero_, (X,), (x,), inplace=True)]
    raise KeyError(name)


def _roll(name: str, n: int) -> list[Sample]:
    """Shifts smaller and larger than a shard, negative, past the length, on one or two dims."""
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    grid = gen.randn(2, 2 * n + 2, 2 * n, 3)  # (B, H, W, C): Swin's shifted windows
    S = Sample
    if name == "xdit_roll":
        return [S(name, halo.roll_exchange, (X, 1, 2, [L], OtherGroup()), (x,)),
                S(name, halo.roll_exchange, (X, 2, -1, [E], OtherGroup()), (x,))]
    return [S(name, torch.roll, (X, 1, 1), (x,)), S(name, "roll", (X, (1, 2), (0, 2)), (x,)),
            S(name, "roll", (X,), (x,), {"shifts": 2, "dims": -1}), S(name, "roll", (X, 3), (x,)),
            S(name, torch.roll, (X, (1, 1), (2, 1)), (x,)), S(name, torch.roll, (X, -2, 1), (x,)),
            S(name, "roll", (X, 2 * n + 1, 1), (x,)), S(name, "roll", (X, -(4 * n + 3), -2), (x,)),
            S(name, "roll", (X, L, 1), (x,)), S(name, torch.roll, (X,), (x,), {"shifts": (3, -1), "dims": (1, 1)}),
            S(name, torch.roll, (X, (-1, -1), (1, 2)), (grid,)), S(name, "roll", (X, (n + 1, 1), (1, 2)), (grid,)),
            S(name, "roll", (X, 1, 1), (gen.randn(2, max(n - 1, 1), 3),)),  # a rank with no rows
            S(name, "roll", (X, 2 * n + 1, 1), (gen.randn(2, 4 * n, 3),),
              candidates={0: [Shard(1, (2 * n,), 2), Shard(1, (n, 3 * n), 1)]})]


# --------------------------------------------------------------------------------- factories, runtime ops, resampling

def _factory(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    S = Sample
    if name in ("new_zeros", "new_ones", "new_empty"):
        exact = name != "new_empty"
        return [S(name, name, (X, (3, 4)), (x,), exact=exact), S(name, name, (X, 3, 4), (x,), exact=exact),
                S(name, name, (X, (2,)), (x,), {"dtype": torch.int64}, exact=exact)]
    if name == "new_full":
        return [S(name, name, (X, (3, 4), 1.5), (x,))]
    if name == "new_tensor":
        return [S(name, name, (X, [1.0, 2.0]), (x,)), S(name, name, (X, Y), (x, gen.randn(2, L, E)), vary=(1,))]
    if name in ("tensor", "as_tensor"):
        fn = getattr(torch, name)
        return [S(name, fn, (X,), (x,)), S(name, fn, (X,), (x,), {"dtype": torch.float64})]
    fn = getattr(torch, name)
    exact = name not in ("empty_like", "rand_like", "randn_like")
    if name == "full_like":
        return [S(name, fn, (X, 2.0), (x,)), S(name, fn, (X,), (x,), {"fill_value": 1, "dtype": torch.int64})]
    return [S(name, fn, (X,), (x,), exact=exact), S(name, fn, (X,), (x,), {"dtype": torch.float64}, exact=exact)]


def _runtime(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    if name == "xdit_slice":
        return [Sample(name, rt.shard_slice, (X, 0, ((0, 1),)), (x,)), Sample(name, rt.shard_slice, (X, 2, ((0, 1), (3, 2))), (x,))]
    if name == "xdit_grad_sync":
        return [Sample(name, rt.grad_sync, (X, OtherGroup()), (x,))]
    if name == "xdit_gather":
        return [Sample(name, rt.gather, (X, 0, [2], OtherGroup(), None), (x,)),
                Sample(name, rt.gather, (X, 2, [E], OtherGroup(), [(0, E, 0)]), (x,))]
    if name in ("ulysses_attention", "ring_attention"):
        from ..runtime import attention as ra

        H, S, D = 2 * n, 3, 4
        q, k, v = (gen.randn(2, H, S, D, scale=1.0) for _ in range(3))
        mask = gen.randn(2, H, S, S, scale=1.0)
        sizes = {"q_sizes": [S], "kv_sizes": [S]} if name == "ulysses_attention" else {"kv_sizes": [S]}
        fn = ra.ulysses_attention if name == "ulysses_attention" else ra.ring_attention
        return [Sample(name, fn, (X, Y, Z), (q, k, v), {"group": OtherGroup(), **sizes}),
                Sample(name, fn, (X, Y, Z), (q, k, v, mask), {"group": OtherGroup(), **sizes, "mask": In(3)})]
    return [Sample(name, rt.all_reduce, (X, OtherGroup()), (x,))]


def _resample(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    H, W = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, 3, H, W)
    x1, x3 = gen.randn(2, 3, H), gen.randn(2, 2, H, 3, 2)
    S = Sample
    if name == "interpolate":
        fn = F.interpolate
        return [S(name, fn, (X,), (x,), {"scale_factor": 2, "mode": "nearest"}), S(name, fn, (X,), (x,), {"size": (2 * H, 2 * W)}),
                S(name, fn, (X,), (x,), {"scale_factor": (2, 3), "mode": "nearest-exact"}),
                S(name, fn, (X, None, 2.0, "bilinear"), (x,)), S(name, fn, (X,), (x1,), {"scale_factor": 3}),
                S(name, fn, (X, (3 * H, W)), (x,)), S(name, fn, (X,), (x,), {"scale_factor": 1.5})]
    if name in ("upsample", "upsample_nearest"):
        return [S(name, getattr(F, name), (X,), (x,), {"scale_factor": 2}), S(name, getattr(F, name), (X,), (x,), {"size": (2 * H, W)})]
    aten = getattr(torch.ops.aten, name)
    dims = int(name[-2])
    inp = {1: x1, 2: x, 3: x3}[dims]
    size = [2 * s for s in inp.shape[2:]]
    return [S(name, aten.default, (X, size), (inp,)), S(name, aten.vec, (X, None, [2.0] * dims), (inp,))]


# --------------------------------------------------------------------------------- dispatch

def samples_for(name: str, n: int) -> list[Sample]:
    """Every sample of op ``name`` for a world of ``n`` ranks (an empty list if it has none)."""
    from ..rules import cat_split, conv, factory, linear, norm, pointwise, reduction, resample, view

    if name in ("polar", "complex", "view_as_complex", "view_as_real"):
        return _complex(name, n)
    if name in pointwise.UNARY:
        return _unary(name, n)
    if name in pointwise.BINARY:
        return _binary(name, n)
    if name in pointwise.INPLACE:
        base = name[:-1]
        if name in ("iadd", "isub", "imul", "itruediv") or base in pointwise.BINARY:
            return _binary(name, n, inplace=True)
        return _unary(name, n, inplace=True)
    if name in view.RESHAPES + view.PERMUTES + view.EXPANDS + ["repeat", "tile"]:
        return _views(name, n)
    if name in {nm for names, _ in linear.TABLE for nm in names}:
        return _linear(name, n)
    if name in {nm for names, _ in norm.TABLE for nm in names}:
        return _norms(name, n)
    if name in ("group_norm", "xdit_group_norm"):
        return _group_norm(name, n)
    if name in {nm for names, _ in reduction.TABLE for nm in names}:
        return _reductions(name, n)
    if name in {nm for names, _ in cat_split.TABLE for nm in names}:
        return _cat_split(name, n)
    if name in {nm for names, _ in conv.TABLE for nm in names}:
        return _conv(name, n)
    if name == "scaled_dot_product_attention":
        return _attention(name, n)
    if name in ("roll", "xdit_roll"):
        return _roll(name, n)
    if name in ("getitem", "setitem", "narrow", "index_select", "select", "repeat_interleave", "flip",
                "embedding", "pad", "copy_", "fill_", "zero_"):
        return _indexing(name, n)
    if name in factory.LIKE or name in ("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "tensor", "as_tensor"):
        return _factory(name, n)
    if name in ("xdit_slice", "xdit_gather", "xdit_all_reduce", "xdit_grad_sync", "ulysses_attention",
                "ring_attention"):
        return _runtime(name, n)
    if name in resample.INTERPOLATE + resample.ATEN_NEAREST:
        return _resample(name, n)
    if name == "diag_embed":
        return _diag_embed(name, n)
    return []


def _diag_embed(name: str, n: int) -> list[Sample]:
    gen = _Gen(name)
    L, E = 3 * n + 1, 2 * n + 2
    x = gen.randn(2, L, E)
    S = Sample
    return [*_spellings(name, (X,), {}, (x,)), S(name, torch.diag_embed, (X, 1), (x,)),
            S(name, torch.diag_embed, (X,), (x,), {"dim1": 0, "dim2": 2}),
            S(name, torch.diag_embed, (X, -1, 1, 3), (x,)), S(name, "diag_embed", (X,), (gen.randn(L, E),))]


__all__ = ["In", "OtherGroup", "Sample", "samples_for"]
