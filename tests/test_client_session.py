"""The client's protocol state machine (``bridge/session.py``), driven directly: what it
sends is what the server's parser accepts, and what a lying server sends back is refused
(no socket, no model; milliseconds). The same lies are told over a real socket in
test_malicious_server.py. The last test has the two sessions speak to each other.
"""
from __future__ import annotations

import json

import graphs
import pytest
import torch
from graphs import node
from pydantic import ValidationError

from hookwire import __version__
from hookwire.errors import GraphValidationError, ProtocolError, UnknownModel
from hookwire.frames import encode_chunks, header_for
from hookwire.protocol import (PROTOCOL_VERSION, Accepted, Done, Error, HelloOk, ModelInfo,
                               Progress, Result, Submit, dump, parse_client_message,
                               parse_client_message_bounded)
from hookwire.server.memory import MemoryBudget
from hookwire.server.residents import Residents
from hookwire.server.session import RunRequest, ServerSession
from hookwire.session import (MAX_RESULT_BYTES, Answered, ClientSession, RequestDone,
                              RequestEvent, RequestFailed, ValueReceived)
from hookwire.validate import Limits


def graph(saves=("resid",)) -> dict:
    return graphs.graph(sites=[("blocks.0.hook_resid_pre", 0)],
                        nodes=[node(0, "site.read", 0)], saves={name: 0 for name in saves})


def started(saves=("resid",), tensors=None, rid="r1") -> tuple[ClientSession, list]:
    """A session with request ``rid`` sent; the messages it sent."""
    s = ClientSession()
    tensors = tensors if tensors is not None else {"input_ids": torch.arange(6).view(1, 6)}
    sent = list(s.submit(rid, graph(saves), tensors))
    return s, sent


def result(rid: str, name: str, tensor: torch.Tensor, tid: str = "t0", **kw) -> list:
    """A server's ``result`` and its frames (none for an empty tensor)."""
    return [dump(Result(request_id=rid, name=name, tensor=header_for(tid, tensor), **kw)),
            *(encode_chunks(rid, tid, tensor) if tensor.numel() else ())]


def feed(s: ClientSession, messages) -> list:
    events = []
    for m in messages:
        events += s.receive(m)
    return events


def test_every_message_is_one_the_server_parser_accepts():
    s = ClientSession()
    hello = parse_client_message(s.hello())
    assert (hello.type, hello.protocol, hello.client_version) == \
        ("hello", PROTOCOL_VERSION, __version__)
    s.receive(dump(HelloOk(protocol=1, server_version="x", models=[])))
    info = parse_client_message(s.model_info("tiny-gpt2", {"use_split_qkv_input",
                                                           "use_attn_result"}))
    assert info.tl_flags == ["use_attn_result", "use_split_qkv_input"]
    assert parse_client_message(s.cancel("r9")).request_id == "r9"


def test_the_submit_text_and_frames_are_what_the_server_admits():
    tensors = {"input_ids": torch.arange(12).view(2, 6), "x": torch.randn(300_000)}
    s, sent = started(tensors=tensors)
    text, *frames = sent
    assert text.startswith('{"type":"submit","request_id":"r1",')  # read before parsing
    _, msg = parse_client_message_bounded(text, 1 << 20)
    assert isinstance(msg, Submit) and msg.graph.saves == {"resid": 0}
    assert [h.tid for h in msg.tensors] == ["input_ids", "x"]
    assert len(frames) == 3   # 96 bytes, then 1.2 MB in two chunks
    assert s.bytes_sent == len(text) + sum(len(f) for f in frames)


def test_the_submit_head_is_checked_with_the_models_before_anything_is_sent():
    s = ClientSession()
    with pytest.raises(ValidationError):
        s.submit("r" * 65, graph(), {})   # request ids are at most 64 characters
    assert not s.open
    bad_ref = {"tid": "x", "resident": "not-an-id", "dtype": "float32", "shape": [1],
               "stride": [1], "offset": 0}
    with pytest.raises(ValidationError):
        s.submit("r1", graph(), {}, refs=[bad_ref])
    assert not s.open


def test_values_arrive_as_their_last_byte_does_and_done_ends_the_request():
    s, _ = started(saves=("resid", "empty", "view"))
    value = torch.randn(3, 700_000)    # 8.4 MB: 9 frames
    head, *frames = result("r1", "resid", value, resident="v" + "0" * 24)
    events = s.receive(head)
    assert [type(e) for e in events] == [RequestEvent]
    for frame in frames[:-1]:
        assert s.receive(frame) == []
    (got,) = s.receive(frames[-1])
    assert isinstance(got, ValueReceived) and got.resident == "v" + "0" * 24
    assert torch.equal(got.tensor, value)
    empty = feed(s, result("r1", "empty", torch.empty(0, 4), tid="t1"))
    assert [type(e) for e in empty] == [ValueReceived, RequestEvent]
    alias = s.receive(dump(Result(request_id="r1", name="view",
                                  tensor=header_for("t2", value), alias_of="resid")))
    assert [type(e) for e in alias] == [ValueReceived, RequestEvent]
    assert alias[0].tensor.data_ptr() == got.tensor.data_ptr()   # a view, as on the server
    progress = s.receive(dump(Progress(request_id="r1", stage="started")))
    assert isinstance(progress[0].message, Progress)
    (done,) = s.receive(dump(Done(request_id="r1", timings={"total": 0.5})))
    assert isinstance(done, RequestDone) and not s.open
    assert set(done.values) == {"resid", "empty", "view"}
    assert done.done.timings == {"total": 0.5} and done.received > value.numel() * 4


def test_a_server_error_is_raised_as_its_type_and_ends_the_request():
    s, _ = started()
    (failed,) = s.receive(dump(Error(request_id="r1", code="graph_invalid", message="no",
                                     details={"node": 3, "rule": "unknown_op"})))
    assert isinstance(failed, RequestFailed) and not s.open
    assert isinstance(failed.error, GraphValidationError)
    assert failed.error.details == {"node": 3, "rule": "unknown_op"}
    s = ClientSession()
    s.model_info("gpt-5")
    (failed,) = s.receive(dump(Error(code="unknown_model", message="not here")))
    assert isinstance(failed.error, UnknownModel) and not s.open


@pytest.mark.parametrize("lie, match", [
    (lambda: result("r1", "secret", torch.ones(4)), "did not ask for"),
    (lambda: result("r1", "resid", torch.ones(4)) + result("r1", "resid", torch.ones(4)),
     "twice"),
    (lambda: result("r1", "resid", torch.ones(4))[:1] + result("r1", "resid", torch.ones(4),
                                                               tid="other")[1:],
     "did not announce"),
    (lambda: result("r1", "resid", torch.ones(4))[:1] + [dump(Done(request_id="r1"))],
     "before sending every result"),
    (lambda: [dump(Accepted(request_id="r2", queue_position=1))], "did not send"),
    (lambda: [dump(Result(request_id="r1", name="resid",
                          tensor=header_for("t0", torch.ones(4)), alias_of="nothing"))],
     "alias"),
    (lambda: [dump(Result(request_id="r1", name="resid",
                          tensor={"tid": "t0", "dtype": "float32",
                                  "shape": [MAX_RESULT_BYTES // 4 + 1]}))],
     "at most|accepts"),
    (lambda: [dump(HelloOk(protocol=1, server_version="x", models=[]))], "hello_ok during"),
    (lambda: ['{"type":"result","request_id":"r1","name":"resid","pickle":"..."}'],
     "malformed"),
])
def test_a_lying_server_is_a_protocol_error(lie, match):
    s, _ = started()
    with pytest.raises(ProtocolError, match=match):
        feed(s, lie())


def test_answers_nobody_asked_for_are_refused():
    with pytest.raises(ProtocolError, match="no exchange"):
        ClientSession().receive(dump(Done(request_id="r1")))
    s = ClientSession()
    s.hello()
    with pytest.raises(ProtocolError, match="binary"):
        s.receive(b"\x00\x00\x00\x00")
    s = ClientSession()
    s.hello()
    with pytest.raises(ProtocolError, match="expected hello_ok, got done"):
        s.receive(dump(Done(request_id="r1")))
    s = ClientSession()
    s.model_info("tiny-gpt2", {"use_attn_result"})
    info = {"type": "model_info", "model": "tiny-gpt2", "architecture": "GPT2LMHeadModel",
            "config": {}, "sites": [], "tokenizer_files": {}, "tl_flags": []}
    with pytest.raises(ProtocolError, match="other TL hook switches"):
        s.receive(json.dumps(info))
    s = ClientSession()
    s.model_info("tiny-gpt2")
    (answered,) = s.receive(json.dumps(info))
    assert isinstance(answered, Answered) and isinstance(answered.message, ModelInfo)


def test_one_exchange_at_a_time():
    s, _ = started()
    with pytest.raises(ProtocolError, match="one exchange at a time"):
        s.hello()
    s.receive(dump(Done(request_id="r1")))
    s.hello()   # the request ended: the next exchange may start


def test_the_two_sessions_speak_to_each_other():
    """A client session's submit, fed to a server session: the request the engine would
    run carries the client's very tensors; the server's answers end the client's request."""
    limits = Limits()
    residents = Residents(limits.max_resident_bytes, limits.resident_ttl_s,
                          limits.max_resident_bytes_total, limits.max_resident_device_bytes)
    server = ServerSession("u", residents.for_user("u"),
                           MemoryBudget(limits.max_pending_bytes_per_user,
                                        limits.max_pending_bytes_total), limits, {})
    tensors = {"input_ids": torch.arange(6).view(1, 6), "w": torch.randn(2_000_000)}
    client, sent = started(tensors=tensors, rid="both")
    for data in sent:
        if isinstance(data, bytes):
            server.receive_frame(data)
        else:
            server.receive_admitted(server.admit(data))
    (run,) = server.events_received()
    assert isinstance(run, RunRequest)
    arrived = run.incoming.assembler.tensors()
    assert all(torch.equal(arrived[k], v) for k, v in tensors.items())
    server.accepted("both", 1)
    events = feed(client, server.data_to_send() + [dump(Done(request_id="both"))])
    assert [type(e) for e in events] == [RequestEvent, RequestDone]
    run.incoming.reservation.release()


def test_a_protocol_error_leaves_the_exchange_open_so_the_connection_is_dropped():
    """The connection drops its socket when a session raises with an exchange open (the
    server may still be sending): the session says so."""
    s = ClientSession()
    s.model_info("tiny-gpt2")
    with pytest.raises(ProtocolError):
        s.receive(b"\x00")
    assert s.open
