"""Measures what torch calls really allocate on the CPU: the peak of the c10 CPU allocator's
running total during each call, read from torch's profiler memory records (every allocation
and free, with its time). Used to check the op cost models against reality
(tests/test_op_costs.py). One profiler session serves many calls: starting one costs more than
most of the calls it measures."""
from __future__ import annotations

import gc
import warnings

from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function


def peak_bytes_each(calls) -> list[tuple[int, object]]:
    """For each ``(fn, args, kwargs)``: (peak bytes allocated above the level before the
    call, the call's result). Results are kept alive until the end, so a call's frees of
    its own temporaries are all that lowers its running total."""
    gc.collect()
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for k, (fn, args, kwargs) in enumerate(calls):
                with record_function(f"hookwire_call_{k}"):
                    results.append(fn(*args, **kwargs))
    spans, allocations = {}, []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocations.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name.startswith("hookwire_call_"):
            spans[int(e.name.rsplit("_", 1)[1])] = (e.start_time_ns, e.end_time_ns)
        stack.extend(e.children)
    allocations.sort()
    out = []
    for k, result in enumerate(results):
        start, end = spans[k]
        current = peak = 0
        for t, size in allocations:
            if start <= t <= end:
                current += size
                peak = max(peak, current)
        out.append((peak, result))
    return out


def peak_bytes(fn, *args, **kwargs) -> tuple[int, object]:
    """(peak bytes allocated above the level before the call, the call's result)."""
    return peak_bytes_each([(fn, args, kwargs)])[0]


__all__ = ["peak_bytes", "peak_bytes_each"]
