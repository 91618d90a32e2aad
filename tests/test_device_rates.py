"""The rates a server prices each op at (``Limits.max_node_seconds``) are measured on its own
device at start; a start on a busy machine measures them low. The worker measures again when
idle and keeps the best seen (server/device_rates.py), so a server that started during a
load spike does not refuse ordinary ops for as long as it runs."""
from __future__ import annotations

import time

import torch
from graphs import const, graph, node, ref
from pipelined import PipelinedClient

import hookwire.server as hs
from hookwire.op_time import DeviceRates
from hookwire.server import device_rates
from hookwire.server.device_rates import rates_for, refine


def _set_rates(device, rates: DeviceRates) -> None:
    with device_rates._lock:
        device_rates._measured[str(torch.device(device))] = rates


def _started_worker(srv):
    """The server's model worker, once it has set up its idle re-measurement (and a
    deadline a minute away, for the test's own waits)."""
    worker = srv.server.worker
    deadline = time.monotonic() + 60
    while getattr(worker, "rates_refinement", None) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return worker, deadline


def test_refining_keeps_the_best_rate_seen():
    """A measurement never lowers a rate (a busy moment makes a run slower, never the device
    faster), and raises one measured too low."""
    device = torch.device("cpu")
    measured = rates_for(device)
    try:
        fast = DeviceRates(contraction_flops=1e30, element_ops=1e30)
        _set_rates(device, fast)
        assert refine(device) == fast
        _set_rates(device, DeviceRates(contraction_flops=1.0, element_ops=1.0))
        refined = refine(device)
        assert refined.contraction_flops > 1e6 and refined.element_ops > 1e5, refined
        assert rates_for(device) == refined
        # a request waiting: the product is measured, the add waits for the next time
        _set_rates(device, DeviceRates(contraction_flops=1.0, element_ops=1.0))
        partly = refine(device, waiting=lambda: True)
        assert partly.contraction_flops > 1e6 and partly.element_ops == 1.0, partly
    finally:
        _set_rates(device, measured)


def test_a_server_that_measured_its_device_slow_admits_ordinary_ops_once_idle(hosted):
    """The server's rates as a start on a machine busy beyond belief would leave them (1e6
    flop/s): a 128 x 128 product (4e6 flops, well under a millisecond on any CPU) is refused
    as over ``max_node_seconds``, naming the rule. The worker, idle after it, measures again,
    and the same request then runs and equals local torch."""
    device = hosted["tiny-gpt2"].device
    measured = rates_for(device)
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    client = PipelinedClient(srv.url)
    try:
        worker, deadline = _started_worker(srv)
        _set_rates(device, DeviceRates(contraction_flops=1e6, element_ops=1e6))
        worker.rates_refinement.EVERY_S = 0.0  # (a minute in service)
        gen = torch.Generator().manual_seed(0)
        column = torch.randn(128, 1, generator=gen)
        tokens = torch.randint(0, 256, (1, 4), generator=gen)
        product = graph("tiny-gpt2", [node(0, "expand", const("s"), 128, 128),
                                      node(1, "matmul", ref(0), ref(0))],
                        saves={"y": 1}, constants=["s"], return_type=None)
        tensors = {"input_ids": tokens, "s": column}
        rid = client.send(product, tensors)
        refused = client.collect([rid])[rid]
        assert refused.error is not None and refused.error.code == "limit_exceeded"
        assert refused.error.details["rule"] == "max_node_seconds"
        while rates_for(device).contraction_flops <= 1e6 and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker, idle, measuring again
        assert rates_for(device).contraction_flops > 1e8, rates_for(device)
        rid = client.send(product, tensors)
        served = client.collect([rid])[rid]
        assert served.error is None, served.error
        x = column.expand(128, 128)
        torch.testing.assert_close(served.values["y"], x @ x)
    finally:
        client.close()
        srv.stop()
        _set_rates(device, measured)


def test_refining_gives_up_the_add_between_its_steps_once_a_request_waits():
    """The add's measurement fills two 64 MiB inputs and runs twice (~0.1 s on a CPU): a
    request arriving meanwhile waits only for the step under way, and the rate stays."""
    device = torch.device("cpu")
    measured = rates_for(device)
    low = DeviceRates(contraction_flops=1.0, element_ops=1.0)
    try:
        for steps in (1, 2, 3):  # a request comes after the first, second or third step
            asked = []
            _set_rates(device, low)
            refined = refine(device, waiting=lambda: asked.append(1) or len(asked) > steps)
            assert refined.element_ops == 1.0, (steps, refined)
            assert refined.contraction_flops > 1e6, (steps, refined)
    finally:
        _set_rates(device, measured)


def _cannot_allocate(*args, **kwargs):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                       "allocate memory: you tried to allocate 67108864 bytes")


def test_a_measurement_that_cannot_allocate_keeps_the_rates(monkeypatch):
    """Co-tenants may hold the memory when the worker, idle, measures again: a CPU
    allocator that cannot allocate raises ``RuntimeError`` (not ``OutOfMemoryError``). The
    measurement is skipped and the rates stay as they were."""
    device = torch.device("cpu")
    measured = rates_for(device)
    monkeypatch.setattr(device_rates, "_product_rate", _cannot_allocate)
    monkeypatch.setattr(device_rates, "_add_rate", _cannot_allocate)
    assert refine(device) == measured
    assert rates_for(device) == measured


def test_a_worker_whose_idle_housekeeping_fails_serves_on(hosted):
    """Whatever fails in the worker's idle housekeeping (here its rates' re-measurement
    raises every time it is asked) is logged, and the worker goes on serving: it used to run
    outside the worker's guard, so one failure ended the worker thread and every request
    after it waited forever."""
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    client = PipelinedClient(srv.url)
    try:
        worker, deadline = _started_worker(srv)
        failures = []

        def failing_idle():
            failures.append(time.monotonic())
            _cannot_allocate()
        worker.rates_refinement.idle = failing_idle
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, 256, (1, 4), generator=gen)
        reads = graph("tiny-gpt2", [node(0, "site.read", 0)],
                      sites=["blocks.0.hook_resid_post"], saves={"r": 0}, return_type=None)
        for k in range(2):  # the housekeeping runs (and fails) after each request
            rid = client.send(reads, {"input_ids": tokens})
            served = client.collect([rid], timeout=60)[rid]
            assert served.error is None, served.error
            with torch.no_grad():
                _, cache = hosted["tiny-gpt2"].bridge.run_with_cache(tokens)
            torch.testing.assert_close(served.values["r"], cache["blocks.0.hook_resid_post"],
                                       rtol=0, atol=0)
            while len(failures) <= k and time.monotonic() < deadline:
                time.sleep(0.01)  # the worker, idle again, fails its housekeeping
            assert len(failures) > k
        assert worker.is_alive()
    finally:
        client.close()
        srv.stop()


def test_timing_waits_for_any_accelerator_not_only_cuda(monkeypatch):
    """On an accelerator kernels run asynchronously: each timed run must wait for them (it
    used to only on CUDA, so an XPU's or MPS's rate was the launch's, far too fast). On a
    CPU nothing is waited for."""
    waited = []
    monkeypatch.setattr(torch.accelerator, "synchronize", lambda device=None: waited.append(
        str(device)))
    device_rates._best_seconds(lambda: None, torch.device("xpu"), runs=3)
    assert waited == ["xpu"] * 4  # the warm-up and each of the three runs
    waited.clear()
    device_rates._best_seconds(lambda: None, torch.device("cpu"), runs=3)
    assert waited == []
