"""Many requests in flight on one real websocket connection, for tests that need requests to
be *queued together* on the server (so they share a batched forward) rather than hoping that
threads started together land in one batch window.

Speaks the wire protocol directly: a submit and its tensors' frames per request, then every
answer is collected per request id (results reassembled from their frames, exactly one done
or error each)."""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import pytest
import torch
from websockets.sync.client import connect

from hookwire.frames import TensorAssembler, decode_frame, encode_chunks, header_for
from hookwire.protocol import PROTOCOL_VERSION, Done, Error, Result, parse_server_message


@dataclass
class Answer:
    values: dict = field(default_factory=dict)
    done: Done | None = None
    error: Error | None = None

    @property
    def batch_size(self) -> int:
        return int(self.done.timings["batch_size"]) if self.done else 0


class PipelinedClient:
    def __init__(self, url: str, api_key: str | None = None):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.ws = connect(url, additional_headers=headers, compression=None, max_size=None,
                          ping_interval=None)
        self.ws.send(json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION,
                                 "client_version": "test"}))
        assert parse_server_message(self.ws.recv(timeout=30)).type == "hello_ok"

    def send(self, graph: dict, tensors: dict, rid: str | None = None, **extra) -> str:
        rid = rid or f"p-{uuid.uuid4().hex[:12]}"
        self.ws.send(json.dumps({"type": "submit", "request_id": rid, "graph": graph,
                                 "tensors": [header_for(t, v).model_dump()
                                             for t, v in tensors.items()],
                                 "keep_results": False, **extra}))
        for tid, value in tensors.items():
            for frame in encode_chunks(rid, tid, value):
                self.ws.send(frame)
        return rid

    def collect(self, rids, timeout: float = 300) -> dict[str, Answer]:
        answers = {rid: Answer() for rid in rids}
        pending: dict[str, tuple[str, str, TensorAssembler]] = {}
        deadline = time.monotonic() + timeout
        while any(a.done is None and a.error is None for a in answers.values()):
            data = self.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
            if isinstance(data, bytes):
                head, payload = decode_frame(data)
                rid, name, asm = pending[head["tid"]]
                asm.add(head, payload)
                if asm.complete:
                    answers[rid].values[name] = asm.tensors()[head["tid"]]
                    del pending[head["tid"]]
                continue
            msg = parse_server_message(data)
            answer = answers.get(getattr(msg, "request_id", None))
            if answer is None:
                continue
            if isinstance(msg, Result) and msg.alias_of is not None:
                # The same tensor as a value this request already received (sent once).
                answer.values[msg.name] = answer.values[msg.alias_of]
            elif isinstance(msg, Result):
                asm = TensorAssembler([msg.tensor], msg.tensor.nbytes())
                if msg.tensor.nbytes() == 0:
                    answer.values[msg.name] = asm.tensors()[msg.tensor.tid]
                else:
                    pending[msg.tensor.tid] = (msg.request_id, msg.name, asm)
            elif isinstance(msg, Done):
                assert answer.done is None and answer.error is None, "two final answers"
                answer.done = msg
            elif isinstance(msg, Error):
                assert answer.done is None and answer.error is None, "two final answers"
                answer.error = msg
        return answers

    def close(self):
        self.ws.close()


def equal_values(a: dict, b: dict) -> bool:
    """Bit-equal (NaN where NaN), same names."""
    return a.keys() == b.keys() and all(
        x.dtype == b[k].dtype and x.shape == b[k].shape and torch.equal(
            torch.nan_to_num(x, nan=0.0) if x.is_floating_point() else x,
            torch.nan_to_num(b[k], nan=0.0) if x.is_floating_point() else b[k])
        and torch.equal(x.isnan(), b[k].isnan()) for k, x in a.items())


def assert_memory_given_back(srv, timeout: float = 30) -> None:
    """Every byte the server counted for requests and results goes back (the worker finishes
    a request just after its ``done``, so wait for it a little)."""
    deadline = time.monotonic() + timeout
    while srv.server.memory.pending_total and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.server.memory.pending_total == 0


def run_pair(writer: PipelinedClient, reader: PipelinedClient, wgraph, rgraph, tokens,
             expect_batched: bool, tries: int = 6):
    """Send the writer's and the reader's request back to back; retry until they shared a
    forward (or, for a writer that must not be co-batched, once). Returns their answers."""
    for _ in range(tries):
        w = writer.send(wgraph, {"input_ids": tokens})
        r = reader.send(rgraph, {"input_ids": tokens})
        wa, ra = writer.collect([w])[w], reader.collect([r])[r]
        if not expect_batched or (wa.batch_size == 2 or (wa.error and ra.batch_size == 2)):
            return wa, ra
    pytest.fail("the writer and the reader never shared a forward")


def record_retries(monkeypatch) -> list:
    """The crashes after which the worker ran a batch's members again without each other
    (``ModelWorker._run_again``, called through unchanged): a list of their type names."""
    from hookwire.server.worker import ModelWorker

    retries: list = []
    run_again = ModelWorker._run_again

    def counted(self, ready, crash):
        retries.append(type(crash).__name__)
        return run_again(self, ready, crash)
    monkeypatch.setattr(ModelWorker, "_run_again", counted)
    return retries
