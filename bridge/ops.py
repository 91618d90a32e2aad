"""The one registry of operations a graph may use.

Each op has a name, the callable the server runs (always one of *our* literal references to a
torch function, never looked up by a name from the wire), an argument signature checked
before anything runs, a cost model (``hookwire.op_costs``: the flops and the transient bytes
the op will cost, computed from shapes before it runs) and the client-side torch callables
that trace to it.

Signatures are written in the argument-kind language of :mod:`hookwire.ir.kinds` (``"t,ii|b"``:
a tensor, an int or tuple of ints, optionally a bool), the one place its codes are defined
and documented. The special ops (``site.read`` & co.) are a table of the same shape beside
this one: :data:`hookwire.ir.special.SPECIAL_OPS`.

Index-taking ops (``gather``, ``scatter*``, ``index_*``, advanced indexing, ``one_hot``,
losses with class targets) check their indices' range before the kernel runs: on CUDA an
out-of-range index is a device-side assert that poisons the process's CUDA context for every
user, not an exception.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from hookwire.ir.kinds import check_args, kind_matches, parse_signature
from hookwire.op_costs import (FREE, Copy, CostModel, Decomposed, Formula, Linalg, Pointwise,
                               Reduction, Sorting)
from hookwire.op_formulas import (bucketize_cost, cdist_cost, diff_cost, fft_cost,
                                  indexing_cost, norm_cost, setitem_cost)
from hookwire.random import seeded_rand_like, seeded_randn_like

T = torch.Tensor


@dataclass
class OpSpec:
    """One registered op: its wire ``name``, the torch callable the server runs (``fn``, one
    of our own literal references), its argument signature (``required``/``optional``/
    ``varargs``/``kwargs`` in the kind codes of :mod:`hookwire.ir.kinds`, checked by
    ``check_args``), its cost model, the client-side torch callables that trace to it
    (``clients``), and whether it returns a tuple (``multi_output``: unpacked with
    ``tuple_get``) or a shape that depends on values (``data_dependent``)."""
    name: str
    fn: Callable
    required: tuple[str, ...]
    optional: tuple[str, ...]
    varargs: str | None
    kwargs: dict[str, str]
    cost: CostModel
    clients: list = field(default_factory=list)
    multi_output: bool = False
    # The result's shape may depend on the values of small real constants (boolean masks).
    data_dependent: bool = False


OPS: dict[str, OpSpec] = {}
CLIENT_OPS: dict[Callable, str] = {}     # torch callable -> op name (client tracing)


def op(name: str, fn: Callable, sig: str, *, cost: CostModel, clients=(), multi_output=False,
       data_dependent=False, **kwargs: str):
    """Register an op. ``cost`` is required: an op whose cost cannot be computed from its
    shapes before it runs has no place in the registry."""
    if not isinstance(cost, CostModel):
        raise TypeError(f"op {name!r}: cost must be a hookwire.op_costs.CostModel")
    required, optional, varargs = parse_signature(sig)
    spec = OpSpec(name, fn, required, optional, varargs, dict(kwargs), cost, list(clients),
                  multi_output, data_dependent)
    OPS[name] = spec
    return spec


def _auto_clients(name: str, *extra):
    out = list(extra)
    for ns in (torch, T, F):
        f = getattr(ns, name, None)
        if f is not None and callable(f):
            out.append(f)
    return out


# ---- index range checks (before any kernel sees an index) ------------------------------------

def check_index_range(index, size: int, what: str, negative: bool):
    """Refuse indices outside ``[0, size)`` (or ``[-size, size)``) before the kernel runs.
    Meta tensors (shape inference) carry no values and pass."""
    if not isinstance(index, torch.Tensor) or index.device.type == "meta" or \
            index.numel() == 0 or index.dtype is torch.bool or index.is_floating_point():
        return
    lo, hi = torch.aminmax(index)
    lo, hi = int(lo), int(hi)
    low = -size if negative else 0
    if lo < low or hi >= size:
        bad = lo if lo < low else hi
        raise IndexError(f"{what}: index {bad} is out of range for size {size}")


def _dim_of(x: torch.Tensor, dim: int) -> int:
    return x.shape[dim % x.dim()] if x.dim() else 1


def _gather(x, dim, index, *, sparse_grad=False):
    check_index_range(index, _dim_of(x, dim), "gather", negative=False)
    return torch.gather(x, dim, index)


def _scatter(x, dim, index, src=None, *, value=None, reduce=None):
    check_index_range(index, _dim_of(x, dim), "scatter", negative=False)
    src = value if src is None else src
    return torch.scatter(x, dim, index, src) if reduce is None else \
        torch.scatter(x, dim, index, src, reduce=reduce)


def _scatter_add(x, dim, index, src):
    check_index_range(index, _dim_of(x, dim), "scatter_add", negative=False)
    return torch.scatter_add(x, dim, index, src)


def _scatter_reduce(x, dim, index, src, reduce, *, include_self=True):
    check_index_range(index, _dim_of(x, dim), "scatter_reduce", negative=False)
    return torch.scatter_reduce(x, dim, index, src, reduce, include_self=include_self)


def _index_select(x, dim, index):
    check_index_range(index, _dim_of(x, dim), "index_select", negative=False)
    return torch.index_select(x, dim, index)


def _index_add(x, dim, index, source, *, alpha=1):
    check_index_range(index, _dim_of(x, dim), "index_add", negative=False)
    return torch.index_add(x, dim, index, source, alpha=alpha)


def _as_index(item):
    """A (nested) list of ints or bools indexes as the tensor torch makes of it."""
    if isinstance(item, list):
        try:
            return torch.as_tensor(item)
        except (TypeError, ValueError, RuntimeError):
            return item
    return item


def _check_advanced_index(x: torch.Tensor, index):
    """Range-check the integer tensors of an indexing expression against the dims they
    index (a bool mask consumes as many dims as it has; None adds one; ... fills)."""
    items = tuple(_as_index(i) for i in (index if isinstance(index, tuple) else (index,)))
    consumed = [1 if not isinstance(i, torch.Tensor) or i.dtype is not torch.bool else
                max(i.dim(), 1) for i in items if i is not None and i is not Ellipsis]
    dim = 0
    for i in items:
        if i is None:
            continue
        if i is Ellipsis:
            dim += x.dim() - sum(consumed)
            continue
        if isinstance(i, torch.Tensor) and i.dtype is not torch.bool:
            check_index_range(i, x.shape[dim] if dim < x.dim() else 0, "index", negative=True)
            dim += 1
        elif isinstance(i, torch.Tensor):
            dim += max(i.dim(), 1)
        else:
            dim += 1


def _getitem(x, index):
    _check_advanced_index(x, index)
    return x[index]


def _setitem(x, index, value):
    # Functional index assignment: the traced program never mutates a value another node
    # may still read. (The executor may skip the clone when it owns the value.)
    _check_advanced_index(x, index)
    out = x.clone()
    out[index] = value
    return out


def _index_put(x, indices=(), values=None, accumulate=False):
    _check_advanced_index(x, tuple(indices))
    return torch.index_put(x, tuple(indices), values, accumulate)


def _one_hot(x, num_classes=-1):
    if num_classes >= 0:
        check_index_range(x, num_classes, "one_hot", negative=False)
    return F.one_hot(x, num_classes)


def _check_targets(input, target, ignore_index):
    if isinstance(target, torch.Tensor) and not target.is_floating_point():
        classes = input.shape[1] if input.dim() > 1 else input.shape[0]
        kept = target if target.device.type == "meta" else target[target != ignore_index]
        check_index_range(kept, classes, "class target", negative=False)


def _cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                   reduce=None, reduction="mean", label_smoothing=0.0):
    _check_targets(input, target, ignore_index)
    return F.cross_entropy(input, target, weight, size_average, ignore_index, reduce,
                           reduction, label_smoothing)


def _nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
              reduction="mean"):
    _check_targets(input, target, ignore_index)
    return F.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
          enable_gqa=False):
    if dropout_p != 0:
        raise ValueError("dropout_p must be 0: attention dropout draws random numbers that "
                         "cannot equal a local run's")
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask,
                                          is_causal=is_causal, scale=scale,
                                          enable_gqa=enable_gqa)


# ---- other server implementations that are not a single torch call ---------------------------

def _copy_into(x, src):
    return (src if isinstance(src, torch.Tensor) else torch.tensor(src)).to(
        dtype=x.dtype, device=x.device).expand_as(x).clone()


def _to_dtype(x, dtype, *_ignored, **_kw):
    return x.to(dtype)


def _tuple_get(values, k):
    return values[k]


def _T(x):
    return x.T


def _mT(x):
    return x.mT


def _real(x):
    return x.real


def _imag(x):
    return x.imag


def _new_empty(x, *size, dtype=None):
    # Never hand out uninitialised memory: it may hold another user's activations.
    return x.new_zeros(*size, dtype=dtype)


def _empty_like(x, *, dtype=None):
    return torch.zeros_like(x, dtype=dtype)


# ---- elementwise ---------------------------------------------------------------------------

TRANSCENDENTAL = 4  # flops per element charged for exp, log, trig, erf, pow...
# Division with a remainder (fmod, remainder, floor_divide) of extreme operands (3e38 by
# 1.5e-38, inf, nan) takes a slow path: 23-30x an add per element on CPU, as much as
# transcendental functions (bench/bench_op_time.py).
_DIVISION_FAMILY = ("floor_divide", "remainder", "fmod", "rmod", "rfloordiv")

_ADD_LIKE = ("t,tn", dict(alpha="n"))
for _name in ("add", "sub"):
    op(_name, getattr(T, _name), _ADD_LIKE[0], cost=Pointwise(),
       clients=_auto_clients(_name), **_ADD_LIKE[1])
OPS["add"].clients += [T.__add__, T.__radd__]
OPS["sub"].clients += [T.__sub__]
for _name in ("mul", "div", "true_divide", "floor_divide", "remainder", "pow", "maximum",
              "minimum", "fmod", "atan2", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
              "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "rsub",
              "hypot", "xlogy"):
    extra = dict(rounding_mode="s?") if _name == "div" else {}
    k = TRANSCENDENTAL if _name in ("pow", "atan2", "hypot", "xlogy") + _DIVISION_FAMILY \
        else 1
    op(_name, getattr(torch, _name), "t,tn", cost=Pointwise(k), clients=_auto_clients(_name),
       **extra)
# Operator dunders trace to the op with the same meaning.
for _dunder, _name in {T.__mul__: "mul", T.__rmul__: "mul", T.__truediv__: "div",
                       T.__floordiv__: "floor_divide", T.__mod__: "remainder",
                       T.__pow__: "pow", T.__eq__: "eq", T.__ne__: "ne", T.__lt__: "lt",
                       T.__le__: "le", T.__gt__: "gt", T.__ge__: "ge"}.items():
    OPS[_name].clients.append(_dunder)
for _name, _fn in (("rtruediv", T.__rtruediv__), ("rfloordiv", T.__rfloordiv__),
                   ("rpow", T.__rpow__), ("rmod", T.__rmod__),
                   ("and", T.__and__), ("or", T.__or__), ("xor", T.__xor__),
                   ("rand", T.__rand__), ("ror", T.__ror__), ("rxor", T.__rxor__)):
    # x.__rtruediv__(y) is y * reciprocal(x): a result-sized temporary
    op(_name, _fn, "t,tn", cost=Pointwise(TRANSCENDENTAL if _name in ("rpow",) +
                                          _DIVISION_FAMILY else 1,
                                          temps=1 if _name == "rtruediv" else 0),
       clients=[_fn])
OPS["rsub"].clients.append(T.__rsub__)

_UNARY_K = dict.fromkeys(("exp", "exp2", "log", "log2", "log10", "sqrt", "rsqrt", "sin", "cos",
                          "tanh", "sigmoid", "log1p", "expm1", "erf", "reciprocal"),
                         TRANSCENDENTAL)
for _name in ("neg", "abs", "exp", "exp2", "log", "log2", "log10", "sqrt", "rsqrt", "sin",
              "cos", "tanh", "sigmoid", "relu", "sign", "square", "log1p", "expm1",
              "reciprocal", "floor", "ceil", "trunc", "frac", "logical_not", "bitwise_not",
              "isnan", "isinf", "isfinite", "erf", "signbit", "zeros_like", "ones_like"):
    kw = dict(dtype="d?") if _name in ("zeros_like", "ones_like") else {}
    # isinf is abs then a comparison; isfinite two comparisons and a product.
    temps = {"isinf": 1, "isfinite": 2}.get(_name, 0)
    fn = getattr(T, _name, None) or getattr(torch, _name)
    op(_name, fn, "t", cost=Pointwise(_UNARY_K.get(_name, 1), temps=temps),
       clients=_auto_clients(_name), **kw)
OPS["neg"].clients.append(T.__neg__)
OPS["abs"].clients.append(T.__abs__)
OPS["bitwise_not"].clients.append(T.__invert__)
op("empty_like", _empty_like, "t", cost=Pointwise(), clients=[torch.empty_like], dtype="d?")
op("round", torch.round, "t", cost=Pointwise(), clients=_auto_clients("round"), decimals="i")
op("nan_to_num", torch.nan_to_num, "t|n?,n?,n?", cost=Pointwise(),
   clients=_auto_clients("nan_to_num"), nan="n?", posinf="n?", neginf="n?")
op("clamp", torch.clamp, "t|tn?,tn?", cost=Pointwise(2),
   clients=_auto_clients("clamp", torch.clip, T.clip), min="tn?", max="tn?")
for _name in ("clamp_min", "clamp_max"):
    op(_name, getattr(torch, _name), "t,tn", cost=Pointwise(), clients=_auto_clients(_name))
# lerp: torch's own kernel (a + w * (b - a) by hand rounds differently near w = 1);
# addcmul / addcdiv: x + value * t1 * t2 (or / t2) in one kernel.
op("lerp", torch.lerp, "t,t,tn", cost=Pointwise(3), clients=_auto_clients("lerp"))
for _name in ("addcmul", "addcdiv"):
    op(_name, getattr(torch, _name), "t,t,t", cost=Pointwise(3), clients=_auto_clients(_name),
       value="n")
op("full_like", torch.full_like, "t|n", cost=Pointwise(), clients=[torch.full_like],
   fill_value="n", dtype="d?")
op("gelu", F.gelu, "t", cost=Pointwise(2 * TRANSCENDENTAL), clients=[F.gelu], approximate="s")
op("silu", F.silu, "t", cost=Pointwise(TRANSCENDENTAL), clients=[F.silu])
op("softplus", F.softplus, "t|n,n", cost=Pointwise(2 * TRANSCENDENTAL), clients=[F.softplus],
   beta="n", threshold="n")
op("leaky_relu", F.leaky_relu, "t|n", cost=Pointwise(), clients=[F.leaky_relu],
   negative_slope="n")
op("masked_fill", torch.masked_fill, "t|t,tn", cost=Pointwise(),
   clients=_auto_clients("masked_fill"), mask="t", value="tn")
op("where", torch.where, "t|tn,tn", cost=Pointwise(), clients=[torch.where], input="tn",
   other="tn")
op("angle", torch.angle, "t", cost=Pointwise(TRANSCENDENTAL, temps=2),
   clients=_auto_clients("angle"))

# Casts and copies: the result written once.
for _name in ("clone", "contiguous", "float", "double", "half", "bfloat16", "int", "long",
              "bool"):
    fn = getattr(T, _name, None) or getattr(torch, _name)
    op(_name, fn, "t", cost=Copy(), clients=_auto_clients(_name),
       **(dict(memory_format="any") if _name == "clone" else {}))
op("to", _to_dtype, "t,d", cost=Copy(), clients=[])
op("type_as", T.type_as, "t,t", cost=Copy(), clients=_auto_clients("type_as"))
op("copy", _copy_into, "t,tn", cost=Copy(temps=1), clients=[])
for _name in ("new_zeros", "new_ones"):
    op(_name, getattr(T, _name), "t,*ii", cost=Copy(), clients=[getattr(T, _name)],
       dtype="d?")
op("new_empty", _new_empty, "t,*ii", cost=Copy(), clients=[T.new_empty], dtype="d?")
op("new_full", T.new_full, "t,ii,n", cost=Copy(), clients=[T.new_full], dtype="d?",
   fill_value="n")
# Generated on a CPU generator, then moved to the activation's device: a result-sized
# host buffer on the way.
op("randn_like", seeded_randn_like, "t", cost=Copy(temps=1), clients=[], seed="i", dtype="d?")
op("rand_like", seeded_rand_like, "t", cost=Copy(temps=1), clients=[], seed="i", dtype="d?")

# Views: no work, no memory.
op("T", _T, "t", cost=FREE, clients=[T.T.__get__])
op("mT", _mT, "t", cost=FREE, clients=[T.mT.__get__])
for _name in ("detach", "positive", "t", "conj"):
    op(_name, getattr(T, _name), "t", cost=FREE, clients=_auto_clients(_name))
op("real", _real, "t", cost=FREE, clients=[torch.real, T.real.__get__])
op("imag", _imag, "t", cost=FREE, clients=[torch.imag, T.imag.__get__])
op("view_as_real", torch.view_as_real, "t", cost=FREE, clients=[torch.view_as_real])

# ---- reductions and scans ------------------------------------------------------------------

for _name in ("sum", "mean", "nansum", "prod", "amax", "amin", "all", "any"):
    op(_name, getattr(torch, _name), "t|ii?,b",
       cost=Reduction(into_result=_name not in ("amax", "amin"), widen_half=_name == "mean"),
       clients=_auto_clients(_name), dim="ii?", keepdim="b", dtype="d?")
# count_nonzero compares with zero first (a bool copy) and sums that into int64; logsumexp
# subtracts the max and exponentiates (two input-sized buffers).
op("count_nonzero", torch.count_nonzero, "t|ii?", cost=Reduction(scratch=9),
   clients=_auto_clients("count_nonzero"), dim="ii?")
op("logsumexp", torch.logsumexp, "t|ii,b", cost=Reduction(TRANSCENDENTAL, copies=2),
   clients=_auto_clients("logsumexp"), dim="ii", keepdim="b")
for _name in ("argmax", "argmin"):
    op(_name, getattr(torch, _name), "t|i?,b", cost=Reduction(copies=1),
       clients=_auto_clients(_name), dim="i?", keepdim="b")
for _name in ("var", "std"):
    op(_name, getattr(torch, _name), "t|ii?,b,b", cost=Reduction(3, copies=1),
       clients=_auto_clients(_name), dim="ii?", keepdim="b", unbiased="b", correction="n?")
for _name in ("max", "min"):
    # max(x) -> tensor; max(x, dim) -> (values, indices); max(x, other) -> tensor.
    op(_name, getattr(torch, _name), "t|tn,b", cost=Reduction(copies=1),
       clients=_auto_clients(_name), dim="i", keepdim="b", multi_output=True)
for _name in ("cumsum", "cumprod"):
    op(_name, getattr(torch, _name), "t|i", cost=Reduction(into_result=True),
       clients=_auto_clients(_name), dim="i", dtype="d?")
for _name in ("softmax", "log_softmax"):
    op(_name, getattr(torch, _name), "t|i,d?",
       cost=Decomposed(getattr(torch, _name), twin_checked=True),
       clients=_auto_clients(_name), dim="i", dtype="d?")

# Norms: a reduction, or an SVD for the nuclear and spectral matrix norms.
op("norm", torch.norm, "t|nps?,ii?,b",
   cost=Formula(norm_cost("norm"), "SVD for p='nuc', else a reduction"),
   clients=_auto_clients("norm"), p="nps?", dim="ii?", keepdim="b", dtype="d?")
op("vector_norm", torch.linalg.vector_norm, "t|n,ii?,b",
   cost=Formula(norm_cost("vector"), "reduction"),
   clients=[torch.linalg.vector_norm], ord="n", dim="ii?", keepdim="b", dtype="d?")
op("matrix_norm", torch.linalg.matrix_norm, "t|nps,ii,b",
   cost=Formula(norm_cost("matrix"), "SVD for ord 2, -2, 'nuc'; else a reduction"),
   clients=[torch.linalg.matrix_norm], ord="nps", dim="ii", keepdim="b", dtype="d?")
op("linalg_norm", torch.linalg.norm, "t|nps?,ii?,b",
   cost=Formula(norm_cost("linalg"), "SVD for matrix ord 2, -2, 'nuc'; else a reduction"),
   clients=[torch.linalg.norm], ord="nps?", dim="ii?", keepdim="b", dtype="d?")

# Sorting and order statistics.
op("topk", torch.topk, "t|i,i,b,b", cost=Sorting(dim_arg=2, select=True, twin_checked=False),
   clients=_auto_clients("topk"),
   k="i", dim="i", largest="b", sorted="b", multi_output=True)
op("sort", torch.sort, "t|i,b", cost=Sorting(), clients=_auto_clients("sort"), dim="i",
   descending="b", stable="b", multi_output=True)
op("argsort", torch.argsort, "t|i,b", cost=Sorting(), clients=_auto_clients("argsort"),
   dim="i", descending="b", stable="b")
for _name in ("median", "nanmedian"):
    # median(x) -> tensor; median(x, dim) -> (values, indices)
    op(_name, getattr(torch, _name), "t|i,b", cost=Sorting(default_dim=None, select=True,
                                                                index_buffer=False),
       clients=_auto_clients(_name), dim="i", keepdim="b", multi_output=True)
for _name in ("quantile", "nanquantile"):
    op(_name, getattr(torch, _name), "t,tn|i?,b",
       cost=Decomposed(getattr(torch, _name), twin_checked=True),
       clients=_auto_clients(_name), q="tn", dim="i?", keepdim="b", interpolation="s")
op("bucketize", torch.bucketize, "t|t", boundaries="t",
   cost=Formula(bucketize_cost, "binary search per value"),
   clients=[torch.bucketize], out_int32="b", right="b")
op("searchsorted", torch.searchsorted, "t,tn",
   cost=Formula(bucketize_cost, "binary search per value"),
   clients=[torch.searchsorted], out_int32="b", right="b", side="s?", sorter="t?")

# ---- shapes and views ----------------------------------------------------------------------

for _name in ("view", "expand", "permute"):
    op(_name, getattr(T, _name), "t|*ii", cost=FREE, clients=_auto_clients(_name),
       **({"dims": "ii"} if _name == "permute" else {"size": "ii"} if _name == "expand"
          else {}))
# reshape copies when the layout cannot be viewed; repeat and flip always write.
for _name in ("reshape", "repeat", "flip"):
    op(_name, getattr(T, _name), "t|*ii", cost=Copy(), clients=_auto_clients(_name),
       **({"dims": "ii"} if _name == "flip" else {}))
op("broadcast_to", T.broadcast_to, "t|*ii", cost=FREE, clients=_auto_clients("broadcast_to"),
   size="ii")
for _name in ("view_as", "expand_as"):
    op(_name, getattr(T, _name), "t,t", cost=FREE, clients=_auto_clients(_name))
op("reshape_as", T.reshape_as, "t,t", cost=Copy(), clients=_auto_clients("reshape_as"))
op("flatten", torch.flatten, "t|i,i", cost=Copy(), clients=_auto_clients("flatten"),
   start_dim="i", end_dim="i")
op("unflatten", torch.unflatten, "t|i,ii", cost=FREE, clients=_auto_clients("unflatten"),
   dim="i", sizes="ii")
op("transpose", torch.transpose, "t|i,i", cost=FREE, clients=_auto_clients("transpose"),
   dim0="i", dim1="i")
op("swapaxes", torch.swapaxes, "t|i,i", cost=FREE, clients=_auto_clients("swapaxes"),
   axis0="i", axis1="i")
op("swapdims", torch.swapdims, "t|i,i", cost=FREE, clients=_auto_clients("swapdims"),
   dim0="i", dim1="i")
op("movedim", torch.movedim, "t|ii,ii", cost=FREE,
   clients=_auto_clients("movedim", T.moveaxis, torch.moveaxis), source="ii",
   destination="ii")
op("squeeze", torch.squeeze, "t|ii", cost=FREE, clients=_auto_clients("squeeze"), dim="ii")
op("unsqueeze", torch.unsqueeze, "t|i", cost=FREE, clients=_auto_clients("unsqueeze"),
   dim="i")
op("narrow", torch.narrow, "t|i,i,i", cost=FREE, clients=_auto_clients("narrow"), dim="i",
   start="i", length="i")
op("select", torch.select, "t|i,i", cost=FREE, clients=_auto_clients("select"), dim="i",
   index="i")
op("diagonal", torch.diagonal, "t|i,i,i", cost=FREE, clients=_auto_clients("diagonal"),
   offset="i", dim1="i", dim2="i")
op("roll", torch.roll, "t|ii,ii", cost=Copy(input_copies=1), clients=_auto_clients("roll"),
   shifts="ii",
   dims="ii")
for _name in ("tril", "triu"):
    op(_name, getattr(torch, _name), "t|i", cost=Copy(), clients=_auto_clients(_name),
       diagonal="i")
op("pad", F.pad, "t|ii,s,n?", cost=Copy(), clients=[F.pad], pad="ii", mode="s", value="n?")
op("cat", torch.cat, "ts|i", cost=Copy(), clients=[torch.cat, torch.concat,
                                                     torch.concatenate], dim="i")
op("stack", torch.stack, "ts|i", cost=Copy(), clients=[torch.stack], dim="i")
op("diff", torch.diff, "t|i,i,t?,t?",
   cost=Formula(diff_cost, "n passes over the joined input"), clients=_auto_clients("diff"),
   n="i", dim="i", prepend="t?", append="t?")
op("split", torch.split, "t|ii,i", cost=FREE, clients=_auto_clients("split"),
   split_size_or_sections="ii", split_size="ii", dim="i", multi_output=True)
op("chunk", torch.chunk, "t|i,i", cost=FREE, clients=_auto_clients("chunk"), chunks="i",
   dim="i", multi_output=True)
op("unbind", torch.unbind, "t|i", cost=FREE, clients=_auto_clients("unbind"), dim="i",
   multi_output=True)
op("tuple_get", _tuple_get, "any,i", cost=FREE, clients=[])

# ---- indexing (indices range-checked before the kernel) ------------------------------------

_SETITEM_COST = Formula(setitem_cost, "clone; value cast; mask and index buffers")
op("getitem", _getitem, "t,idx", cost=Formula(indexing_cost, "copy; mask and index buffers"),
   clients=[T.__getitem__], data_dependent=True)
op("setitem", _setitem, "t,idx,tn", cost=_SETITEM_COST, clients=[], data_dependent=True)
op("index_put", _index_put, "t|ts,t,b", cost=_SETITEM_COST, clients=_auto_clients("index_put"),
   indices="ts", values="t", accumulate="b", data_dependent=True)
op("gather", _gather, "t|i,t", cost=Copy(), clients=_auto_clients("gather"), dim="i",
   index="t", sparse_grad="b")
# Arguments torch names are accepted by name too (x.scatter_add(dim=-1, index=i, src=s)).
op("scatter", _scatter, "t|i,t,tn", cost=Copy(), clients=_auto_clients("scatter"), dim="i",
   index="t", src="t", value="tn", reduce="s")
op("scatter_add", _scatter_add, "t|i,t,t", cost=Copy(), clients=_auto_clients("scatter_add"),
   dim="i", index="t", src="t")
op("scatter_reduce", _scatter_reduce, "t|i,t,t,s", cost=Copy(1),
   clients=_auto_clients("scatter_reduce"), dim="i", index="t", src="t", reduce="s",
   include_self="b")
op("index_select", _index_select, "t|i,t", cost=Copy(input_copies=1),
   clients=_auto_clients("index_select"), dim="i", index="t")
op("index_add", _index_add, "t|i,t,t", cost=Copy(), clients=_auto_clients("index_add"),
   dim="i", index="t", source="t", alpha="n")
op("one_hot", _one_hot, "t|i", cost=Copy(), clients=[F.one_hot], num_classes="i")

# ---- contractions and composites, costed by their decomposition ----------------------------

op("linear", F.linear, "t,t|t?", cost=Decomposed(F.linear), clients=[F.linear],
   bias="t?")  # x @ W.T + b (nn.Linear)
op("einsum", torch.einsum, "eq,*t", cost=Decomposed(torch.einsum), clients=[torch.einsum])
for _name in ("matmul", "bmm", "mm", "outer", "dot", "mv"):
    op(_name, getattr(torch, _name), "t,t",
       cost=Decomposed(getattr(torch, _name), twin_checked=True),
       clients=_auto_clients(_name))
OPS["matmul"].clients.append(T.__matmul__)
op("rmatmul", T.__rmatmul__, "t,tn", cost=Decomposed(T.__rmatmul__), clients=[T.__rmatmul__])
op("layer_norm", F.layer_norm, "t|ii,t?,t?,n", cost=Decomposed(F.layer_norm),
   clients=[F.layer_norm], normalized_shape="ii", weight="t?", bias="t?", eps="n")
op("normalize", F.normalize, "t|n,i,n", cost=Decomposed(F.normalize, twin_checked=True),
   clients=[F.normalize],
   p="n", dim="i", eps="n")
op("cosine_similarity", F.cosine_similarity, "t,t|i,n",
   cost=Decomposed(F.cosine_similarity, twin_checked=True),
   clients=[F.cosine_similarity, torch.cosine_similarity], dim="i", eps="n")
op("cdist", torch.cdist, "t,t|n,s",
   cost=Formula(cdist_cost, "3 flops per pair and coordinate; expanded, padded copies",
                twin_checked=True),
   clients=[torch.cdist], p="n", compute_mode="s")
op("scaled_dot_product_attention", _sdpa, "t,t,t|t?,n,b,n?",
   cost=Decomposed(_sdpa), clients=[F.scaled_dot_product_attention], attn_mask="t?",
   dropout_p="n", is_causal="b", scale="n?", enable_gqa="b")
op("cross_entropy", _cross_entropy, "t,t|t?,b?,i,b?,s,n", cost=Decomposed(_cross_entropy),
   clients=[F.cross_entropy], weight="t?", size_average="b?", ignore_index="i",
   reduce="b?", reduction="s", label_smoothing="n")
op("nll_loss", _nll_loss, "t,t|t?,b?,i,b?,s", cost=Decomposed(_nll_loss), clients=[F.nll_loss],
   weight="t?", size_average="b?", ignore_index="i", reduce="b?", reduction="s")
op("mse_loss", F.mse_loss, "t,t|b?,b?,s", cost=Decomposed(F.mse_loss, twin_checked=True),
   clients=[F.mse_loss],
   size_average="b?", reduce="b?", reduction="s", weight="t?")

# ---- decompositions and transforms ---------------------------------------------------------

op("svd", torch.linalg.svd, "t|b", cost=Linalg("svd"), clients=[torch.linalg.svd],
   full_matrices="b", multi_output=True)
op("svd_uv", torch.svd, "t|b,b", cost=Linalg("svd"), clients=[torch.svd, T.svd], some="b",
   compute_uv="b", multi_output=True)  # the older API: returns V, not V^H
op("svdvals", torch.linalg.svdvals, "t", cost=Linalg("svd"), clients=[torch.linalg.svdvals])
op("qr", torch.linalg.qr, "t|s", cost=Linalg("qr"), clients=[torch.linalg.qr], mode="s",
   multi_output=True)
op("eigh", torch.linalg.eigh, "t|s", cost=Linalg("eigh"), clients=[torch.linalg.eigh],
   UPLO="s", multi_output=True)
op("eigvalsh", torch.linalg.eigvalsh, "t|s", cost=Linalg("eigh"),
   clients=[torch.linalg.eigvalsh], UPLO="s")
for _name in ("fft", "ifft", "rfft", "irfft"):
    op(_name, getattr(torch.fft, _name), "t|i?,i,s?",
       cost=Formula(fft_cost(_name), "5 N log2 N per row; complex copy, plan workspace"),
       clients=[getattr(torch.fft, _name)], n="i?", dim="i", norm="s?")

# Rebuild the client map now that every op's clients are final.
CLIENT_OPS.clear()
for _spec in OPS.values():
    for _c in _spec.clients:
        CLIENT_OPS.setdefault(_c, _spec.name)

# In-place methods trace to their functional op, then rebind the mutated value.
INPLACE_OPS: dict[Callable, str] = {}
for _spec in list(OPS.values()):
    for _variant in (f"{_spec.name}_", f"__i{_spec.name}__"):
        _f = getattr(T, _variant, None)
        if _f is not None:
            INPLACE_OPS[_f] = _spec.name
for _f, _name in {T.__imul__: "mul", T.__itruediv__: "div", T.__ifloordiv__: "floor_divide",
                  T.__imod__: "remainder", T.__ipow__: "pow", T.__iand__: "and",
                  T.__ior__: "or", T.__ixor__: "xor", T.zero_: "zeros_like",
                  T.fill_: "full_like", T.copy_: "copy", T.clamp_: "clamp", T.clip_: "clamp",
                  T.masked_fill_: "masked_fill", T.__setitem__: "setitem"}.items():
    INPLACE_OPS[_f] = _name


# check_args and kind_matches are re-exported: the registry's users check signatures with them.
__all__ = ["OPS", "CLIENT_OPS", "INPLACE_OPS", "OpSpec", "check_args", "kind_matches",
           "check_index_range"]
