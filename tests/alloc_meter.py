"""Measures what a torch call really allocates on the CPU: the peak of the c10 CPU allocator's
running total during the call, read from torch's profiler memory records (each allocation
and free with the allocator's total after it). Used to check the op cost models against
reality (tests/test_op_costs.py)."""
from __future__ import annotations

import gc
import warnings

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile


def peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak bytes allocated above the level before the call, the call's result)."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn(*args, **kwargs)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            events.append((e.start_time_ns, e.extra_fields.alloc_size))
        stack.extend(e.children)
    events.sort()
    current = peak = 0
    for _, size in events:
        current += size
        peak = max(peak, current)
    return peak, out


__all__ = ["peak_bytes"]
