"""Dtype promotion follows torch's rules on both sides of the wire: for every pair of the
dtypes a graph may carry (and Python int, float and bool scalars on either side), the dtype
the client tracer gives a traced result, the dtype the server infers, and the dtype torch's
own op returns on real tensors are the same -- or all three refuse. In-place forms keep the
target's dtype or refuse where torch refuses (``int_tensor *= 0.5``)."""
from __future__ import annotations

import itertools

import pytest
import torch

from hookwire.frames import DTYPES
from hookwire.ops import OPS
from hookwire.shape_probe import run_for_shape
from hookwire.trace import Tracer, tracing

DTYPE_LIST = list(DTYPES.values())
SCALARS = [2, 2.5, True]
# op name -> the user's spelling (a function of two operands)
BINARY = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "floor_divide": lambda a, b: a // b,
    "remainder": lambda a, b: a % b, "pow": lambda a, b: a ** b,
    "maximum": torch.maximum, "eq": lambda a, b: a == b, "lt": lambda a, b: a < b,
    "logical_and": torch.logical_and, "bitwise_and": lambda a, b: a & b,
    "atan2": torch.atan2, "where": lambda a, b: torch.where(a > 0, a, b),
    "xlogy": torch.xlogy, "hypot": torch.hypot,
}


def real(dtype):
    """Values no op refuses for their own sake (no zero divisors): only dtypes decide."""
    return (torch.arange(6).reshape(2, 3) + 1).to(dtype)


def torch_result(fn, a, b):
    try:
        return fn(a, b).dtype
    except Exception:  # noqa: BLE001 - torch refusing is an outcome
        return "refused"


def traced_result(fn, a, b):
    """The dtype the client tracer gives when ``a`` is an activation (a proxy)."""
    tracer = Tracer()
    try:
        with tracing(tracer):
            x = tracer.read_site("s", 0, tuple(a.shape), a.dtype)
            return fn(x, b).dtype
    except Exception:  # noqa: BLE001 - a TraceError, or torch's own TypeError as locally
        return "refused"


def served_result(name, a, b):
    """The dtype the server infers for the op the tracer records (a meta activation)."""
    tracer = Tracer()
    with tracing(tracer):
        x = tracer.read_site("s", 0, tuple(a.shape), a.dtype)
        try:
            BINARY[name](x, b)
        except Exception:  # noqa: BLE001 - refused while tracing
            return "refused"
    meta = {0: torch.empty(a.shape, dtype=a.dtype, device="meta")}
    value = None
    for node in tracer.nodes[1:]:
        args = [meta[n["ref"]] if isinstance(n, dict) and "ref" in n else
                tracer.constants[n["const"]] if isinstance(n, dict) and "const" in n else n
                for n in node["args"]]
        kwargs = node.get("kwargs", {})
        try:
            value, _ = run_for_shape(OPS[node["op"]], tuple(_decode(v) for v in args),
                                     {k: _decode(v) for k, v in kwargs.items()}, 1 << 30)
        except Exception:  # noqa: BLE001 - the server refusing is an outcome
            return "refused"
        meta[node["id"]] = value
    return value.dtype


def _decode(v):
    if isinstance(v, dict) and "dtype" in v:
        return DTYPES[v["dtype"]]
    if isinstance(v, dict) and "float" in v:
        return float(v["float"])
    return v


def cases():
    for left, right in itertools.product(DTYPE_LIST, DTYPE_LIST):
        yield left, right
    for left, scalar in itertools.product(DTYPE_LIST, SCALARS):
        yield left, scalar


@pytest.mark.parametrize("name", list(BINARY))
def test_binary_promotion_matches_torch_for_every_dtype_pair(name):
    fn = BINARY[name]
    mismatches = []
    for left, right in cases():
        a = real(left)
        b = real(right) if isinstance(right, torch.dtype) else right
        want = torch_result(fn, a, b)
        got_client = traced_result(fn, a, b)
        got_server = served_result(name, a, b) if got_client != "refused" else "refused"
        if not (got_client == got_server == want):
            mismatches.append((left, right, want, got_client, got_server))
    assert not mismatches, f"(left, right, torch, client, server): {mismatches[:8]}"


def test_zero_dim_tensors_and_reversed_scalars_promote_like_torch():
    for dtype in DTYPE_LIST:
        a = real(dtype)
        for other in (torch.tensor(2.0, dtype=torch.float64), torch.tensor(3),
                      torch.tensor(True)):
            for fn in (lambda x, y: x * y, lambda x, y: y - x, lambda x, y: 2.5 / x,
                       lambda x, y: 3 ** x):
                want = torch_result(fn, a, other)
                assert traced_result(fn, a, other) == want, (dtype, other.dtype)


INPLACE = {"iadd": lambda a, b: a.__iadd__(b), "imul": lambda a, b: a.__imul__(b),
           "mul_": lambda a, b: a.mul_(b), "div_": lambda a, b: a.div_(b),
           "sub_": lambda a, b: a.sub_(b), "clamp_": lambda a, b: a.clamp_(min=b)}


@pytest.mark.parametrize("name", list(INPLACE))
def test_in_place_keeps_the_target_dtype_or_refuses_like_torch(name):
    fn = INPLACE[name]
    mismatches = []
    for left, right in cases():
        a = real(left)
        b = real(right) if isinstance(right, torch.dtype) else right
        want = torch_result(fn, a.clone(), b)
        got = traced_result(fn, a, b)
        if got != want:
            mismatches.append((left, right, want, got))
    assert not mismatches, f"(target, other, torch, traced): {mismatches[:8]}"
