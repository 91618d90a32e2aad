"""The rates a server's device runs ops at, measured once per device and process, for
``hookwire.op_time`` to estimate each op's time before it runs (``Limits.max_node_seconds``).

Two measurements, each the best of a few runs (a busy machine makes a run slower, never
faster, so the best is the device's own speed and a shared machine errs towards admitting):
a float32 matrix product (the contraction rate) and a float32 add of tensors larger than the
CPU's caches (the per-element rate). 0.3-0.5 s on a CPU; the first request on a device
pays it if the worker has not measured it at start.

A server started while its machine is busy measures it slow, and would then refuse, for as
long as it runs, ops that take well under ``max_node_seconds`` (a test did, on a loaded CI
machine). So the worker measures again when it is idle (:class:`IdleRefinement`: one product
and one add, at most once a minute, given up between steps of ~40 ms or less on a CPU once a
request is waiting) and each rate keeps the best it has seen (:func:`refine`): rates only
rise, towards the device's own.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from hookwire.op_time import DeviceRates

log = logging.getLogger("hookwire.server")

_RUNS = 5
_measured: dict[str, DeviceRates] = {}
_sizes: dict[str, tuple[int, int]] = {}  # device -> (product side, add elements) it took
_lock = threading.Lock()


def _best_seconds(fn, device: torch.device, runs: int = _RUNS,
                  waiting: Callable[[], bool] = lambda: False) -> float:
    def synchronize():
        # Kernels on an accelerator run asynchronously: wait for them, or the time taken is
        # the launch's. Any accelerator torch knows (CUDA, ROCm, XPU, MPS...), not only CUDA.
        if device.type == "cpu":
            return
        if hasattr(torch, "accelerator"):  # torch >= 2.6
            torch.accelerator.synchronize(device)
        elif device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm: allocator, kernels, thread team
    synchronize()
    best = float("inf")
    if waiting():  # a request came: no time taken (a rate of 0, which refining ignores)
        return best
    for _ in range(runs):
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
                rates = _timed(device, side, elements)
                _sizes[str(device)] = side, elements
                return rates
            except torch.OutOfMemoryError:
                if elements <= 1 << 16:
                    raise
                side, elements = max(side // 2, 256), elements // 4
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _timed(device: torch.device, side: int, elements: int) -> DeviceRates:
    return DeviceRates(contraction_flops=_product_rate(device, side),
                       element_ops=_add_rate(device, elements))


def _product_rate(device: torch.device, side: int, runs: int = _RUNS) -> float:
    with torch.no_grad():  # (constant values: nothing here may draw from torch's RNG)
        a = torch.full((side, side), 0.5, device=device)
        b = torch.full((side, side), 0.25, device=device)
        return 2 * side ** 3 / _best_seconds(lambda: torch.mm(a, b), device, runs)


def _add_rate(device: torch.device, elements: int, runs: int = _RUNS,
              waiting: Callable[[], bool] = lambda: False) -> float:
    """Elements per second of an add; 0 if ``waiting()`` says a request came between its
    steps (each ~30-40 ms on a CPU: filling each input, the warm-up, the timed run)."""
    with torch.no_grad():
        x = torch.full((elements,), 0.5, device=device)
        if waiting():
            return 0.0
        y = torch.full((elements,), 0.25, device=device)
        if waiting():
            return 0.0
        return elements / _best_seconds(lambda: torch.add(x, y), device, runs, waiting)


def rates_for(device: torch.device | str) -> DeviceRates:
    """The device's rates, measured the first time any worker of this process asks."""
    device = torch.device(device)
    key = str(device)
    with _lock:
        if key not in _measured:
            _measured[key] = measure(device)
        return _measured[key]


def refine(device: torch.device | str, waiting: Callable[[], bool] = lambda: False) -> \
        DeviceRates:
    """Measure ``device`` once more -- one product, then one add, at the sizes its first
    measurement took, the add given up between its steps once ``waiting()`` says a request
    waits -- and keep for each rate the best seen. Returns the rates now in use."""
    device = torch.device(device)
    key = str(device)
    rates_for(device)  # (its first measurement, if it has none yet)
    side, elements = _sizes.get(key, (512, 1 << 24))
    product = add = 0.0
    try:
        product = _product_rate(device, side, runs=1)
        if not waiting():
            add = _add_rate(device, elements, runs=1, waiting=waiting)
    except (torch.OutOfMemoryError, RuntimeError, MemoryError) as exc:
        # The model's requests have the memory now (a CPU allocator that cannot allocate
        # raises RuntimeError): the rates stay as they are, and the next idle minute tries
        # again.
        log.info("device %s: measuring again failed (%s); rates kept", key,
                 str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with _lock:
        current = _measured[key]
        best = DeviceRates(contraction_flops=max(current.contraction_flops, product),
                           element_ops=max(current.element_ops, add))
        if best != current:
            log.info("device %s measured faster when idle: %.3g flop/s products, %.3g "
                     "elements/s (were %.3g, %.3g)", key, best.contraction_flops,
                     best.element_ops, current.contraction_flops, current.element_ops)
        _measured[key] = best
        return best


class IdleRefinement:
    """When the model worker measures its devices again (:func:`refine`): ``idle()`` with
    nothing queued, at most every ``EVERY_S``; ``waiting()`` says a request came meanwhile
    (the rest of the measurement waits for the next time). Returns whether it measured."""
    EVERY_S = 60.0

    def __init__(self, devices, waiting: Callable[[], bool], clock=time.monotonic):
        self.devices = list(dict.fromkeys(str(d) for d in devices))
        self.waiting, self.clock = waiting, clock
        self.last = clock()

    def idle(self) -> bool:
        if self.clock() - self.last < self.EVERY_S:
            return False
        for device in self.devices:
            if self.waiting():
                break
            refine(device, self.waiting)
        self.last = self.clock()
        return True


__all__ = ["rates_for", "measure", "refine", "IdleRefinement"]
