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
        worker = srv.server.worker
        deadline = time.monotonic() + 60
        while getattr(worker, "rates_refinement", None) is None and time.monotonic() < deadline:
            time.sleep(0.01)
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
