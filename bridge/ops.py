"""The one registry of operations a graph may use.

Each op has a name, the callable the server runs (always one of *our* literal references to a
torch function, never looked up by a name from the wire), an argument signature checked
before anything runs, and the client-side torch callables that trace to it.

Signature kinds: ``t`` tensor, ``n`` number, ``tn`` tensor or number, ``i`` int, ``ii`` int or
tuple of ints, ``b`` bool, ``d`` dtype, ``idx`` index expression, ``ts`` tuple of tensors,
``eq`` einsum equation, ``s`` short string, ``any`` anything in the vocabulary but refs to
tuples. A trailing ``?`` also allows None; ``*k`` takes any number of ``k``; kinds after ``|``
are optional.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from hookwire.graph import Const, Ref
from hookwire.random import seeded_rand_like, seeded_randn_like

T = torch.Tensor


@dataclass
class OpSpec:
    name: str
    fn: Callable
    required: tuple[str, ...]
    optional: tuple[str, ...]
    varargs: str | None
    kwargs: dict[str, str]
    clients: list = field(default_factory=list)
    multi_output: bool = False


OPS: dict[str, OpSpec] = {}
CLIENT_OPS: dict[Callable, str] = {}     # torch callable -> op name (client tracing)
SPECIAL_OPS = {"site.read", "site.write", "tuple_get", "input"}


def _parse_sig(sig: str):
    required, optional, varargs = [], [], None
    target = required
    for part in [p.strip() for p in sig.replace("|", ",|,").split(",") if p.strip()]:
        if part == "|":
            target = optional
        elif part.startswith("*"):
            varargs = part[1:]
        else:
            target.append(part)
    return tuple(required), tuple(optional), varargs


def op(name: str, fn: Callable, sig: str, *, clients=(), multi_output=False, **kwargs: str):
    required, optional, varargs = _parse_sig(sig)
    spec = OpSpec(name, fn, required, optional, varargs, dict(kwargs), list(clients),
                  multi_output)
    OPS[name] = spec
    for c in clients:
        CLIENT_OPS[c] = name
    return spec


def _auto_clients(name: str, *extra):
    out = list(extra)
    for ns in (torch, T, F):
        f = getattr(ns, name, None)
        if f is not None and callable(f):
            out.append(f)
    return out


# ---- server implementations that are not a single torch call ---------------------------

def _getitem(x, index):
    return x[index]


def _setitem(x, index, value):
    # Functional index assignment: the traced program never mutates a value another node
    # may still read. (The executor may skip the clone when it owns the value.)
    out = x.clone()
    out[index] = value
    return out


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


_ADD_LIKE = ("t,tn", dict(alpha="n"))
for _name in ("add", "sub"):
    op(_name, getattr(T, _name), _ADD_LIKE[0], clients=_auto_clients(_name), **_ADD_LIKE[1])
OPS["add"].clients += [T.__add__, T.__radd__]
OPS["sub"].clients += [T.__sub__]
for _name in ("mul", "div", "true_divide", "floor_divide", "remainder", "pow", "maximum",
              "minimum", "fmod", "atan2", "eq", "ne", "lt", "le", "gt", "ge", "logical_and",
              "logical_or", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor", "rsub",
              "hypot", "xlogy"):
    extra = dict(rounding_mode="s?") if _name == "div" else {}
    op(_name, getattr(torch, _name), "t,tn", clients=_auto_clients(_name), **extra)
# Operator dunders trace to the op with the same meaning.
for _dunder, _name in {T.__mul__: "mul", T.__rmul__: "mul", T.__truediv__: "div",
                       T.__floordiv__: "floor_divide", T.__mod__: "remainder",
                       T.__pow__: "pow", T.__eq__: "eq", T.__ne__: "ne", T.__lt__: "lt",
                       T.__le__: "le", T.__gt__: "gt", T.__ge__: "ge"}.items():
    OPS[_name].clients.append(_dunder)
for _name, _fn in (("rtruediv", T.__rtruediv__), ("rfloordiv", T.__rfloordiv__),
                   ("rpow", T.__rpow__), ("rmatmul", T.__rmatmul__), ("rmod", T.__rmod__),
                   ("and", T.__and__), ("or", T.__or__), ("xor", T.__xor__),
                   ("rand", T.__rand__), ("ror", T.__ror__), ("rxor", T.__rxor__)):
    op(_name, _fn, "t,tn", clients=[_fn])
OPS["rsub"].clients.append(T.__rsub__)

for _name in ("neg", "abs", "exp", "exp2", "log", "log2", "log10", "sqrt", "rsqrt", "sin",
              "cos", "tanh", "sigmoid", "relu", "sign", "square", "log1p", "expm1",
              "reciprocal", "floor", "ceil", "trunc", "frac", "logical_not", "bitwise_not",
              "isnan", "isinf", "isfinite", "clone", "detach", "contiguous", "float",
              "double", "half", "bfloat16", "int", "long", "bool", "zeros_like", "ones_like",
              "erf", "signbit", "positive", "t", "conj"):
    kw = {}
    if _name in ("zeros_like", "ones_like"):
        kw = dict(dtype="d?")
    if _name == "clone":
        kw = dict(memory_format="any")
    fn = getattr(T, _name, None) or getattr(torch, _name)
    op(_name, fn, "t", clients=_auto_clients(_name), **kw)
OPS["neg"].clients.append(T.__neg__)
OPS["abs"].clients.append(T.__abs__)
OPS["bitwise_not"].clients.append(T.__invert__)
op("round", torch.round, "t", clients=_auto_clients("round"), decimals="i")
op("nan_to_num", torch.nan_to_num, "t|n?,n?,n?", clients=_auto_clients("nan_to_num"),
   nan="n?", posinf="n?", neginf="n?")
op("clamp", torch.clamp, "t|tn?,tn?", clients=_auto_clients("clamp", torch.clip, T.clip),
   min="tn?", max="tn?")
op("full_like", torch.full_like, "t|n", clients=[torch.full_like], fill_value="n",
   dtype="d?")
op("T", _T, "t", clients=[T.T.__get__])
op("mT", _mT, "t", clients=[T.mT.__get__])
op("gelu", F.gelu, "t", clients=[F.gelu], approximate="s")
op("linear", F.linear, "t,t|t?", clients=[F.linear], bias="t?")  # x @ W.T + b (nn.Linear)
op("silu", F.silu, "t", clients=[F.silu])
op("softplus", F.softplus, "t|n,n", clients=[F.softplus], beta="n", threshold="n")
op("leaky_relu", F.leaky_relu, "t|n", clients=[F.leaky_relu], negative_slope="n")
for _name in ("softmax", "log_softmax"):
    op(_name, getattr(torch, _name), "t|i,d?", clients=_auto_clients(_name), dim="i",
       dtype="d?")
op("layer_norm", F.layer_norm, "t|ii,t?,t?,n", clients=[F.layer_norm],
   normalized_shape="ii", weight="t?",
   bias="t?", eps="n")
op("normalize", F.normalize, "t|n,i,n", clients=[F.normalize], p="n", dim="i", eps="n")
op("cosine_similarity", F.cosine_similarity, "t,t|i,n", clients=[F.cosine_similarity,
   torch.cosine_similarity], dim="i", eps="n")
op("one_hot", F.one_hot, "t|i", clients=[F.one_hot], num_classes="i")
op("pad", F.pad, "t|ii,s,n?", clients=[F.pad], pad="ii", mode="s", value="n?")

# Reductions.
for _name in ("sum", "mean", "nansum", "prod", "amax", "amin", "logsumexp", "all", "any",
              "count_nonzero"):
    op(_name, getattr(torch, _name), "t|ii?,b", clients=_auto_clients(_name), dim="ii?",
       keepdim="b", dtype="d?")
for _name in ("argmax", "argmin"):
    op(_name, getattr(torch, _name), "t|i?,b", clients=_auto_clients(_name), dim="i?",
       keepdim="b")
for _name in ("var", "std"):
    op(_name, getattr(torch, _name), "t|ii?,b,b", clients=_auto_clients(_name), dim="ii?",
       keepdim="b", unbiased="b", correction="n?")
op("norm", torch.norm, "t|nps?,ii?,b", clients=_auto_clients("norm"), p="nps?", dim="ii?",
   keepdim="b", dtype="d?")
for _name in ("max", "min"):
    # max(x) -> tensor; max(x, dim) -> (values, indices); max(x, other) -> tensor.
    op(_name, getattr(torch, _name), "t|tn,b", clients=_auto_clients(_name), dim="i",
       keepdim="b", multi_output=True)
op("topk", torch.topk, "t|i,i,b,b", clients=_auto_clients("topk"), k="i", dim="i",
   largest="b",
   sorted="b", multi_output=True)
op("sort", torch.sort, "t|i,b", clients=_auto_clients("sort"), dim="i", descending="b",
   stable="b", multi_output=True)
op("cumsum", torch.cumsum, "t|i", clients=_auto_clients("cumsum"), dim="i", dtype="d?")

# Shapes and views.
for _name in ("view", "reshape", "expand", "repeat", "permute", "flip"):
    op(_name, getattr(T, _name), "t|*ii", clients=_auto_clients(_name),
       **({"dims": "ii"} if _name in ("permute", "flip") else
          {"size": "ii"} if _name == "expand" else {}))
for _name in ("view_as", "reshape_as", "expand_as", "type_as"):
    op(_name, getattr(T, _name), "t,t", clients=_auto_clients(_name))
op("flatten", torch.flatten, "t|i,i", clients=_auto_clients("flatten"), start_dim="i",
   end_dim="i")
op("unflatten", torch.unflatten, "t|i,ii", clients=_auto_clients("unflatten"), dim="i",
   sizes="ii")
op("transpose", torch.transpose, "t|i,i", clients=_auto_clients("transpose"), dim0="i",
   dim1="i")
op("swapaxes", torch.swapaxes, "t|i,i", clients=_auto_clients("swapaxes"), axis0="i",
   axis1="i")
op("swapdims", torch.swapdims, "t|i,i", clients=_auto_clients("swapdims"), dim0="i",
   dim1="i")
op("movedim", torch.movedim, "t|ii,ii", clients=_auto_clients("movedim", T.moveaxis,
   torch.moveaxis), source="ii", destination="ii")
op("squeeze", torch.squeeze, "t|ii", clients=_auto_clients("squeeze"), dim="ii")
op("unsqueeze", torch.unsqueeze, "t|i", clients=_auto_clients("unsqueeze"), dim="i")
op("narrow", torch.narrow, "t|i,i,i", clients=_auto_clients("narrow"), dim="i", start="i",
   length="i")
op("select", torch.select, "t|i,i", clients=_auto_clients("select"), dim="i", index="i")
op("roll", torch.roll, "t|ii,ii", clients=_auto_clients("roll"), shifts="ii", dims="ii")
for _name in ("tril", "triu"):
    op(_name, getattr(torch, _name), "t|i", clients=_auto_clients(_name), diagonal="i")
op("diagonal", torch.diagonal, "t|i,i,i", clients=_auto_clients("diagonal"), offset="i",
   dim1="i", dim2="i")
op("gather", torch.gather, "t|i,t", clients=_auto_clients("gather"), dim="i", index="t")
op("scatter", torch.scatter, "t,i,t,tn", clients=_auto_clients("scatter"), reduce="s")
op("index_select", torch.index_select, "t|i,t", clients=_auto_clients("index_select"),
   dim="i", index="t")
op("masked_fill", torch.masked_fill, "t|t,tn", clients=_auto_clients("masked_fill"), mask="t",
   value="tn")
op("where", torch.where, "t|tn,tn", clients=[torch.where], input="tn", other="tn")
op("cat", torch.cat, "ts|i", clients=[torch.cat, torch.concat, torch.concatenate], dim="i")
op("stack", torch.stack, "ts|i", clients=[torch.stack], dim="i")
op("einsum", torch.einsum, "eq,*t", clients=[torch.einsum])
for _name in ("matmul", "bmm", "mm", "outer", "dot", "mv"):
    op(_name, getattr(torch, _name), "t,t", clients=_auto_clients(_name))
OPS["matmul"].clients.append(T.__matmul__)
op("split", torch.split, "t|ii,i", clients=_auto_clients("split"), split_size_or_sections="ii",
   split_size="ii", dim="i", multi_output=True)
op("chunk", torch.chunk, "t|i,i", clients=_auto_clients("chunk"), chunks="i", dim="i",
   multi_output=True)
op("unbind", torch.unbind, "t|i", clients=_auto_clients("unbind"), dim="i",
   multi_output=True)
op("randn_like", seeded_randn_like, "t", clients=[], seed="i", dtype="d?")
op("rand_like", seeded_rand_like, "t", clients=[], seed="i", dtype="d?")
op("getitem", _getitem, "t,idx", clients=[T.__getitem__])
op("setitem", _setitem, "t,idx,tn", clients=[])
op("copy", _copy_into, "t,tn", clients=[])
op("to", _to_dtype, "t,d", clients=[])
op("tuple_get", _tuple_get, "any,i", clients=[])

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


# ---- argument checking -------------------------------------------------------------------

_EQ_RE = re.compile(r"^[a-zA-Z ,.>\-]{1,128}$")
_S_RE = re.compile(r"^[a-z_]{1,32}$")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_tensor_ref(v):
    return isinstance(v, (Ref, Const))


def _is_index(v, depth=0) -> bool:
    if depth > 3:
        return False
    if v is None or v is Ellipsis or isinstance(v, (bool, int, slice)) or _is_tensor_ref(v):
        return True
    if isinstance(v, tuple):
        return all(_is_index(x, depth + 1) for x in v)
    if isinstance(v, list):
        return all(_is_int(x) or isinstance(x, bool) for x in v) or all(
            _is_index(x, depth + 1) for x in v)
    return False


def kind_matches(kind: str, v) -> bool:
    if kind.endswith("?"):
        if v is None:
            return True
        kind = kind[:-1]
    if kind == "t":
        return _is_tensor_ref(v)
    if kind == "n":
        return isinstance(v, (int, float, bool))
    if kind == "nps":  # a norm order: number or a name like "fro"
        return isinstance(v, (int, float)) or (isinstance(v, str) and v in ("fro", "nuc"))
    if kind == "tn":
        return _is_tensor_ref(v) or isinstance(v, (int, float, bool))
    if kind == "i":
        return _is_int(v)
    if kind == "ii":
        return _is_int(v) or (isinstance(v, (tuple, list)) and len(v) <= 16
                              and all(_is_int(x) for x in v))
    if kind == "b":
        return isinstance(v, bool)
    if kind == "d":
        return isinstance(v, torch.dtype)
    if kind == "idx":
        return _is_index(v)
    if kind == "ts":
        return isinstance(v, (tuple, list)) and 0 < len(v) <= 4096 and all(
            _is_tensor_ref(x) for x in v)
    if kind == "eq":
        return isinstance(v, str) and bool(_EQ_RE.match(v))
    if kind == "s":
        return isinstance(v, str) and bool(_S_RE.match(v))
    if kind == "any":
        return True
    raise AssertionError(f"unknown kind {kind}")


def check_args(spec: OpSpec, args: tuple, kwargs: dict) -> str | None:
    """None if the arguments fit the op's signature, else the reason they do not."""
    n_fixed = len(spec.required) + len(spec.optional)
    if len(args) < len(spec.required):
        return f"needs at least {len(spec.required)} arguments, got {len(args)}"
    if spec.varargs is None and len(args) > n_fixed:
        return f"takes at most {n_fixed} arguments, got {len(args)}"
    kinds = list(spec.required) + list(spec.optional)
    for i, a in enumerate(args):
        kind = kinds[i] if i < len(kinds) else spec.varargs
        if not kind_matches(kind, a):
            return f"argument {i} does not fit kind {kind!r}"
    for k, v in kwargs.items():
        if k not in spec.kwargs:
            return f"keyword {k!r} is not accepted (accepted: {sorted(spec.kwargs)})"
        if not kind_matches(spec.kwargs[k], v):
            return f"keyword {k!r} does not fit kind {spec.kwargs[k]!r}"
    return None


__all__ = ["OPS", "CLIENT_OPS", "INPLACE_OPS", "OpSpec", "check_args", "kind_matches",
           "SPECIAL_OPS"]
