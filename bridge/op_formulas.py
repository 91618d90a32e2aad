"""Cost formulas written out for single ops (``op_costs.Formula``), where neither a generic
model nor the meta decomposition tells the truth: norms that are an SVD or a reduction
depending on their arguments, ``cdist``'s expanded batches, ``diff``'s repeated passes, FFTs,
searches, and indexing with masks (``nonzero`` buffers) and casts."""
from __future__ import annotations

import math

import torch

from hookwire.op_costs import ZERO, Cost, linalg_cost, nbytes, tensors_in

_COMPLEX_OF = {torch.float64: torch.complex128}


def _get(args, kwargs, i: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[i] if len(args) > i else default


def _log2(n: int) -> float:
    return math.log2(n) if n > 1 else 1.0


def _itemsize(dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _reduction(x: torch.Tensor, dtype=None) -> Cost:
    # abs/pow per element and the sum; with ``dtype=`` the input is cast first (a copy).
    cast = nbytes(x, dtype) if isinstance(dtype, torch.dtype) and dtype != x.dtype else 0
    return Cost(3 * x.numel(), cast)


def _matrix_view(x: torch.Tensor, dims) -> torch.Tensor:
    """``x`` with the two matrix dims last (a meta stand-in: only its shape is read)."""
    d0, d1 = (d % x.dim() for d in dims)
    rest = [s for i, s in enumerate(x.shape) if i not in (d0, d1)]
    return torch.empty(rest + [x.shape[d0], x.shape[d1]], dtype=x.dtype, device="meta")


def _svd_norm(x: torch.Tensor, dims) -> Cost:
    m = _matrix_view(x, dims)
    return linalg_cost("svd", m) + Cost(0, nbytes(x))  # the permuted, contiguous copy


def norm_cost(kind: str):
    """Cost of ``torch.norm`` / ``linalg.vector_norm`` / ``matrix_norm`` / ``linalg.norm``:
    the spectral and nuclear matrix norms are an SVD; every other order is a reduction."""
    def cost(args, kwargs, out) -> Cost:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or x.dim() == 0:
            return Cost(x.numel() if x is not None else 0, 0)
        dtype = kwargs.get("dtype")
        if kind == "vector":
            return _reduction(x, dtype)
        if kind == "norm":
            p, dim = _get(args, kwargs, 1, "p", "fro"), _get(args, kwargs, 2, "dim")
            if p == "nuc":
                dims = tuple(dim) if isinstance(dim, (tuple, list)) else (-2, -1)
                return _svd_norm(x, dims) if len(dims) == 2 and x.dim() >= 2 else ZERO
            return _reduction(x, dtype)
        if kind == "matrix":
            ord_, dim = _get(args, kwargs, 1, "ord", "fro"), _get(args, kwargs, 2, "dim",
                                                                    (-2, -1))
        else:  # linalg.norm: a matrix norm when given two dims or an order on a matrix
            ord_, dim = _get(args, kwargs, 1, "ord"), _get(args, kwargs, 2, "dim")
            two_dims = isinstance(dim, (tuple, list)) and len(dim) == 2
            if not (two_dims or (dim is None and ord_ is not None and x.dim() == 2)):
                return _reduction(x, dtype)
            dim = tuple(dim) if two_dims else (-2, -1)
        if ord_ in (2, -2, "nuc") and x.dim() >= 2 and isinstance(dim, (tuple, list)) and \
                len(dim) == 2:
            return _svd_norm(x, dim)
        return _reduction(x, dtype)
    return cost


def bucketize_cost(args, kwargs, out) -> Cost:
    """A binary search per value; both inputs may be copied to contiguous memory."""
    ts = tensors_in(args) + tensors_in(kwargs)
    if not ts:
        return ZERO
    boundaries = max(t.numel() for t in ts)
    values = sum(t.numel() for t in ts)
    return Cost(values * _log2(boundaries + 1), 2 * sum(nbytes(t) for t in ts))


def cdist_cost(args, kwargs, out) -> Cost:
    """Pairwise distances of (..., P, M) and (..., R, M): 3 flops per pair and coordinate.
    Broadcast batch dims are expanded into copies of both inputs; the matrix-product path of
    the euclidean distance (p=2 with more than 25 rows, the default) adds norms and padded
    copies of both, (P + R) x (M + 2) each, and the product's operand copies."""
    x1, x2 = args[0], args[1] if len(args) > 1 else None
    if not isinstance(x1, torch.Tensor) or not isinstance(x2, torch.Tensor) or \
            x1.dim() < 2 or x2.dim() < 2 or not isinstance(out, torch.Tensor):
        return ZERO
    p_rows, r_rows, m = x1.shape[-2], x2.shape[-2], x1.shape[-1]
    batch = out.numel() // max(p_rows * r_rows, 1) if p_rows * r_rows else 0
    elsize = _itemsize(out.dtype)
    p = _get(args, kwargs, 2, "p", 2.0)
    mode = _get(args, kwargs, 3, "compute_mode", "use_mm_for_euclid_dist_if_necessary")
    expanded = batch * (p_rows + r_rows) * m * elsize
    uses_mm = p == 2 and mode != "donot_use_mm_for_euclid_dist"
    padded = 4 * batch * (p_rows + r_rows) * (m + 2) * elsize if uses_mm else 0
    return Cost(3 * batch * p_rows * r_rows * m, expanded + padded)


def diff_cost(args, kwargs, out) -> Cost:
    """``n`` passes of a subtraction over (input with ``prepend``/``append`` joined): each
    pass allocates the next, one row shorter; the joined input is a copy."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if x is None or x.dim() == 0:
        return ZERO
    n = _get(args, kwargs, 1, "n", 1)
    dim = _get(args, kwargs, 2, "dim", -1)
    extra = [t for t in (_get(args, kwargs, 3, "prepend"), _get(args, kwargs, 4, "append"))
             if isinstance(t, torch.Tensor)]
    joined = x.numel() + sum(t.numel() for t in extra)
    length = x.shape[dim % x.dim()] + sum(t.shape[dim % t.dim()] if t.dim() else 1
                                          for t in extra)
    passes = max(min(n if isinstance(n, int) else 1, length), 0)
    elsize = _itemsize(x.dtype)
    return Cost(passes * joined, (joined if extra else 0) * elsize +
                (2 * joined * elsize if passes > 1 else 0))


def fft_cost(name: str):
    """5 N log2 N flops per transformed row (N the longer of input and output length); a
    contiguous, padded or complex copy of the input, and a result-sized plan workspace
    (cuFFT)."""
    def cost(args, kwargs, out) -> Cost:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not isinstance(out, torch.Tensor) or x.dim() == 0:
            return ZERO
        dim = _get(args, kwargs, 2, "dim", -1)
        n_in = x.shape[dim % x.dim()]
        n_out = out.shape[dim % out.dim()] if out.dim() else 1
        length = max(n_in, n_out, 1)
        rows = max(out.numel() // max(n_out, 1), 1)
        complex_dtype = out.dtype if out.dtype.is_complex else _COMPLEX_OF.get(
            x.dtype, torch.complex64)
        copy = rows * length * _itemsize(complex_dtype)
        return Cost(5 * rows * length * _log2(length), copy + nbytes(out))
    return cost


def _index_buffers(index, value=None) -> int:
    """Bytes of the int64 index buffers advanced indexing builds: ``nonzero`` of each bool
    mask (one int64 per set element per mask dim; at most every element), and each integer
    index tensor broadcast against the others (and widened to int64)."""
    items = index if isinstance(index, tuple) else (index,)
    if len(items) == 1 and isinstance(items[0], torch.Tensor) and \
            items[0].dtype is torch.bool and (isinstance(value, (int, float, bool)) or (
                isinstance(value, torch.Tensor) and value.numel() == 1)):
        return 0  # x[mask] = scalar is a masked_fill: no index buffers
    masks = [i for i in items if isinstance(i, torch.Tensor) and i.dtype is torch.bool]
    ints = [i for i in items if isinstance(i, torch.Tensor) and i.dtype is not torch.bool]
    ints += [torch.empty(len(i), device="meta") for i in items if isinstance(i, list)]
    total = sum(m.numel() * max(m.dim(), 1) * 8 for m in masks)
    if ints:
        try:
            shape = torch.broadcast_shapes(*(i.shape for i in ints))
            total += len(ints) * math.prod(shape) * 8
        except RuntimeError:
            total += sum(i.numel() * 8 for i in ints)
    return total


def indexing_cost(args, kwargs, out) -> Cost:
    index = args[1] if len(args) > 1 else None
    return Cost(sum(o.numel() for o in tensors_in(out)), _index_buffers(index))


def setitem_cost(args, kwargs, out) -> Cost:
    """``setitem`` / ``index_put``: the clone is the result; the value is broadcast and cast
    to the target's dtype (a copy), and masks and index tensors build index buffers."""
    x = args[0] if args and isinstance(args[0], torch.Tensor) else None
    index = _get(args, kwargs, 1, "indices")
    value = _get(args, kwargs, 2, "values")
    if x is None:
        return ZERO
    cast = nbytes(value, x.dtype) if isinstance(value, torch.Tensor) else 0
    return Cost(x.numel() + (value.numel() if isinstance(value, torch.Tensor) else 0),
                cast + _index_buffers(index, value))


__all__ = ["norm_cost", "bucketize_cost", "cdist_cost", "diff_cost", "fft_cost",
           "indexing_cost", "setitem_cost"]
