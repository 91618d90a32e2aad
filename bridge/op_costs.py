"""What one op costs, computed from the shapes and dtypes of its inputs and result before
anything runs: floating-point work (``flops``) and the bytes torch allocates *inside* the op and
frees before it returns (``transient_bytes``: casts, contiguous copies, broadcast products,
sort buffers, LAPACK workspaces). The result itself is sized by the validator; this module
adds what the result does not show.

Every registered op names one :class:`CostModel` (``hookwire.ops.op(..., cost=...)``); an op
without one cannot be registered. The models are a handful of classes with parameters, so the
registry reads as a table:

========================  ==============================================================
``FREE``                  views and metadata: nothing computed, nothing allocated
``Copy()``                a result written once (casts, ``cat``, ``repeat``, ``pad``...)
``Pointwise(k)``          ``k`` flops per result element; inputs cast to the computing dtype
``Reduction(k)``          ``k`` flops per *logical* input element (an ``expand``-ed view of
                          one number counts every element it pretends to have)
``Sorting(...)``          n log n per row; copies and index buffers
``Linalg(kind)``          SVD / QR / eigh: cubic work (weighted), input copy, workspaces
``Decomposed()``          composites (``matmul``, ``einsum``, ``cosine_similarity``,
                          ``cross_entropy``, ...): the op is run on the meta device under a
                          dispatch mode that adds up every tensor its decomposition creates
                          and the flops of every contraction in it
``Formula(fn)``           a cost written out for one op (``cdist``, ``diff``, ``fft``...)
========================  ==============================================================

The figures are upper bounds of what the CPU and CUDA kernels allocate, not estimates:
``tests/test_op_costs.py`` runs every registered op on real tensors and checks the measured
peak of torch's CPU allocator against the prediction (and the prediction against the
measurement times a small factor), and ``bench/bench_op_costs.py`` checks how the time of the
expensive ops grows against how their predicted flops grow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

# CUDA's segmented radix sort keeps a second key and index buffer (double buffering) and a
# contiguous copy of the input; the CPU sorts a contiguous copy in place. Both fit in this
# many copies of (values + int64 indices).
SORT_BUFFERS = 2


# The budget (``Limits.max_flops``) is in matrix-product flops: what bounds a single op's time
# when bytes do not. Decompositions do far fewer flops per second than a matrix product of the
# same size (bench/bench_op_costs.py: ~5-15x fewer on CPU; cuSOLVER trails cuBLAS by more),
# so each of their flops is charged this many times. Elementwise ops, reductions and sorts
# are slower per flop still, but their time is bounded by the bytes they touch.
DECOMPOSITION_WEIGHT = 10


@dataclass(frozen=True)
class Cost:
    """``flops``: all the op's work; ``contraction``: the part of it that runs at a matrix
    product's speed (contractions, decompositions: ``hookwire.op_time`` prices the rest per
    element, which is far slower per flop)."""
    flops: float
    transient_bytes: int
    contraction: float = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.transient_bytes + other.transient_bytes,
                    self.contraction + other.contraction)


ZERO = Cost(0, 0)


# ---- what the models read --------------------------------------------------------------------

def tensors_in(value, out: list | None = None) -> list[torch.Tensor]:
    """Every tensor in a (nested) argument, in order."""
    out = [] if out is None else out
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            tensors_in(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            tensors_in(v, out)
    return out


def nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``t`` as if every element it shows were stored (a stride-0 view counts in
    full: that is what a contiguous copy of it allocates)."""
    return t.numel() * _itemsize(dtype or t.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


def _inputs(args, kwargs) -> list[torch.Tensor]:
    return tensors_in(args) + tensors_in(kwargs)


def _outputs(out) -> list[torch.Tensor]:
    return tensors_in(out)


def _cast_bytes(inputs: list[torch.Tensor], dtype: torch.dtype) -> int:
    """CPU TensorIterator copies every input whose dtype is not the dtype it computes in (a
    full, logical-size copy); CUDA casts inside the kernel. Zero-dim tensors are scalars."""
    return sum(nbytes(t, dtype) for t in inputs if t.dtype != dtype and t.dim() > 0)


def _computing_dtype(inputs: list[torch.Tensor], outs: list[torch.Tensor]) -> torch.dtype | None:
    if outs and outs[0].dtype is not torch.bool:
        return outs[0].dtype
    dims = [t for t in inputs if t.dim() > 0] or inputs
    if not dims:
        return None
    dtype = dims[0].dtype
    for t in dims[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _dim_size(t: torch.Tensor, dim) -> int:
    if t.dim() == 0:
        return 1
    if isinstance(dim, int):
        return t.shape[dim % t.dim()]
    return t.numel()


def _log2(n: int) -> float:
    return math.log2(n) if n > 1 else 1.0


# ---- the models ------------------------------------------------------------------------------

class CostModel:
    """Flops and transient bytes of one op from its (meta) inputs and result.

    ``twin_checked``: the op's meta result is checked against the real kernel run on
    one-element twins of its inputs (``shape_probe.check_on_twins``) -- for ops whose inputs
    can be shrunk to one element without changing what is valid."""
    kind = "abstract"
    twin_checked = False

    def __call__(self, args: tuple, kwargs: dict, out) -> Cost:
        raise NotImplementedError


class _Free(CostModel):
    """Views, aliases and metadata: no work, no allocation."""
    kind = "free (view)"

    def __call__(self, args, kwargs, out):
        return ZERO


FREE = _Free()


@dataclass(frozen=True)
class Copy(CostModel):
    """Writes its result once; ``temps`` extra result-sized buffers on the way, and
    ``input_copies`` copies of the first input (kernels that make it contiguous first)."""
    temps: float = 0
    input_copies: float = 0
    kind = "copy"

    def __call__(self, args, kwargs, out):
        outs = _outputs(out)
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        copies = self.input_copies * nbytes(first) if first is not None else 0
        return Cost(sum(o.numel() for o in outs),
                    int(self.temps * sum(map(nbytes, outs)) + copies))


@dataclass(frozen=True)
class Pointwise(CostModel):
    """``k`` flops per result element. Inputs whose dtype differs from the computing dtype
    are copied on CPU; ``temps`` more result-sized buffers for composite kernels (``isinf``
    is ``abs`` then a comparison)."""
    k: float = 1
    temps: float = 0
    kind = "pointwise"
    twin_checked = True

    def __call__(self, args, kwargs, out):
        inputs, outs = _inputs(args, kwargs), _outputs(out)
        n = sum(o.numel() for o in outs)
        dtype = _computing_dtype(inputs, outs)
        cast = _cast_bytes(inputs, dtype) if dtype is not None else 0
        # Composite kernels only build their temporaries for floating inputs (an integer is
        # never inf); they are as wide as the widest floating input.
        floats = [_itemsize(t.dtype) for t in inputs if t.is_floating_point() or t.is_complex()]
        return Cost(self.k * n, int(cast + self.temps * n * max(floats, default=0)))


@dataclass(frozen=True)
class Reduction(CostModel):
    """``k`` flops per logical input element (every element of an ``expand``-ed view is
    read). ``into_result``: the op accumulates in its result's dtype, so on CPU an input of
    another dtype is copied first (``sum`` of int32 or bool into int64, ``any`` of floats into
    bool, ``dtype=``). ``copies`` more input-sized buffers for kernels that work on a
    contiguous copy or are composites (``logsumexp`` subtracts the max first)."""
    k: float = 1
    copies: float = 0
    into_result: bool = False
    scratch: float = 0       # more bytes per input element (count_nonzero: a bool and an int64)
    widen_half: bool = False  # float16/bfloat16 inputs are widened to float32 first (CPU mean)
    kind = "reduction"
    twin_checked = True

    def __call__(self, args, kwargs, out):
        inputs, outs = _inputs(args, kwargs), _outputs(out)
        n = sum(t.numel() for t in inputs)
        acc = kwargs.get("dtype") if isinstance(kwargs.get("dtype"), torch.dtype) else None
        if acc is None and self.into_result and outs:
            acc = outs[0].dtype
        cast = _cast_bytes(inputs, acc) if acc is not None else 0
        if self.widen_half:
            cast += sum(nbytes(t, torch.float32) for t in inputs
                        if t.dtype in (torch.float16, torch.bfloat16))
        widest = max([_itemsize(t.dtype) for t in inputs] or [1])
        return Cost(self.k * n, int(cast + self.copies * n * widest + self.scratch * n))


@dataclass(frozen=True)
class Sorting(CostModel):
    """Sorts rows along ``dim`` (argument ``dim_arg``, keyword ``dim``; ``default_dim`` when
    absent, None for the whole tensor): n log n comparisons, and :data:`SORT_BUFFERS` copies
    of values plus int64 indices of the whole input, whatever part of it is returned.
    ``select``: an order statistic along a dim (``topk``, ``median(dim)``) selects rather than
    sorts -- one contiguous copy of the values and the indices."""
    dim_arg: int = 1
    default_dim: int | None = -1
    select: bool = False
    index_buffer: bool = True  # False: a selection that keeps no int64 buffer (CUDA median)
    twin_checked: bool = True
    kind = "sort"

    def __call__(self, args, kwargs, out):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None:
            return ZERO
        dim = kwargs.get("dim", args[self.dim_arg] if len(args) > self.dim_arg else
                         self.default_dim)
        row = _dim_size(x, dim if isinstance(dim, int) else None)
        n = x.numel()
        if self.select and isinstance(dim, int):
            return Cost(n * _log2(row) * 2, nbytes(x) + (n * 8 if self.index_buffer else 0))
        return Cost(n * _log2(row) * 2, SORT_BUFFERS * (nbytes(x) + n * 8))


def _matrix_dims(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, m, n) of a (batch of) matrices."""
    if t.dim() < 2:
        return 1, t.numel(), 1
    m, n = t.shape[-2], t.shape[-1]
    return max(t.numel() // max(m * n, 1), 1) if m * n else 0, m, n


def _decomposition_flops(kind: str, b: int, m: int, n: int) -> float:
    """Textbook arithmetic of the decomposition, times :data:`DECOMPOSITION_WEIGHT`."""
    big, small = max(m, n), min(m, n)
    if kind == "svd":  # Golub & Van Loan, full U and V: 4m^2n + 8mn^2 + 9n^3
        count = b * (4 * big * big * small + 8 * big * small * small + 9 * small ** 3)
    elif kind == "qr":   # Householder 2mn^2 - 2n^3/3, and forming Q: as much again
        count = b * 4 * big * small * small + b * 4 * big * big * small
    elif kind == "eigh":  # tridiagonal reduction and divide and conquer with vectors: ~9n^3
        count = b * 9 * big ** 3
    else:
        raise AssertionError(kind)
    return DECOMPOSITION_WEIGHT * count


@dataclass(frozen=True)
class Linalg(CostModel):
    """A matrix decomposition of the last two dims (``decomposition`` picks the formula:
    see :func:`linalg_cost`)."""
    decomposition: str = "svd"
    kind = "matrix decomposition"

    def __call__(self, args, kwargs, out):
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None:
            return ZERO
        return linalg_cost(self.decomposition, x)


def linalg_cost(kind: str, x: torch.Tensor) -> Cost:
    """Cubic flops; the column-major copy of the input LAPACK/cuSOLVER overwrite, the
    factors computed in full before a reduced result is cut from them, and a workspace:
    ``2 m n + 2 min(m, n)^2`` elements per matrix (measured on CPU: 1.05 m n for the SVD,
    2.04 n^2 for eigh with vectors)."""
    b, m, n = _matrix_dims(x)
    small = min(m, n)
    elsize = max(_itemsize(x.dtype), 4)
    flops = _decomposition_flops(kind, b, m, n)
    return Cost(flops, b * (2 * m * n + 2 * small * small) * elsize, contraction=flops)


@dataclass(frozen=True)
class Formula(CostModel):
    """A cost written out for one op: ``fn(args, kwargs, out) -> Cost``; ``label`` says
    what it counts (docs/ops.md)."""
    fn: Callable
    label: str = "formula"
    twin_checked: bool = False
    kind = "formula"

    def __call__(self, args, kwargs, out):
        return self.fn(args, kwargs, out)


# ---- composites, costed by their decomposition ----------------------------------------------

_VIEWS_BY_CONTRACT = {torch.ops.aten._unsafe_view.default, torch.ops.aten.alias.default}
_CONTRACTIONS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
                 torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default,
                 torch.ops.aten.mv.default, torch.ops.aten.dot.default}


def _fresh_outputs(func, out) -> list[torch.Tensor]:
    """Results of an aten call that are new allocations (not views of its inputs)."""
    if func in _VIEWS_BY_CONTRACT:
        return []
    returns = func._schema.returns
    outs = out if isinstance(out, (tuple, list)) else (out,)
    fresh = []
    for r, o in zip(returns, outs):
        if isinstance(o, torch.Tensor) and r.alias_info is None:
            fresh.append(o)
    return fresh


class _Tally(TorchDispatchMode):
    """Adds up, on the meta device, what a composite's aten calls allocate and compute."""

    def __init__(self):
        super().__init__()
        self.allocated = 0
        self.flops = 0.0
        self.contraction = 0.0
        self.leaf_extra = ZERO

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        fresh = _fresh_outputs(func, out)
        self.allocated += sum(nbytes(o) for o in fresh)
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            self.flops += flops
            self.contraction += flops
        elif torch.Tag.reduction in func.tags:
            self.flops += sum(t.numel() for t in tensors_in(args))
        else:
            self.flops += sum(o.numel() for o in fresh)
        if func in _CONTRACTIONS:
            # BLAS wants each operand with one unit stride; others are copied inside.
            self.allocated += sum(nbytes(t) for t in tensors_in(args)[-2:])
        leaf = LEAF_COSTS.get(packet)
        if leaf is not None:
            self.leaf_extra = self.leaf_extra + leaf(args, kwargs, out)
        return out


def _as_meta(value):
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else torch.empty_strided(
            value.shape, value.stride(), dtype=value.dtype, device="meta")
    if isinstance(value, tuple):
        return tuple(_as_meta(v) for v in value)
    if isinstance(value, list):
        return [_as_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: _as_meta(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class Decomposed(CostModel):
    """A composite op: run it again on meta copies of its inputs, under a dispatch mode that
    adds up every tensor its aten decomposition allocates (the broadcast ``(n, n, d)``
    products inside ``cosine_similarity`` of ``(n, 1, d)`` and ``(1, n, d)``; the expanded
    copies ``matmul`` makes for broadcast batch dims), the flops of its contractions
    (torch's flop formulas) and one per element of everything else. Aten kernels with their
    own internal buffers add :data:`LEAF_COSTS`. Nothing is freed early in this count: it
    is an upper bound of the peak."""
    fn: Callable
    twin_checked: bool = False
    kind = "decomposed on meta"

    def __call__(self, args, kwargs, out):
        return self.run(_as_meta(args), _as_meta(kwargs))[1]

    def run(self, args, kwargs):
        """(result, cost) of the op on meta ``args``: shape inference and costing in one
        pass."""
        tally = _Tally()
        with tally:
            result = self.fn(*args, **kwargs)
        kept = sum(nbytes(o) for o in tensors_in(result))
        transient = max(tally.allocated - kept, 0)
        return result, Cost(tally.flops, transient, tally.contraction) + tally.leaf_extra


# Internal buffers of aten kernels that composites reach (and that meta kernels do not show).
def _leaf_sort(args, kwargs, out):
    x = args[0]
    return Cost(x.numel() * _log2(x.numel()), SORT_BUFFERS * (nbytes(x) + x.numel() * 8))


def _leaf_softmax(args, kwargs, out):
    x = args[0]
    return Cost(4 * x.numel(), nbytes(x))  # the kernel works on a contiguous copy


def _leaf_euclidean(args, kwargs, out):
    x1, x2 = args[0], args[1]
    # norms, padding columns and the concatenated operands, as in ATen's _euclidean_dist
    elsize = _itemsize(x1.dtype)
    return Cost(0, 3 * (x1.numel() + x2.numel() + 2 * (x1.shape[-2] + x2.shape[-2])) * elsize)


def _leaf_mse(args, kwargs, out):
    x = args[0]
    return Cost(3 * x.numel(), 2 * nbytes(x))  # the difference and its square


def _leaf_layer_norm(args, kwargs, out):
    x = args[0]
    return Cost(5 * x.numel(), nbytes(x))  # a contiguous copy of the input


LEAF_COSTS: dict = {
    torch.ops.aten.sort: _leaf_sort,
    torch.ops.aten._softmax: _leaf_softmax,
    torch.ops.aten._log_softmax: _leaf_softmax,
    torch.ops.aten._safe_softmax: _leaf_softmax,
    torch.ops.aten._euclidean_dist: _leaf_euclidean,
    torch.ops.aten.native_layer_norm: _leaf_layer_norm,
    torch.ops.aten.mse_loss: _leaf_mse,
    torch.ops.aten._linalg_svd: lambda a, k, o: linalg_cost("svd", a[0]),
    torch.ops.aten.linalg_qr: lambda a, k, o: linalg_cost("qr", a[0]),
    torch.ops.aten._linalg_eigh: lambda a, k, o: linalg_cost("eigh", a[0]),
}


__all__ = ["Cost", "CostModel", "FREE", "Copy", "Pointwise", "Reduction", "Sorting",
           "Linalg", "Formula", "Decomposed", "linalg_cost", "tensors_in", "nbytes",
           "LEAF_COSTS", "ZERO"]
