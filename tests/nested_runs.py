"""Two users' requests on one server, the first held inside its forward until the second
queues, then let go past the give-way quantum: the second runs nested in the first's forward
(server/give_way.py). For tests that check what the nested run does to each."""
from __future__ import annotations

import threading
import time

from hookwire.client import Connection


def held_beside(server, module, graph_a, tensors_a, graph_b, tensors_b) -> dict:
    """A's request is held at ``module``'s pre-hook until B's queues, then goes on past the
    give-way quantum: B's runs nested in A's forward there. Both results by key."""
    worker = server.server.worker
    released = threading.Event()

    def entering(_module, _args):
        if not released.is_set():
            deadline = time.monotonic() + 30
            while not worker.scheduler.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(0.01)  # past the give-way quantum
            released.set()

    handle = module.register_forward_pre_hook(entering)
    conns = [Connection(server.url), Connection(server.url)]
    results: dict = {}

    def run(key, conn, g, tensors):
        try:
            results[key] = conn.run(g, tensors)
        except Exception as exc:  # reported below, not lost with the thread
            results[key] = exc

    a = threading.Thread(target=run, args=("a", conns[0], graph_a, tensors_a))
    b = threading.Thread(target=run, args=("b", conns[1], graph_b, tensors_b))
    try:
        a.start()
        deadline = time.monotonic() + 60
        while not worker.current and time.monotonic() < deadline:
            time.sleep(0.001)
        b.start()
        a.join(120)
        b.join(120)
    finally:
        for conn in conns:
            conn.close()
        handle.remove()
    assert released.is_set() and not a.is_alive() and not b.is_alive()
    errors = {k: v for k, v in results.items() if isinstance(v, Exception)}
    assert not errors, errors
    return results
