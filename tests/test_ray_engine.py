"""The Ray engine: the same results as local TL when the models run as Ray Serve replicas,
requests spread over replicas, no accepted request lost when a replica dies, and nothing Ray
starts listens beyond loopback.

The session's one Ray server serves this module (2 replicas of tiny-gpt2, 1 of tiny-llama; see
tests/ray_helpers.py and tests/engines.py). The core TL tests that run on Ray too are marked
``ALSO_OUT_OF_PROCESS`` / ``EVERY_ENGINE`` in their own files; this file holds what only the
Ray engine has. Conftest runs it after those; the fault test kills a replica (Serve restarts it),
so it comes last.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
import torch
from torch.testing import assert_close

# Through hookwire's module, which sets what Ray must see before it is imported.
pytest.importorskip("hookwire.server.ray_cluster",
                    reason="the Ray engine needs the 'ray' extra (scripts/setup.sh installs it)")

import psutil  # noqa: E402  (installed with ray)
from conftest import MODEL_NAMES  # noqa: E402
from graphs import graph, node, ref  # noqa: E402
from hookwire.client import Connection  # noqa: E402
from hookwire.errors import ReplicaLost  # noqa: E402

pytestmark = [pytest.mark.engines("ray"),
              pytest.mark.filterwarnings("ignore:.*gated-off hook name.*"),
              pytest.mark.timeout(600)]


def health(server) -> dict:
    with urllib.request.urlopen(server.url.replace("ws://", "http://") + "/health",
                                timeout=10) as resp:
        return json.loads(resp.read())


SITE = "blocks.0.hook_resid_post"


def _graph(k: int) -> dict:
    """Scale the residual stream after block 0 by a per-request factor, save it, return
    logits: each client's answer depends on its own request."""
    return graph(sites=[SITE], saves={"resid": 1},
                 nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 0.5 + 0.1 * k),
                        node(2, "site.write", 0, ref(1), mode="replace")])


def _expected(local, tokens, k):
    seen: dict = {}

    def hook(act, hook):
        seen["resid"] = act * (0.5 + 0.1 * k)
        return seen["resid"]

    logits = local.run_with_hooks(tokens, fwd_hooks=[(SITE, hook)])
    return logits, seen["resid"]


def _run_clients(url, n_clients, per_client, tokens, on_result):
    """``n_clients`` threads, each with its own connection (its own user on the server),
    sending ``per_client`` requests one after another. ``on_result(k, values)`` gets each
    answer, or the ReplicaLost error a request ended with."""
    errors: list = []

    def client(c):
        conn = None
        try:
            conn = Connection(url)
            for i in range(per_client):
                k = (c * per_client + i) % 7
                try:
                    on_result(k, conn.run(_graph(k), {"input_ids": tokens}).values)
                except ReplicaLost as exc:  # typed, retryable: allowed while a replica dies
                    on_result(k, exc)
        except BaseException as exc:  # anything else fails the test
            errors.append(exc)
        finally:
            if conn is not None:
                conn.close()

    threads = [threading.Thread(target=client, args=(c,), name=f"ray-test-client-{c}")
               for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads), "a client hung: an accepted request was lost"
    assert not errors, errors


def _check(values, local, tokens, k):
    logits, resid = _expected(local, tokens, k)
    assert_close(values["resid"], resid)
    assert_close(values["__logits__"], logits)


def test_health_names_the_ray_engine(server):
    info = health(server)
    assert info["engine"]["kind"] == "ray"
    assert sorted(info["models"]) == sorted(MODEL_NAMES)


def test_concurrent_clients_are_spread_over_both_replicas(server, local_models, tokens):
    engine = server.server.worker
    before = dict(engine.served_by)
    results: list = []
    lock = threading.Lock()

    def on_result(k, values):
        with lock:
            results.append((k, values))

    _run_clients(server.url, n_clients=8, per_client=4, tokens=tokens, on_result=on_result)
    assert len(results) == 32
    for k, values in results:
        _check(values, local_models["tiny-gpt2"], tokens, k)
    served = {rid: n - before.get(rid, 0)
              for rid, n in health(server)["engine"]["served_by"].items()}
    gpt2 = {rid for rid, model in engine.replica_models.items() if model == "tiny-gpt2"}
    assert sum(served.values()) == 32 and set(served) <= set(engine.replica_models)
    assert {rid for rid, n in served.items() if n > 0} == gpt2 and len(gpt2) == 2, served


def test_cancel_while_the_replica_runs_it(server, local_models, remote_models):
    """A cancel that arrives while the replica is running the request: the client gets
    Cancelled, the engine holds nothing for it afterwards, the connection keeps serving."""
    from hookwire.errors import Cancelled
    from hookwire.protocol import Progress

    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    tokens = local.to_tokens(["hello world"])
    gate = torch.randn(64, 64)

    def slow(act, hook):
        x = act
        for _ in range(20000):  # seconds of real matmuls on the replica
            x = torch.tanh(x @ gate)
        return act + 0 * x

    run = remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", slow)],
                                blocking=False)
    for event in run.events():
        if isinstance(event, Progress) and event.stage in ("started", "site"):
            run.cancel()  # the replica has started it
            break
    with pytest.raises(Cancelled):
        run.result(timeout=120)
    assert_close(remote.run_with_hooks(tokens, fwd_hooks=[]), local(tokens))
    deadline = time.monotonic() + 30
    while server.server.worker.queue_depth() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.server.worker.queue_depth() == 0


def _ray_process(p: psutil.Process) -> bool:
    try:
        name = p.name()
        cmd = " ".join(p.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return name.startswith("ray::") or name in ("raylet", "gcs_server") or "ray/" in cmd


def test_nothing_listens_beyond_loopback(server):
    """Every listening TCP socket (IPv4 and IPv6) of this process, its descendants (Ray's GCS, raylet, agents,
    workers, Serve controller and replicas) and any other Ray process is on loopback."""
    ours = {psutil.Process().pid} | {p.pid for p in psutil.Process().children(recursive=True)}
    ray_pids = {p.pid for p in psutil.process_iter() if _ray_process(p)}
    assert any(p.name().startswith("ray::ServeRepli") for p in psutil.process_iter()
               if p.pid in ours), "no replica process found: the check would be empty"
    checked, bad = 0, []
    for c in psutil.net_connections(kind="inet"):  # what `ss -ltnp` lists, with owners' PIDs
        if c.status != psutil.CONN_LISTEN or c.pid not in ours | ray_pids:
            continue
        checked += 1
        host = c.laddr.ip
        if not (host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1")):
            bad.append(f"{host}:{c.laddr.port} pid {c.pid} {psutil.Process(c.pid).name()}")
    assert checked >= 5, checked  # GCS, raylet, replicas, controller, the front ... all seen
    assert not bad, "listening beyond loopback:\n" + "\n".join(bad)


def test_killing_a_replica_mid_load_loses_no_request(server, local_models, tokens):
    """Kill one tiny-gpt2 replica's process while 8 clients keep sending: every request ends
    in a correct result or a typed ReplicaLost (none hangs), and Serve starts a new replica
    that then serves requests."""
    from ray import serve

    engine = server.server.worker
    local = local_models["tiny-gpt2"]
    for _ in range(20):  # both replicas known to the engine (they answered something)
        if sum(m == "tiny-gpt2" for m in engine.replica_models.values()) >= 2:
            break
        _run_clients(server.url, n_clients=4, per_client=2, tokens=tokens,
                     on_result=lambda k, values: None)
    victim = next(rid for rid, model in engine.replica_models.items() if model == "tiny-gpt2")
    results: list = []
    lock = threading.Lock()
    killed: dict = {}

    def on_result(k, values):
        with lock:
            results.append((k, values))
            if len(results) == 6 and not killed:  # mid-load: the other clients are waiting
                killed["pid"] = engine.replica_pids[victim]
                killed["retried"] = engine.retried
                os.kill(killed["pid"], signal.SIGKILL)

    _run_clients(server.url, n_clients=8, per_client=6, tokens=tokens, on_result=on_result)
    assert killed, "the load ended before a replica was killed"
    assert len(results) == 48  # every request answered
    answered = [(k, v) for k, v in results if not isinstance(v, ReplicaLost)]
    for k, values in answered:
        _check(values, local, tokens, k)
    lost = len(results) - len(answered)
    print(f"after the kill: {engine.retried - killed['retried']} requests sent again, "
          f"{lost} answered with replica_lost")
    assert len(answered) >= len(results) // 2

    # Serve restarts the replica: a new one answers requests (bounded wait), and the
    # deployment is back to two running replicas.
    known = set(engine.replica_models)
    new_ids: set = set()
    deadline = time.monotonic() + 240
    while not new_ids and time.monotonic() < deadline:
        fresh: list = []
        _run_clients(server.url, n_clients=4, per_client=2, tokens=tokens,
                     on_result=lambda k, values: fresh.append((k, values)))
        for k, values in fresh:
            assert not isinstance(values, ReplicaLost), values
            _check(values, local, tokens, k)
        new_ids = set(engine.replica_models) - known
        time.sleep(1)
    status = serve.status().applications["hookwire-tiny-gpt2"].deployments["model"]
    assert status.replica_states.get("RUNNING", 0) == 2, status
    assert new_ids, "no request reached the restarted replica"
    assert victim not in new_ids
    assert not psutil.pid_exists(killed["pid"]) or \
        psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
