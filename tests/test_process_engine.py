"""The process engine: each model in a process of its own, the front relaying. The core TL
tests run on it too (``ALSO_OUT_OF_PROCESS`` / ``EVERY_ENGINE`` in their own files); this file
holds what only this engine has: its health report, co-batched clients equal to local,
cancels, a model process killed under load (nothing lost, the process started again), what
crosses the link, and no process left behind."""
from __future__ import annotations

import json
import os
import signal

import psutil
import pytest
import torch
from torch.testing import assert_close

import hookwire.server as hs
from conftest import MODEL_NAMES
from graphs import graph, node
from hookwire.errors import HookwireError, ReplicaLost
from hookwire.protocol import Progress
from relayed_clients import (SITE, check_cancel_while_running, check_scaled, health,
                             run_clients)
from hookwire.server.process_link import (CHUNK_BYTES, RunAssembly, items_messages, items_of,
                                          payload_of_run, run_messages)

pytestmark = [pytest.mark.engines("process"), pytest.mark.timeout(600),
              pytest.mark.filterwarnings("ignore:.*gated-off hook name.*")]

def _model_pids(server) -> dict:
    return health(server)["engine"]["pids"]


def test_health_names_the_process_engine_and_its_processes(server):
    info = health(server)
    assert info["engine"]["kind"] == "process"
    assert sorted(info["models"]) == sorted(MODEL_NAMES)
    pids = info["engine"]["pids"]
    assert sorted(pids) == sorted(MODEL_NAMES)
    children = {p.pid for p in psutil.Process().children()}
    assert set(pids.values()) <= children  # each model in a child process of the front


def test_concurrent_clients_equal_local_and_share_forwards(server, local_models, tokens):
    results = run_clients(server.url, n_clients=6, per_client=4, tokens=tokens)
    assert len(results) == 24
    for k, values in results:
        assert not isinstance(values, ReplicaLost), values
        check_scaled(values, local_models["tiny-gpt2"], tokens, k)


def test_cancel_while_the_model_process_runs_it(server, local_models, remote_models):
    check_cancel_while_running(server, local_models, remote_models)


def test_killing_the_model_process_under_load_loses_no_request(server, local_models, tokens):
    """SIGKILL the tiny-gpt2 process while 6 clients keep sending: every request ends in a
    correct result or a typed ReplicaLost (none hangs), and the engine starts the process
    again, which then answers requests."""
    engine = server.server.worker
    local = local_models["tiny-gpt2"]
    victim = _model_pids(server)["tiny-gpt2"]
    restarts = engine.restarts
    killed: dict = {}

    def kill_once(results):
        if len(results) == 4 and not killed:
            killed["retried"] = engine.retried
            os.kill(victim, signal.SIGKILL)
            killed["pid"] = victim

    results = run_clients(server.url, n_clients=6, per_client=4, tokens=tokens,
                          after_each=kill_once)
    assert killed, "the load ended before the process was killed"
    assert len(results) == 24
    answered = [(k, v) for k, v in results if not isinstance(v, ReplicaLost)]
    for k, values in answered:
        check_scaled(values, local, tokens, k)
    assert len(answered) >= len(results) // 2
    assert engine.restarts == restarts + 1
    assert not psutil.pid_exists(victim) or \
        psutil.Process(victim).status() == psutil.STATUS_ZOMBIE
    fresh = _model_pids(server)["tiny-gpt2"]
    assert fresh != victim
    for k, values in run_clients(server.url, n_clients=2, per_client=2, tokens=tokens):
        assert not isinstance(values, ReplicaLost), values
        check_scaled(values, local, tokens, k)


def test_stopping_the_server_stops_its_model_processes():
    srv = hs.start(models=["tiny-gpt2"], port=0, engine="process")
    try:
        pid = srv.server.worker.processes["tiny-gpt2"].proc.pid
        assert psutil.pid_exists(pid)
    finally:
        srv.stop()
    assert srv.server.worker.processes["tiny-gpt2"].proc.poll() is not None


def test_a_model_that_cannot_load_is_a_typed_error_and_leaves_no_process(tmp_path):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(HookwireError, match="could not load"):
        hs.start(models=[str(tmp_path / "no-such-checkpoint")], port=0, engine="process")
    left = {p.pid for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE} - before
    assert not left


def _unpack(parts) -> tuple[dict, bytes]:
    raw = b"".join(bytes(p) for p in parts)
    head_len = int.from_bytes(raw[:4], "big")
    assert int.from_bytes(raw[4:12], "big") == len(raw) - 12 - head_len
    return json.loads(raw[12:12 + head_len]), raw[12 + head_len:]


def test_the_link_carries_data_only_and_checks_its_sizes():
    """What crosses between the front and a model process is JSON and raw bytes, sliced by
    the sizes the header states: a body that does not match them is refused; a large body
    travels in chunks that other messages may pass, and is put together again exactly."""
    payload = {"submit": '{"type": "submit"}', "user": "u", "received_bytes": 8,
               "mates_possible": False,
               "tensors": [{"header": {"tid": "a"}, "data": b"12345678"},
                           {"header": {"tid": "b"}, "data": b""}]}
    [parts] = run_messages(7, payload)
    header, body = _unpack(parts)
    back = payload_of_run(header, body)
    assert back["mates_possible"] is False and back["user"] == "u"
    assert back["submit"] == b'{"type": "submit"}'  # (in the body, not escaped in the header)
    assert [bytes(t["data"]) for t in back["tensors"]] == [b"12345678", b""]
    with pytest.raises(ValueError):
        payload_of_run({**header, "sizes": [9, 0]}, body)
    with pytest.raises(ValueError):
        payload_of_run({**header, "sizes": [-1, 9]}, body)
    big = bytes(range(256)) * (CHUNK_BYTES // 128 + 3)  # a little over two chunks
    messages = run_messages(8, {**payload, "tensors": [{"header": {"tid": "a"}, "data": big},
                                                       {"header": {"tid": "b"}, "data": b"xy"}]})
    assert len(messages) == 6  # the header, the submit, three chunks of a, then b
    header, body = _unpack(messages[0])
    assert header["chunked"] and body == b""
    assembly = RunAssembly(header)
    done = [assembly.add(_unpack(m)[1]) for m in messages[1:]]
    assert done == [False] * 4 + [True]
    back = payload_of_run(assembly.header, memoryview(assembly.body))
    assert [bytes(t["data"]) for t in back["tensors"]] == [big, b"xy"]
    with pytest.raises(ValueError):  # more data than declared
        assembly.add(b"z")
    items = ['{"type": "done"}', b"frame-bytes", {"replica": "x"}]
    [parts] = items_messages(3, items)
    header, body = _unpack(parts)
    assert items_of(header, body) == items
    with pytest.raises(ValueError):
        items_of(header, body + b"x")
    with pytest.raises(ValueError):
        items_of({"op": "items", "items": [["code", "print()"]]}, b"")
    frames = [bytes([k]) * (CHUNK_BYTES // 2 + 1) for k in range(3)]
    split = items_messages(3, ["{}"] + frames + ["{}"])
    assert len(split) == 3  # no message carries more than a chunk of frames
    assert [x for m in split for x in items_of(*_unpack(m))] == ["{}"] + frames + ["{}"]


def test_a_view_larger_than_its_resident_travels_as_the_resident():
    """A stride-0 view of a small resident value is copied where the model runs, when the
    request runs (with the worker's give-way), not by the front: the payload carries the
    resident's bytes and the view, and the model's side rebuilds the same job."""
    from types import SimpleNamespace

    from hookwire.protocol import ResidentRef, Submit
    from hookwire.server.job_payload import job_from_payload, job_to_payload
    from hookwire.server.worker import Job

    base = torch.arange(4, dtype=torch.float32)
    wide = ResidentRef(tid="wide", resident="v" + "0" * 32, dtype="float32",
                       shape=[1024, 4], stride=[0, 1], offset=0)
    narrow = ResidentRef(tid="narrow", resident="v" + "0" * 32, dtype="float32",
                         shape=[2], stride=[1], offset=2)
    submit = Submit.model_validate({"type": "submit", "request_id": "r1",
                                    "graph": graph(sites=[SITE], saves={}, nodes=[]),
                                    "tensors": [], "refs": []})
    conn = SimpleNamespace(user="u")
    job = Job(conn, "r1", submit, {}, 0, refs=[("wide", base, wide), ("narrow", base, narrow)])
    payload = job_to_payload(job)
    sent = sum(len(item["data"]) for item in payload["tensors"])
    assert sent == base.numel() * 4 + 2 * 4  # the resident once, and the narrow view
    back = job_from_payload(payload, conn)
    assert [tid for tid, _, _ in back.refs] == ["wide"]
    tid, rebuilt, ref = back.refs[0]
    assert_close(rebuilt.as_strided(ref.shape, ref.stride, ref.offset),
                 base.as_strided(wide.shape, wide.stride, wide.offset), rtol=0, atol=0)
    assert_close(back.tensors["narrow"], base[2:], rtol=0, atol=0)
    bad = {**payload, "refs": [{**payload["refs"][0],
                                "ref": {**payload["refs"][0]["ref"], "offset": 10}}]}
    with pytest.raises(RuntimeError):  # outside the resident: torch refuses the view
        job_from_payload(bad, conn)


def test_views_of_residents_and_large_uploads_reach_the_model_process_intact(server,
                                                                             local_models):
    """Through the process engine: a stride-0 view far larger than its resident value (sent
    as the resident and the view, copied in the model process) and an upload larger than the
    link's chunk (sent in pieces) give what they give locally."""
    from hookwire.residents import content_id
    from hookwire.frames import encode_chunks, header_for
    from pipelined import PipelinedClient

    tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
    client = PipelinedClient(server.url)
    try:
        small = torch.arange(64, dtype=torch.float32)
        cid = content_id(small)
        read = graph(sites=[SITE], saves={"r": 0}, nodes=[node(0, "site.read", 0)])
        read["forward"] = {"return_type": None}
        kept = client.send(read, {"input_ids": tokens, "small": small}, keep={"small": cid})
        assert client.collect([kept])[kept].error is None
        n = 1 << 20  # 4 MiB of float32 from 256 bytes
        view_graph = {"model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                      "constants": ["v"], "sites": [],
                      "nodes": [{"id": 0, "op": "getitem", "args": [{"const": "v"}, n - 1]},
                                {"id": 1, "op": "sum", "args": [{"const": "v"}]},
                                {"id": 2, "op": "add", "args": [{"ref": 0}, {"ref": 1}]}],
                      "saves": {"s": 2}, "forward": {"return_type": None}}
        rid = "view-1"
        client.ws.send(json.dumps({
            "type": "submit", "request_id": rid, "graph": view_graph,
            "tensors": [header_for("input_ids", tokens).model_dump()], "keep_results": False,
            "refs": [{"tid": "v", "resident": cid, "dtype": "float32", "shape": [n],
                      "stride": [0], "offset": 5}]}))
        for frame in encode_chunks(rid, "input_ids", tokens):
            client.ws.send(frame)
        big = torch.randn(3 * CHUNK_BYTES // 4 + 5, generator=torch.Generator().manual_seed(3))
        big_graph = {**view_graph, "nodes": [{"id": 0, "op": "getitem",
                                              "args": [{"const": "v"}, -1]},
                                             {"id": 1, "op": "sum", "args": [{"const": "v"}]},
                                             {"id": 2, "op": "add",
                                              "args": [{"ref": 0}, {"ref": 1}]}]}
        uploaded = client.send(big_graph, {"input_ids": tokens, "v": big})
        answers = client.collect([rid, uploaded])
        assert answers[rid].error is None, answers[rid].error
        assert_close(answers[rid].values["s"], torch.tensor(5.0 + 5.0 * n), rtol=0, atol=0)
        assert answers[uploaded].error is None, answers[uploaded].error
        assert_close(answers[uploaded].values["s"], big[-1] + big.sum())
    finally:
        client.close()


def test_a_request_in_the_model_process_each_time_it_dies_is_sent_again_once_only(
        server, local_models, remote_models):
    """The model process dies twice while the same request runs in it (as if the request
    killed it): the request is sent again once, then ends in a typed ReplicaLost -- it
    cannot restart the model for everyone a third time -- and the next request is served."""
    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    tokens = local.to_tokens(["hello world"])
    engine = server.server.worker
    restarts, retried = engine.restarts, engine.retried
    gate = torch.randn(64, 64)

    def slow(act, hook):
        x = act
        for _ in range(20000):  # seconds of real matmuls in the model process
            x = torch.tanh(x @ gate)
        return act + 0 * x

    run = remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", slow)],
                                blocking=False)
    killed: list = []
    for event in run.events():
        if isinstance(event, Progress) and event.stage == "started" and len(killed) < 3:
            pid = health(server)["engine"]["pids"]["tiny-gpt2"]
            if pid not in killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    with pytest.raises(ReplicaLost):
        run.result(timeout=120)
    assert len(killed) == 2  # (a third start would have been killed too)
    assert engine.retried == retried + 1
    assert engine.restarts >= restarts + 1
    assert_close(remote.run_with_hooks(tokens, fwd_hooks=[]), local(tokens))


def test_a_tenants_refused_requests_write_nothing_in_the_servers_log(server, local_models,
                                                                     caplog):
    """A request the relay refuses with a typed error (here: a model the server does not
    serve) is answered with that error and nothing else. Before, each one also logged an
    ERROR with its traceback, on the event loop: a tenant could write the operator's log, a
    traceback a ~500-byte request, as fast as it could send. The next request runs, equal
    to local TL."""
    import logging
    from pipelined import PipelinedClient

    tokens = local_models["tiny-gpt2"].to_tokens(["hello world"])
    client = PipelinedClient(server.url)
    try:
        elsewhere = graph(nodes=[])
        elsewhere["model"] = "not-served-here"
        with caplog.at_level(logging.INFO, logger="hookwire"):
            rids = [client.send(elsewhere, {"input_ids": tokens}) for _ in range(20)]
            answers = client.collect(rids, timeout=120)
            assert all(a.error is not None and a.error.code == "unknown_model"
                       for a in answers.values())
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        ok = graph(sites=[SITE], saves={"r": 0}, nodes=[node(0, "site.read", 0)])
        rid = client.send(ok, {"input_ids": tokens})
        answer = client.collect([rid])[rid]
        _, cache = local_models["tiny-gpt2"].run_with_cache(tokens)
        assert_close(answer.values["r"], cache[SITE])
    finally:
        client.close()
