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

import os
import signal
import time

import pytest

# Through hookwire's module, which sets what Ray must see before it is imported.
pytest.importorskip("hookwire.server.ray_cluster",
                    reason="the Ray engine needs the 'ray' extra (scripts/setup.sh installs it)")

import psutil  # noqa: E402  (installed with ray)
from conftest import MODEL_NAMES  # noqa: E402
from hookwire.errors import ReplicaLost  # noqa: E402
from relayed_clients import (check_cancel_while_running, check_scaled, health,  # noqa: E402
                             run_clients)

pytestmark = [pytest.mark.engines("ray"),
              pytest.mark.filterwarnings("ignore:.*gated-off hook name.*"),
              pytest.mark.timeout(600)]


def test_health_names_the_ray_engine(server):
    info = health(server)
    assert info["engine"]["kind"] == "ray"
    assert sorted(info["models"]) == sorted(MODEL_NAMES)


def test_concurrent_clients_are_spread_over_both_replicas(server, local_models, tokens):
    engine = server.server.worker
    before = dict(engine.served_by)
    results = run_clients(server.url, n_clients=8, per_client=4, tokens=tokens)
    assert len(results) == 32
    for k, values in results:
        check_scaled(values, local_models["tiny-gpt2"], tokens, k)
    served = {rid: n - before.get(rid, 0)
              for rid, n in health(server)["engine"]["served_by"].items()}
    gpt2 = {rid for rid, model in engine.replica_models.items() if model == "tiny-gpt2"}
    assert sum(served.values()) == 32 and set(served) <= set(engine.replica_models)
    assert {rid for rid, n in served.items() if n > 0} == gpt2 and len(gpt2) == 2, served


def test_cancel_while_the_replica_runs_it(server, local_models, remote_models):
    check_cancel_while_running(server, local_models, remote_models)


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
        run_clients(server.url, n_clients=4, per_client=2, tokens=tokens)
    victim = next(rid for rid, model in engine.replica_models.items() if model == "tiny-gpt2")
    killed: dict = {}

    def kill_once(results):
        if len(results) == 6 and not killed:  # mid-load: the other clients are waiting
            killed["pid"] = engine.replica_pids[victim]
            killed["retried"] = engine.retried
            os.kill(killed["pid"], signal.SIGKILL)

    results = run_clients(server.url, n_clients=8, per_client=6, tokens=tokens,
                          after_each=kill_once)
    assert killed, "the load ended before a replica was killed"
    assert len(results) == 48  # every request answered
    answered = [(k, v) for k, v in results if not isinstance(v, ReplicaLost)]
    for k, values in answered:
        check_scaled(values, local, tokens, k)
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
        fresh = run_clients(server.url, n_clients=4, per_client=2, tokens=tokens)
        for k, values in fresh:
            assert not isinstance(values, ReplicaLost), values
            check_scaled(values, local, tokens, k)
        new_ids = set(engine.replica_models) - known
        time.sleep(1)
    status = serve.status().applications["hookwire-tiny-gpt2"].deployments["model"]
    assert status.replica_states.get("RUNNING", 0) == 2, status
    assert new_ids, "no request reached the restarted replica"
    assert victim not in new_ids
    assert not psutil.pid_exists(killed["pid"]) or \
        psutil.Process(killed["pid"]).status() == psutil.STATUS_ZOMBIE
