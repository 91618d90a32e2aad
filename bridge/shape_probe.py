"""One op run for shape inference, and its cost, without letting it allocate or compute much.

``validate.infer_shapes`` runs every op on meta tensors, except that small integer and bool
constants stay real (an indexing result's shape depends on a mask's values). An op on real
inputs would allocate for real *before* its size is checked -- ``repeat`` of a one-element
int constant to (40000, 40000) is 12.8 GB -- so such an op first runs on meta copies of its
inputs and is sized there. Only when every input is real and the result is small and cheap,
or when the meta run cannot tell (a data-dependent shape) and the op is an indexing op, whose
result is never larger than its inputs, do real values decide.

Each op's cost (flops and the bytes it allocates inside, ``hookwire.op_costs``) comes from
its registry entry's cost model, computed from the same shapes: a (20000 x 20000) matrix
made by ``expand`` from one uploaded number, multiplied by itself, is 1.6e13 flops for a
1.6 GB result; ``cosine_similarity`` of (n, 1, d) and (1, n, d) builds (n, n, d) products
for an (n, n) result.
"""
from __future__ import annotations

import torch

from hookwire.op_costs import Cost, Decomposed

# A result is computed for real only while it is as small as the constants validation keeps
# real (validate._meta_constant: 2**20 elements) and cheap; otherwise its meta stand-in goes
# on, so validation never holds gigabytes or runs a long contraction on real values.
REAL_BYTES = 8 << 20
REAL_FLOPS = 10 ** 8


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def _devices(value, out: set) -> set:
    if isinstance(value, torch.Tensor):
        out.add(value.device.type == "meta")
    elif isinstance(value, (tuple, list)):
        for v in value:
            _devices(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _devices(v, out)
    return out


def _to_meta(value):
    if isinstance(value, torch.Tensor):
        return value if value.device.type == "meta" else torch.empty_like(value, device="meta")
    if isinstance(value, tuple):
        return tuple(_to_meta(v) for v in value)
    if isinstance(value, list):
        return [_to_meta(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_meta(v) for k, v in value.items()}
    return value


def run_for_shape(spec, args: tuple, kwargs: dict, max_bytes: int) -> tuple[object, Cost]:
    """``(result, cost)`` of one registered op in shape inference. A result over
    ``max_bytes`` (which the caller refuses), or too large or costly to compute for real,
    comes back as its meta stand-in."""
    kinds = _devices(kwargs, _devices(args, set()))
    if False not in kinds:  # everything on meta
        if isinstance(spec.cost, Decomposed):
            out, cost = spec.cost.run(args, kwargs)
        else:
            out = spec.fn(*args, **kwargs)
            cost = None
        if spec.cost.twin_checked:
            out = check_on_twins(spec.fn, args, kwargs, out)
        return out, cost if cost is not None else spec.cost(args, kwargs, out)
    try:
        probe = spec.fn(*_to_meta(args), **_to_meta(kwargs))
    except Exception:
        if not spec.data_dependent:
            raise
        probe = None  # e.g. a boolean mask: only its values tell the result's shape
    if probe is not None:
        if spec.cost.twin_checked:
            probe = check_on_twins(spec.fn, args, kwargs, probe)
        cost = spec.cost(args, kwargs, probe)
        if True in kinds or nbytes(probe) > min(max_bytes, REAL_BYTES) or \
                cost.flops > REAL_FLOPS or cost.transient_bytes > REAL_BYTES:
            # Meta inputs beside real ones (a traced activation times a local index tensor)
            # cannot run for real, and need not: the meta result has the shape.
            return probe, cost
    out = spec.fn(*args, **kwargs)
    return out, spec.cost(args, kwargs, out)




# ---- dtype twins -----------------------------------------------------------------------------

def _twin(value):
    """A one-element real tensor with ``value``'s dtype and number of dims (ones: no
    division by zero, in range for every integer dtype); empty where ``value`` is empty
    (kernels skip their dtype checks on empty inputs)."""
    if isinstance(value, torch.Tensor):
        return torch.ones(tuple(0 if s == 0 else 1 for s in value.shape), dtype=value.dtype)
    if isinstance(value, tuple):
        return tuple(_twin(v) for v in value)
    if isinstance(value, list):
        return [_twin(v) for v in value]
    if isinstance(value, dict):
        return {k: _twin(v) for k, v in value.items()}
    return value


def check_on_twins(fn, args: tuple, kwargs: dict, meta_out):
    """Elementwise ops and reductions run on meta through reference implementations that
    are laxer than the real kernels in a few dtype corners (``float - bool`` and ``bool //
    True`` pass on meta; the kernels refuse the first and return bool for the second). The
    dtype of the result depends only on the inputs' dtypes and whether they are 0-dim, so
    running the real kernel on one-element twins of the inputs tells the truth cheaply:
    refuses where torch refuses, and gives the dtype torch gives."""
    twin_out = fn(*_twin(args), **_twin(kwargs))
    if isinstance(meta_out, torch.Tensor) and isinstance(twin_out, torch.Tensor) and \
            twin_out.dtype != meta_out.dtype:
        return torch.empty_strided(meta_out.shape, meta_out.stride(), dtype=twin_out.dtype,
                                   device=meta_out.device)
    return meta_out


__all__ = ["run_for_shape", "nbytes", "check_on_twins"]
