"""The rates a server's device runs ops at, measured once per device and process, for
``hookwire.op_time`` to estimate each op's time before it runs (``Limits.max_node_seconds``).

Two measurements, each the best of a few runs (a busy machine makes a run slower, never
faster, so the best is the device's own speed and a shared machine errs towards admitting):
a float32 matrix product (the contraction rate) and a float32 add of tensors larger than the
CPU's caches (the per-element rate). 0.3-0.5 s on a CPU; the first request on a device
pays it if the worker has not measured it at start.
"""
from __future__ import annotations

import threading
import time

import torch

from hookwire.op_time import DeviceRates

_RUNS = 5
_measured: dict[str, DeviceRates] = {}
_lock = threading.Lock()


def _best_seconds(fn, device: torch.device) -> float:
    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm: allocator, kernels, thread team
    synchronize()
    best = float("inf")
    for _ in range(_RUNS):
        t0 = time.perf_counter()
        fn()
        synchronize()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


def measure(device: torch.device) -> DeviceRates:
    """Time a matrix product and an add on ``device`` (in the calling thread: its thread
    team and subnormal mode are the ones the worker's ops will run with). On an accelerator
    whose memory the model has nearly filled, smaller tensors are tried (the add's rate is
    then an over-estimate of a large add's: the margin errs towards admitting), and what the
    measurement allocated is handed back to the device afterwards."""
    accelerator = device.type != "cpu"
    side = 4096 if accelerator else 512
    elements = 1 << (26 if accelerator else 24)  # past the caches: 192 MiB on a CPU
    try:
        while True:
            try:
                return _timed(device, side, elements)
            except torch.OutOfMemoryError:
                if elements <= 1 << 16:
                    raise
                side, elements = max(side // 2, 256), elements // 4
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed(device: torch.device, side: int, elements: int) -> DeviceRates:
    with torch.no_grad():  # (constant values: nothing here may draw from torch's RNG)
        a = torch.full((side, side), 0.5, device=device)
        b = torch.full((side, side), 0.25, device=device)
        x = torch.full((elements,), 0.5, device=device)
        y = torch.full((elements,), 0.25, device=device)
        gemm = _best_seconds(lambda: torch.mm(a, b), device)
        add = _best_seconds(lambda: torch.add(x, y), device)
    return DeviceRates(contraction_flops=2 * side ** 3 / gemm, element_ops=elements / add)


def rates_for(device: torch.device | str) -> DeviceRates:
    """The device's rates, measured the first time any worker of this process asks."""
    device = torch.device(device)
    key = str(device)
    with _lock:
        if key not in _measured:
            _measured[key] = measure(device)
        return _measured[key]


__all__ = ["rates_for", "measure"]
