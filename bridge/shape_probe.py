"""One op run for shape inference, without letting it allocate or compute much.

``validate.infer_shapes`` runs every op on meta tensors, except that small integer and bool
constants stay real (an indexing result's shape depends on a mask's values). An op on real
inputs would allocate for real *before* its size is checked -- ``repeat`` of a one-element
int constant to (40000, 40000) is 12.8 GB -- so such an op first runs on meta copies of its
inputs and is sized there. Only when the meta run cannot tell (a data-dependent shape) and
the op is an indexing op, whose result is never larger than its inputs, do real values
decide.

Contractions cost far more time than their result's size shows: a (20000 x 20000) matrix
made by ``expand`` from one uploaded number, multiplied by itself, is 1.6e13 flops for a
1.6 GB result. Their flops are counted on meta (torch's ``FlopCounterMode``) so the
validator can hold a graph to ``Limits.max_flops``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# A result is computed for real only while it is as small as the constants validation keeps
# real (validate._meta_constant: 2**20 elements) and cheap; otherwise its meta stand-in goes
# on, so validation never holds gigabytes or runs a long contraction on real values.
REAL_BYTES = 8 << 20
REAL_FLOPS = 10 ** 8
# Ops whose cost is not bounded by the bytes of their inputs and result.
CONTRACTIONS = frozenset({"matmul", "rmatmul", "mm", "bmm", "mv", "dot", "einsum", "linear"})
# Ops whose result shape may depend on values, and is never larger than their inputs.
DATA_DEPENDENT = frozenset({"getitem", "setitem"})


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    return 0


def _is_real(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.device.type != "meta"
    if isinstance(value, (tuple, list)):
        return any(_is_real(v) for v in value)
    if isinstance(value, dict):
        return any(_is_real(v) for v in value.values())
    return False


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


def run_for_shape(op: str, fn: Callable, args: tuple, kwargs: dict, max_bytes: int):
    """``(result, flops)`` of one op in shape inference. A result over ``max_bytes`` (which the
    caller refuses), or too large or costly to compute for real, comes back as its meta
    stand-in."""
    counter = FlopCounterMode(display=False) if op in CONTRACTIONS else None
    counting = counter if counter is not None else contextlib.nullcontext()
    if not _is_real(args) and not _is_real(kwargs):
        with counting:
            out = fn(*args, **kwargs)
        return out, counter.get_total_flops() if counter else 0
    try:
        with counting:
            probe = fn(*_to_meta(args), **_to_meta(kwargs))
    except Exception:
        if op not in DATA_DEPENDENT:
            raise
        probe = None  # e.g. a boolean mask: only its values tell the result's shape
    flops = counter.get_total_flops() if counter else 0
    if probe is not None and (nbytes(probe) > min(max_bytes, REAL_BYTES) or flops > REAL_FLOPS):
        return probe, flops
    return fn(*args, **kwargs), flops


__all__ = ["run_for_shape", "nbytes", "CONTRACTIONS", "DATA_DEPENDENT"]
