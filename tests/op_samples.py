"""Valid inputs for every registered op: the table the op tests walk (shape/dtype inference
against torch, measured memory against the cost model, every op covered).

``SAMPLES[name](seed)`` returns a list of ``(args, kwargs)`` of real CPU tensors in the form
the server calls ``OPS[name].fn`` with. Inputs are large enough (tens to hundreds of KiB) that
the bytes an op allocates stand out from the allocator's noise, and each family includes the
layouts that cost extra: transposed and ``expand``-ed views, mixed dtypes, broadcasting.
Adding an op to the registry without adding it here fails ``test_every_op_has_samples``.
"""
from __future__ import annotations

import torch

ROWS, COLS = 48, 96


class _Gen:
    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def f(self, *shape, dtype=torch.float32):
        return torch.randn(shape, generator=self.g).to(dtype)

    def pos(self, *shape, dtype=torch.float32):
        return (torch.rand(shape, generator=self.g) + 0.1).to(dtype)

    def i(self, high, *shape, dtype=torch.int64):
        return torch.randint(0, high, shape, generator=self.g, dtype=dtype)

    def b(self, *shape):
        return torch.rand(shape, generator=self.g) > 0.5

    def c(self, *shape):
        return torch.complex(self.f(*shape), self.f(*shape))


def _layouts(x: torch.Tensor) -> list[torch.Tensor]:
    """The same logical shape as contiguous, transposed and expanded (stride-0) tensors."""
    rows, cols = x.shape[-2], x.shape[-1]
    transposed = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    expanded = x[..., :1, :].expand(*x.shape[:-2], rows, cols)
    return [x, transposed, expanded]


def unary(g: _Gen, positive=False):
    x = g.pos(ROWS, COLS) if positive else g.f(ROWS, COLS)
    cases = [((v,), {}) for v in _layouts(x)]
    cases.append(((x.to(torch.bfloat16),), {}))
    return cases


def unary_int(g: _Gen):
    return [((g.i(100, ROWS, COLS),), {}), ((g.i(100, ROWS, COLS).t(),), {}),
            ((g.b(ROWS, COLS),), {})]


def binary(g: _Gen, positive=False, ints=False):
    make = (lambda *s, dtype=torch.int64: g.i(50, *s, dtype=dtype) + 1) if ints else (
        g.pos if positive else g.f)
    x, y = make(ROWS, COLS), make(ROWS, COLS)
    cases = [((x, y), {}), ((x.t(), y.t()), {}), ((x, y[:1]), {}),
             ((x[:1].expand(ROWS, COLS), y), {}), ((x, 2), {})]
    if not ints:
        cases += [((x, 1.5), {}), ((x.to(torch.bfloat16), 2.5), {}),
                  ((x, (g.i(5, ROWS, COLS) + 1)), {}),          # float x int
                  ((x.to(torch.float16), y), {}),               # fp16 x fp32
                  ((x, torch.tensor(2.0, dtype=torch.float64)), {})]  # 0-dim does not promote
    else:
        cases += [((x, make(ROWS, COLS, dtype=torch.int32)), {}), ((x, True), {})]
    return cases


def logical(g: _Gen):
    x, y = g.b(ROWS, COLS), g.b(ROWS, COLS)
    return [((x, y), {}), ((x, g.f(ROWS, COLS)), {}), ((x.t(), y.t()[:1].expand(COLS, ROWS)), {})]


def reduction(g: _Gen, positive=False, dtype_ok=True):
    x = g.pos(ROWS, COLS) if positive else g.f(ROWS, COLS)
    cases = [((v,), {}) for v in _layouts(x)] + [
        ((x, 1), {}), ((x,), {"dim": 0, "keepdim": True}),
        ((g.f(1, 1).expand(512, 1024),), {}),  # a 4-byte constant expanded: every element read
        ((x.t(), -1), {})]
    if dtype_ok:
        cases += [((x.to(torch.bfloat16),), {"dim": -1}), ((x,), {"dtype": torch.float64})]
    return cases


def int_reduction(g: _Gen):
    return [((g.i(5, ROWS, COLS),), {}), ((g.b(ROWS, COLS),), {}),
            ((g.i(5, ROWS, COLS, dtype=torch.int32), 1), {})]


def sorting(g: _Gen, dim_kw="dim"):
    x = g.f(ROWS, COLS)
    return [((x,), {}), ((x.t(),), {dim_kw: 0}), ((g.f(1, 1).expand(ROWS, COLS),), {}),
            ((x.to(torch.bfloat16),), {})]


def matrices(g: _Gen, square=False, symmetric=False):
    a = g.f(24, 24 if square else 16)
    if symmetric:
        a = a @ a.T
    batch = g.f(3, 20, 20 if square else 12)
    if symmetric:
        batch = batch @ batch.mT
    return [((a,), {}), ((batch,), {}), ((a.T.contiguous().T,), {})]


def _views(g: _Gen):
    x = g.f(4, 12, 16)
    return x


SAMPLES: dict = {}


def _add(names, fn):
    for n in names.split():
        SAMPLES[n] = fn


_add("add sub mul eq ne lt le gt ge rsub", lambda g: binary(g))
_add("maximum minimum", lambda g: [c for c in binary(g) if isinstance(c[0][1], torch.Tensor)])
SAMPLES["add"] = lambda g: binary(g) + [((g.f(ROWS, COLS), g.f(ROWS, COLS)), {"alpha": 2})]
_add("div true_divide rtruediv", lambda g: binary(g, positive=True) + [
    ((g.i(9, ROWS, COLS) + 1, g.i(9, ROWS, COLS) + 1), {})])
SAMPLES["div"] = lambda g: binary(g, positive=True) + [
    ((g.pos(ROWS, COLS), g.pos(ROWS, COLS)), {"rounding_mode": "floor"}),
    ((g.i(9, ROWS, COLS) + 1, g.i(9, ROWS, COLS) + 1), {})]
_add("floor_divide remainder fmod rfloordiv rmod", lambda g: binary(g, positive=True) + binary(
    g, ints=True)[:3])
_add("pow rpow", lambda g: binary(g, positive=True))
_add("atan2 hypot", lambda g: [c for c in binary(g, positive=True)
                                if isinstance(c[0][1], torch.Tensor)])
SAMPLES["xlogy"] = lambda g: binary(g, positive=True)
_add("logical_and logical_or logical_xor", logical)
_add("bitwise_and bitwise_or bitwise_xor and or xor rand ror rxor",
     lambda g: [c for c in binary(g, ints=True) if not isinstance(c[0][1], float)] + [
         ((g.b(ROWS, COLS), g.b(ROWS, COLS)), {})])
_add("neg abs exp exp2 sin cos tanh sigmoid relu sign square expm1 floor ceil trunc frac erf "
     "signbit", lambda g: unary(g))
_add("log log2 log10 sqrt rsqrt log1p reciprocal", lambda g: unary(g, positive=True))
_add("logical_not isnan isinf isfinite", lambda g: unary(g) + unary_int(g)[:1])
_add("bitwise_not", unary_int)
_add("zeros_like ones_like empty_like", lambda g: unary(g) + [((g.f(ROWS, COLS),),
                                                                {"dtype": torch.int32})])
SAMPLES["round"] = lambda g: unary(g) + [((g.f(ROWS, COLS),), {"decimals": 2})]
SAMPLES["nan_to_num"] = lambda g: unary(g) + [((g.f(ROWS, COLS), 0.0, 1.0, -1.0), {})]
SAMPLES["clamp"] = lambda g: [((x, -0.5, 0.5), {}) for x in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS),), {"min": g.f(ROWS, COLS)}), ((g.f(ROWS, COLS),), {"max": 0}),
    ((g.i(9, ROWS, COLS),), {"min": 0.5})]
SAMPLES["full_like"] = lambda g: [((g.f(ROWS, COLS), 2.5), {}),
                                  ((g.f(ROWS, COLS),), {"fill_value": 3, "dtype": torch.int64})]
_add("gelu silu leaky_relu softplus", lambda g: unary(g))
SAMPLES["gelu"] = lambda g: unary(g) + [((g.f(ROWS, COLS),), {"approximate": "tanh"})]
SAMPLES["softplus"] = lambda g: unary(g) + [((g.f(ROWS, COLS), 2.0, 10.0), {})]
SAMPLES["leaky_relu"] = lambda g: unary(g) + [((g.f(ROWS, COLS), 0.2), {})]
SAMPLES["masked_fill"] = lambda g: [((g.f(ROWS, COLS), g.b(ROWS, COLS), 0.0), {}),
                                    ((g.f(ROWS, COLS).t(), g.b(1, ROWS), -1), {}),
                                    ((g.f(ROWS, COLS), g.b(ROWS, COLS), torch.tensor(2.0)), {})]
SAMPLES["where"] = lambda g: [((g.b(ROWS, COLS), g.f(ROWS, COLS), g.f(ROWS, COLS)), {}),
                              ((g.b(ROWS, COLS), g.f(ROWS, COLS), 0.0), {}),
                              ((g.b(ROWS, 1), g.i(5, ROWS, COLS), g.f(1, COLS)), {})]
SAMPLES["angle"] = lambda g: [((g.c(ROWS, COLS),), {}), ((g.f(ROWS, COLS),), {})]
_add("clone contiguous float double half bfloat16 int long bool",
     lambda g: [((v,), {}) for v in _layouts(g.f(ROWS, COLS))] + [((g.i(5, ROWS, COLS),), {})])
SAMPLES["to"] = lambda g: [((g.f(ROWS, COLS), torch.float16), {}),
                           ((g.f(ROWS, COLS).t(), torch.int64), {}),
                           ((g.i(5, ROWS, COLS), torch.bfloat16), {})]
SAMPLES["type_as"] = lambda g: [((g.f(ROWS, COLS), g.i(3, 2)), {}),
                                ((g.i(3, ROWS, COLS), g.f(2).half()), {})]
SAMPLES["copy"] = lambda g: [((g.f(ROWS, COLS), g.f(1, COLS)), {}),
                             ((g.f(ROWS, COLS), 2.0), {}),
                             ((g.f(ROWS, COLS).half(), g.i(5, ROWS, COLS)), {})]
_add("new_zeros new_ones new_empty", lambda g: [
    ((g.f(4, 4), ROWS, COLS), {}), ((g.f(4, 4), (ROWS, COLS)), {"dtype": torch.int64}),
    ((g.f(4, 4).half(), (ROWS, COLS)), {})])
SAMPLES["new_full"] = lambda g: [((g.f(4, 4), (ROWS, COLS), 1.5), {}),
                                 ((g.f(4, 4), (ROWS, COLS)), {"fill_value": 2,
                                                              "dtype": torch.int32})]
_add("randn_like rand_like", lambda g: [((g.f(ROWS, COLS),), {"seed": 3}),
                                        ((g.f(ROWS, COLS),), {"seed": 4,
                                                              "dtype": torch.float16})])
_add("T mT t detach positive conj", lambda g: [((g.f(ROWS, COLS),), {}),
                                               ((g.f(ROWS, COLS).t(),), {})])
SAMPLES["mT"] = lambda g: [((g.f(3, ROWS, COLS),), {})]
_add("real imag view_as_real", lambda g: [((g.c(ROWS, COLS),), {})])
SAMPLES["real"] = lambda g: [((g.c(ROWS, COLS),), {}), ((g.f(ROWS, COLS),), {})]

_add("sum mean nansum amax amin", lambda g: reduction(g))
SAMPLES["amax"] = SAMPLES["amin"] = lambda g: reduction(g, dtype_ok=False)[:-1] + [
    ((g.f(ROWS, COLS).to(torch.bfloat16),), {"dim": -1})]
SAMPLES["sum"] = lambda g: reduction(g) + int_reduction(g)
SAMPLES["prod"] = lambda g: [((g.pos(ROWS, COLS) + 0.5, 1), {}), ((g.pos(ROWS, COLS),), {}),
                             ((g.i(2, ROWS, COLS), 0), {}),
                             ((g.pos(ROWS, COLS), 0), {"dtype": torch.float64})]
_add("all any", lambda g: [((g.b(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 1), {}),
                           ((g.i(3, ROWS, COLS).t(),), {"dim": 0})])
SAMPLES["count_nonzero"] = lambda g: [((g.i(3, ROWS, COLS),), {}), ((g.f(ROWS, COLS), 1), {}),
                                      ((g.f(1, COLS).expand(ROWS * 8, COLS),), {"dim": 0})]
SAMPLES["logsumexp"] = lambda g: [((v, 1), {}) for v in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS), (0, 1)), {"keepdim": True})]
_add("argmax argmin", lambda g: [((v,), {}) for v in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS), 1), {}), ((g.f(ROWS, COLS).t(),), {"dim": 0, "keepdim": True})])
_add("var std", lambda g: reduction(g, dtype_ok=False) + [
    ((g.f(ROWS, COLS),), {"dim": 1, "correction": 0})])
_add("max min", lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 1), {}),
                           ((g.f(ROWS, COLS), g.f(ROWS, COLS)), {}),
                           ((g.f(ROWS, COLS).t(),), {"dim": 0, "keepdim": True}),
                           ((g.f(1, 1).expand(ROWS, COLS), -1), {})])
_add("cumsum cumprod", lambda g: [((v, 1), {}) for v in _layouts(g.f(ROWS, COLS))] + [
    ((g.i(3, ROWS, COLS), 0), {}), ((g.f(ROWS, COLS), -1), {"dtype": torch.float64})])
_add("softmax log_softmax", lambda g: [((v, -1), {}) for v in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS), 0), {}), ((g.f(ROWS, COLS).half(), -1), {"dtype": torch.float32}),
    ((g.f(ROWS, COLS).to(torch.bfloat16), -1), {})])
SAMPLES["norm"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 1), {"dim": 1}),
                             ((g.f(ROWS, COLS), "nuc"), {}),
                             ((g.f(3, 20, 30),), {"p": "nuc", "dim": (1, 2)}),
                             ((g.f(1, 1).expand(256, 256), 2), {}),
                             ((g.f(ROWS, COLS), float("inf"), -1), {})]
SAMPLES["vector_norm"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 1, 1), {}),
                                    ((g.f(ROWS, COLS).t(),), {"ord": float("inf"), "dim": 0}),
                                    ((g.f(ROWS, COLS).half(),), {"dtype": torch.float32}),
                                    ((g.f(1, 1).expand(256, 256),), {})]
SAMPLES["matrix_norm"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), "nuc"), {}),
                                    ((g.f(3, 20, 30), 2), {}), ((g.f(ROWS, COLS), 1), {}),
                                    ((g.f(ROWS, COLS), -2), {})]
SAMPLES["linalg_norm"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 2), {}),
                                    ((g.f(ROWS, COLS), "fro"), {}),
                                    ((g.f(3, 20, 30),), {"ord": "nuc", "dim": (1, 2)}),
                                    ((g.f(ROWS, COLS),), {"dim": 1}),
                                    ((g.f(ROWS, COLS), float("inf")), {"dim": 0})]
SAMPLES["topk"] = lambda g: [((g.f(ROWS, COLS), 5), {}), ((g.f(ROWS, COLS).t(), 3, 0), {}),
                             ((g.f(ROWS, COLS), 4), {"largest": False, "sorted": True})]
SAMPLES["sort"] = lambda g: sorting(g) + [((g.f(ROWS, COLS),), {"descending": True,
                                                               "stable": True})]
SAMPLES["argsort"] = lambda g: sorting(g) + [((g.i(4, ROWS, COLS),), {"stable": True})]
_add("median nanmedian", lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 1), {}),
                                    ((g.f(ROWS, COLS).t(),), {"dim": 0, "keepdim": True}),
                                    ((g.f(1, 1).expand(ROWS, COLS), -1), {})])
_add("quantile nanquantile", lambda g: [
    ((g.f(ROWS, COLS), 0.3), {}), ((g.f(ROWS, COLS), torch.tensor([0.1, 0.5, 0.9])), {"dim": 1}),
    ((g.f(ROWS, COLS).t(), 0.5), {"dim": 0, "keepdim": True, "interpolation": "nearest"}),
    ((g.f(ROWS, COLS).double(), 0.25), {"dim": -1})])
SAMPLES["bucketize"] = lambda g: [((g.f(ROWS, COLS), torch.linspace(-2, 2, 17)), {}),
                                  ((g.f(ROWS, COLS).t(), torch.linspace(-2, 2, 5)),
                                   {"right": True, "out_int32": True})]
SAMPLES["searchsorted"] = lambda g: [((torch.linspace(-2, 2, 17), g.f(ROWS, COLS)), {}),
                                     ((torch.sort(g.f(ROWS, 33), dim=-1).values,
                                       g.f(ROWS, COLS)), {"side": "right"}),
                                     ((torch.linspace(-2, 2, 17), 0.5), {})]
SAMPLES["view"] = lambda g: [((g.f(4, 12, 16), 48, 16), {}), ((g.f(4, 12, 16), (-1,)), {})]
SAMPLES["reshape"] = lambda g: [((g.f(4, 12, 16), 48, 16), {}),
                                ((g.f(4, 12, 16).transpose(0, 2), (-1,)), {})]
SAMPLES["expand"] = lambda g: [((g.f(1, 12, 16), 4, 12, 16), {}),
                               ((g.f(12, 1), (-1, 16)), {})]
SAMPLES["repeat"] = lambda g: [((g.f(12, 16), 4, 2), {}), ((g.f(12, 16).t(), (3, 1, 1)), {})]
SAMPLES["permute"] = lambda g: [((g.f(4, 12, 16), 2, 0, 1), {}),
                                ((g.f(4, 12, 16),), {"dims": (1, 0, 2)})]
SAMPLES["flip"] = lambda g: [((g.f(4, 12, 16), -1), {}),
                             ((g.f(4, 12, 16).transpose(0, 1),), {"dims": (0, 2)})]
_add("view_as expand_as", lambda g: [((g.f(1, 12, 16), g.f(4, 12, 16)), {})])
SAMPLES["view_as"] = lambda g: [((g.f(4, 12, 16), g.f(48, 16)), {})]
SAMPLES["reshape_as"] = lambda g: [((g.f(4, 12, 16), g.f(48, 16)), {}),
                                   ((g.f(4, 12, 16).transpose(1, 2), g.f(48, 16)), {})]
SAMPLES["flatten"] = lambda g: [((g.f(4, 12, 16),), {}), ((g.f(4, 12, 16).mT, 1), {})]
SAMPLES["unflatten"] = lambda g: [((g.f(4, 192), 1, (12, 16)), {})]
_add("transpose swapaxes swapdims", lambda g: [((g.f(4, 12, 16), 0, 2), {})])
SAMPLES["movedim"] = lambda g: [((g.f(4, 12, 16), 0, -1), {}),
                                ((g.f(4, 12, 16), (0, 1), (2, 0)), {})]
SAMPLES["squeeze"] = lambda g: [((g.f(4, 1, 16),), {}), ((g.f(4, 1, 16), 1), {})]
SAMPLES["unsqueeze"] = lambda g: [((g.f(4, 12, 16), 1), {})]
SAMPLES["narrow"] = lambda g: [((g.f(4, 12, 16), 1, 2, 5), {})]
SAMPLES["select"] = lambda g: [((g.f(4, 12, 16), 1, 3), {})]
SAMPLES["diagonal"] = lambda g: [((g.f(4, 12, 16),), {}),
                                 ((g.f(4, 12, 16),), {"offset": 1, "dim1": 1, "dim2": 2})]
SAMPLES["roll"] = lambda g: [((g.f(ROWS, COLS), 3, 1), {}), ((g.f(ROWS, COLS).t(), (1, 2),
                                                              (0, 1)), {}),
                             ((g.f(ROWS, COLS), 5), {})]
_add("tril triu", lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(3, 20, 20).mT, 1), {})])
SAMPLES["pad"] = lambda g: [((g.f(ROWS, COLS), (1, 2)), {}),
                            ((g.f(4, ROWS, COLS), (1, 1, 2, 2)), {"value": 1.0}),
                            ((g.f(ROWS, COLS).t(), (3, 0)), {"mode": "constant"})]
SAMPLES["cat"] = lambda g: [(((g.f(ROWS, COLS), g.f(ROWS, COLS).t().contiguous().t()),), {}),
                            (((g.f(ROWS, COLS), g.f(3, COLS)), 0), {}),
                            (((g.f(ROWS, COLS), g.i(3, ROWS, 4)), 1), {})]
SAMPLES["stack"] = lambda g: [(((g.f(ROWS, COLS), g.f(ROWS, COLS)),), {}),
                              (((g.f(ROWS, COLS).t(), g.f(COLS, ROWS)), -1), {})]
SAMPLES["diff"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 3, 0), {}),
                             ((g.f(ROWS, COLS),), {"prepend": g.f(ROWS, 2),
                                                   "append": g.f(ROWS, 1)}),
                             ((g.b(ROWS, COLS),), {}), ((g.f(ROWS, COLS).t(), 2), {"dim": 0})]
SAMPLES["split"] = lambda g: [((g.f(ROWS, COLS), 16), {}),
                              ((g.f(ROWS, COLS), (10, 38), 0), {})]
SAMPLES["chunk"] = lambda g: [((g.f(ROWS, COLS), 3), {}), ((g.f(ROWS, COLS), 5, 0), {})]
SAMPLES["unbind"] = lambda g: [((g.f(4, 12, 16),), {}), ((g.f(4, 12, 16), 1), {})]
SAMPLES["tuple_get"] = lambda g: [(((g.f(4, 4), g.f(3)), 1), {})]
SAMPLES["getitem"] = lambda g: [
    ((g.f(ROWS, COLS), (slice(1, 5), 3)), {}), ((g.f(ROWS, COLS), g.b(ROWS, COLS)), {}),
    ((g.f(ROWS, COLS), (Ellipsis, g.i(COLS, 20))), {}),
    ((g.f(4, ROWS, COLS), (g.i(4, 6, 1), slice(None), g.i(COLS, 1, 5))), {}),
    ((g.f(ROWS, COLS), (slice(None), [1, 3, -1])), {}),
    ((g.f(4, ROWS, COLS), (None, 1, g.b(ROWS))), {})]
SAMPLES["setitem"] = lambda g: [
    ((g.f(ROWS, COLS), (slice(1, 5), 3), 0.0), {}),
    ((g.f(ROWS, COLS), g.b(ROWS, COLS), 1.0), {}),
    ((g.f(ROWS, COLS), (Ellipsis, g.i(COLS, 20)), g.f(ROWS, 20)), {}),
    ((g.f(ROWS, COLS).half(), (slice(None), slice(0, 10)), g.f(ROWS, 10)), {}),
    ((g.f(ROWS, COLS), g.b(ROWS), g.f(COLS)), {})]
SAMPLES["index_put"] = lambda g: [
    ((g.f(ROWS, COLS), (g.i(ROWS, 30), g.i(COLS, 30)), g.f(30)), {}),
    ((g.f(ROWS, COLS), (g.i(ROWS, 30),), g.f(COLS)), {"accumulate": True}),
    ((g.f(ROWS, COLS), (g.b(ROWS, COLS),), torch.tensor(2.0)), {})]
SAMPLES["gather"] = lambda g: [((g.f(ROWS, COLS), 1, g.i(COLS, ROWS, 10)), {}),
                               ((g.f(ROWS, COLS).t(), 0, g.i(COLS, 5, ROWS)), {})]
SAMPLES["scatter"] = lambda g: [((g.f(ROWS, COLS), 1, g.i(COLS, ROWS, 10), g.f(ROWS, 10)), {}),
                                ((g.f(ROWS, COLS), 1, g.i(COLS, ROWS, 10), 2.0), {}),
                                ((g.f(ROWS, COLS), 0, g.i(ROWS, 5, COLS), g.f(5, COLS)),
                                 {"reduce": "add"})]
SAMPLES["scatter_add"] = lambda g: [((g.f(ROWS, COLS), 1, g.i(COLS, ROWS, 10),
                                      g.f(ROWS, 10)), {}),
                                    ((g.f(ROWS, COLS).t(), 0, g.i(COLS, 5, ROWS),
                                      g.f(5, ROWS)), {})]
SAMPLES["scatter_reduce"] = lambda g: [((g.f(ROWS, COLS), 1, g.i(COLS, ROWS, 10),
                                         g.f(ROWS, 10), "amax"), {}),
                                       ((g.f(ROWS, COLS), 0, g.i(ROWS, 5, COLS),
                                         g.f(5, COLS), "mean"), {"include_self": False})]
SAMPLES["index_select"] = lambda g: [((g.f(ROWS, COLS), 0, g.i(ROWS, 30)), {}),
                                     ((g.f(ROWS, COLS).t(), 1, g.i(ROWS, 7)), {})]
SAMPLES["index_add"] = lambda g: [((g.f(ROWS, COLS), 0, g.i(ROWS, 30), g.f(30, COLS)), {}),
                                  ((g.f(ROWS, COLS), 1, g.i(COLS, 7), g.f(ROWS, 7)),
                                   {"alpha": 0.5})]
SAMPLES["one_hot"] = lambda g: [((g.i(10, ROWS, 20), 10), {}), ((g.i(7, 300),), {
    "num_classes": 7})]
SAMPLES["linear"] = lambda g: [((g.f(4, 12, 32), g.f(24, 32)), {}),
                               ((g.f(4, 12, 32), g.f(24, 32), g.f(24)), {}),
                               ((g.f(4, 32, 12).mT, g.f(24, 32)), {"bias": g.f(24)})]
SAMPLES["einsum"] = lambda g: [(("bij,bjk->bik", g.f(4, 12, 16), g.f(4, 16, 8)), {}),
                               (("bsd,td->bst", g.f(4, 12, 16), g.f(10, 16)), {}),
                               (("ijk->kj", g.f(12, 16, 8)), {}),
                               (("bsnd,bsnd->bsn", g.f(2, 8, 4, 16), g.f(2, 8, 4, 16)), {}),
                               (("...d,d->...", g.f(4, 12, 16), g.f(16)), {}),
                               (("aid,bjd->abij", g.f(6, 1, 32), g.f(1, 6, 32)), {})]
SAMPLES["matmul"] = lambda g: [((g.f(4, 12, 16), g.f(16, 8)), {}),
                               ((g.f(4, 1, 12, 16), g.f(1, 5, 16, 8)), {}),
                               ((g.f(12, 16), g.f(16)), {}), ((g.f(16), g.f(4, 16, 8)), {}),
                               ((g.f(4, 16, 12).mT, g.f(4, 8, 16).mT), {})]
SAMPLES["rmatmul"] = lambda g: [((g.f(16, 8), g.f(4, 12, 16)), {})]
SAMPLES["bmm"] = lambda g: [((g.f(4, 12, 16), g.f(4, 16, 8)), {}),
                            ((g.f(4, 16, 12).mT, g.f(1, 16, 8).expand(4, 16, 8)), {})]
SAMPLES["mm"] = lambda g: [((g.f(12, 16), g.f(16, 8)), {}), ((g.f(16, 12).T, g.f(8, 16).T), {})]
SAMPLES["outer"] = lambda g: [((g.f(ROWS), g.f(COLS)), {})]
SAMPLES["dot"] = lambda g: [((g.f(COLS), g.f(COLS)), {})]
SAMPLES["mv"] = lambda g: [((g.f(ROWS, COLS), g.f(COLS)), {}), ((g.f(COLS, ROWS).T, g.f(COLS)),
                                                                 {})]
SAMPLES["layer_norm"] = lambda g: [((g.f(4, 12, 32), (32,)), {}),
                                   ((g.f(4, 32, 12).mT, (32,), g.f(32), g.f(32)), {}),
                                   ((g.f(4, 12, 32),), {"normalized_shape": (12, 32),
                                                        "eps": 1e-3})]
SAMPLES["normalize"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS).t(), 1.0, 0), {}),
                                  ((g.f(1, COLS).expand(ROWS, COLS),), {"dim": -1})]
SAMPLES["cosine_similarity"] = lambda g: [((g.f(ROWS, COLS), g.f(ROWS, COLS)), {}),
                                          ((g.f(32, 1, 24), g.f(1, 32, 24)), {"dim": -1}),
                                          ((g.f(ROWS, COLS), g.f(1, COLS), 1, 1e-6), {})]
SAMPLES["cdist"] = lambda g: [((g.f(30, 16), g.f(40, 16)), {}),
                              ((g.f(3, 30, 16), g.f(1, 40, 16)), {"p": 1.0}),
                              ((g.f(2, 10, 16), g.f(2, 12, 16)), {"compute_mode":
                                                                  "donot_use_mm_for_euclid_dist"}),
                              ((g.f(4, 1, 30, 16), g.f(1, 3, 40, 16)), {})]
SAMPLES["scaled_dot_product_attention"] = lambda g: [
    ((g.f(2, 4, 12, 16), g.f(2, 4, 12, 16), g.f(2, 4, 12, 16)), {}),
    ((g.f(2, 4, 12, 16), g.f(2, 4, 12, 16), g.f(2, 4, 12, 16)), {"is_causal": True}),
    ((g.f(2, 4, 12, 16), g.f(2, 4, 10, 16), g.f(2, 4, 10, 16)),
     {"attn_mask": g.b(12, 10) | torch.eye(12, 10, dtype=torch.bool), "scale": 0.3}),
    ((g.f(2, 4, 12, 16), g.f(2, 2, 12, 16), g.f(2, 2, 12, 16)), {"enable_gqa": True})]
SAMPLES["cross_entropy"] = lambda g: [
    ((g.f(ROWS, COLS), g.i(COLS, ROWS)), {}),
    ((g.f(4, COLS, 12), g.i(COLS, 4, 12)), {"reduction": "none"}),
    ((g.f(ROWS, COLS), g.f(ROWS, COLS).softmax(-1)), {"label_smoothing": 0.1}),
    ((g.f(ROWS, COLS), torch.where(g.b(ROWS), g.i(COLS, ROWS), -100)), {"reduction": "sum"}),
    ((g.f(ROWS, COLS), g.i(COLS, ROWS), g.pos(COLS)), {})]
SAMPLES["nll_loss"] = lambda g: [((g.f(ROWS, COLS).log_softmax(-1), g.i(COLS, ROWS)), {}),
                                 ((g.f(ROWS, COLS), g.i(COLS, ROWS)), {"reduction": "none",
                                                                       "ignore_index": 3})]
SAMPLES["mse_loss"] = lambda g: [((g.f(ROWS, COLS), g.f(ROWS, COLS)), {}),
                                 ((g.f(ROWS, COLS), g.f(ROWS, COLS)), {"reduction": "none"})]
SAMPLES["svd"] = lambda g: matrices(g) + [((g.f(24, 16),), {"full_matrices": False})]
SAMPLES["svd_uv"] = lambda g: matrices(g) + [((g.f(24, 16),), {"some": False})]
SAMPLES["svdvals"] = lambda g: matrices(g)
SAMPLES["qr"] = lambda g: matrices(g) + [((g.f(24, 16),), {"mode": "complete"}),
                                         ((g.f(16, 24), "r"), {})]
SAMPLES["eigh"] = lambda g: matrices(g, square=True, symmetric=True) + [
    ((g.f(20, 20) @ g.f(20, 20).T,), {"UPLO": "U"})]
SAMPLES["eigvalsh"] = lambda g: matrices(g, square=True, symmetric=True)
SAMPLES["fft"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 128), {}),
                            ((g.f(ROWS, COLS).t(),), {"dim": 0, "norm": "ortho"}),
                            ((g.c(ROWS, COLS),), {})]
SAMPLES["ifft"] = lambda g: [((g.c(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 50), {})]
SAMPLES["rfft"] = lambda g: [((g.f(ROWS, COLS),), {}), ((g.f(ROWS, COLS), 64, 0), {})]
SAMPLES["irfft"] = lambda g: [((g.c(ROWS, COLS),), {}), ((g.c(ROWS, COLS),), {"n": 100})]


SAMPLES["clamp_min"] = lambda g: [((x, -0.5), {}) for x in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS), g.f(1, COLS)), {}), ((g.i(9, ROWS, COLS), 3), {})]
SAMPLES["clamp_max"] = SAMPLES["clamp_min"]
SAMPLES["lerp"] = lambda g: [((x, g.f(ROWS, COLS), 0.25), {})
                             for x in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS), g.f(1, COLS), g.f(ROWS, 1)), {})]
SAMPLES["addcmul"] = lambda g: [((x, g.f(ROWS, COLS), g.f(ROWS, COLS)), {})
                                for x in _layouts(g.f(ROWS, COLS))] + [
    ((g.f(ROWS, COLS), g.f(1, COLS), g.f(ROWS, 1)), {"value": 0.5})]
SAMPLES["addcdiv"] = lambda g: [((g.f(ROWS, COLS), g.f(ROWS, COLS), g.pos(ROWS, COLS)), {}),
                                ((g.f(ROWS, COLS), g.f(1, COLS), g.pos(ROWS, 1)), {"value": 2})]
SAMPLES["broadcast_to"] = lambda g: [((g.f(1, COLS), (ROWS, COLS)), {}),
                                     ((g.f(ROWS, 1), (2, ROWS, COLS)), {})]


def samples(name: str, seed: int = 0) -> list[tuple[tuple, dict]]:
    return SAMPLES[name](_Gen(seed))


__all__ = ["SAMPLES", "samples"]
