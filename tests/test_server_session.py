"""Protocol abuse, driven straight into the server's protocol state machine
(``server/session.py``): no socket, no event loop, no model -- each test runs in
milliseconds. What a hostile client can send (lying headers, stray or oversized frames,
unfinished submits, floods of ids, other users' resident ids) and what the session must
answer, drop and release. The same properties are tested end to end against a real server
in test_server_protocol.py, test_isolation.py and test_hostile_corpus.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from graphs import read_graph

from hookwire import __version__
from hookwire.frames import CHUNK_BYTES, encode_chunks, header_for
from hookwire.protocol import PROTOCOL_VERSION, parse_server_message
from hookwire.server.memory import MemoryBudget
from hookwire.server.residents import Residents
from hookwire.server.session import (MAX_FRAME_BYTES, CancelRequest, Incoming,
                                     ProbeHookMode, Refusal, RunRequest, ServerSession)
from hookwire.validate import Limits

MiB = 1 << 20


class Clock:
    """Time the test moves by hand (the session's ``clock``)."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class ServedModel:
    """What a session needs of a served model: its ``model_info`` answer."""

    def __init__(self, info_json: str):
        self.info_json = info_json


def graph(model: str = "tiny-gpt2") -> dict:
    return read_graph(model, [("blocks.0.hook_resid_pre", 0)], names=["resid"])


def submit_text(rid: str, tensors: dict, refs=()) -> str:
    return json.dumps({"type": "submit", "request_id": rid, "graph": graph(),
                       "tensors": [header_for(t, v).model_dump() for t, v in tensors.items()],
                       "refs": list(refs)})


@pytest.fixture
def world():
    """A session factory over one server's shared state (residents, memory budget)."""
    limits = Limits(max_pending_bytes_per_user=64 * MiB, max_pending_bytes_total=96 * MiB,
                    submit_timeout_s=60.0)
    residents = Residents(limits.max_resident_bytes, limits.resident_ttl_s,
                          limits.max_resident_bytes_total, limits.max_resident_device_bytes)
    memory = MemoryBudget(limits.max_pending_bytes_per_user, limits.max_pending_bytes_total)
    clock = Clock()
    entries = {"tiny-gpt2": ServedModel('{"type":"model_info","model":"tiny-gpt2"}')}

    def session(user: str = "alice") -> ServerSession:
        return ServerSession(user, residents.for_user(user), memory, limits, entries,
                             clock=clock)

    return type("World", (), {"session": staticmethod(session), "memory": memory,
                              "residents": residents, "clock": clock, "limits": limits})


def text(session: ServerSession, message: str) -> None:
    """A text message, as the front hands it over: admitted (off the loop), then received."""
    session.receive_admitted(session.admit(message))


def answers(session: ServerSession) -> list:
    return [parse_server_message(m) for m in session.data_to_send()]


def frames(rid: str, tensors: dict, chunk: int = CHUNK_BYTES) -> list[bytes]:
    return [f for tid, t in tensors.items() for f in encode_chunks(rid, tid, t, chunk)]


def test_hello_is_answered_and_a_wrong_version_refused(world):
    s = world.session()
    text(s, json.dumps({"type": "hello", "protocol": PROTOCOL_VERSION, "client_version": "t"}))
    (ok,) = answers(s)
    assert (ok.type, ok.protocol, ok.server_version, ok.models) == \
        ("hello_ok", PROTOCOL_VERSION, __version__, ["tiny-gpt2"])
    text(s, json.dumps({"type": "hello", "protocol": 99, "client_version": "t"}))
    (err,) = answers(s)
    assert (err.type, err.code, err.request_id) == ("error", "protocol_error", None)
    assert "protocol 99" in err.message
    assert s.events_received() == []


def test_a_complete_submit_becomes_one_run_event_with_the_bytes_sent(world):
    s = world.session()
    tensors = {"input_ids": torch.arange(12).reshape(2, 6),
               "big": torch.randn(3 * CHUNK_BYTES // 4)}   # 3 chunks of 1 MiB
    text(s, submit_text("r1", tensors))
    assert s.events_received() == [] and s.data_to_send() == []
    assert s.deadline == world.clock.now + world.limits.submit_timeout_s
    held = world.memory.pending_of("alice")
    assert held == sum(t.numel() * t.element_size() for t in tensors.values())
    sent = frames("r1", tensors)
    assert len(sent) == 4
    for frame in sent:
        s.receive_frame(frame)
    (event,) = s.events_received()
    assert isinstance(event, RunRequest) and s.deadline is None
    received = event.incoming.assembler.tensors()
    for tid, t in tensors.items():
        assert torch.equal(received[tid], t)
    s.accepted("r1", 1)
    (acc,) = answers(s)
    assert (acc.type, acc.request_id, acc.queue_position) == ("accepted", "r1", 1)
    event.incoming.reservation.release()  # what the engine's Job.finish does
    assert world.memory.pending_of("alice") == 0


def test_admitting_changes_nothing_until_the_admitted_message_is_received(world):
    """``admit`` runs in the intake's threads, concurrently with the loop's frames: it must
    only read the session."""
    s = world.session()
    admitted = s.admit(submit_text("r1", {"x": torch.ones(4)}))
    assert isinstance(admitted, Incoming)
    assert s.incoming is None and s.deadline is None
    assert s.data_to_send() == [] and s.events_received() == []
    s.receive_admitted(admitted)
    assert s.incoming is admitted


def test_only_messages_of_at_most_inline_bytes_are_admitted_on_the_loop(world):
    """The loop parses a control message itself only up to ``INLINE_BYTES`` (bounded work);
    one byte more and nothing is parsed there (it goes to an intake lane)."""
    from hookwire.server.intake import INLINE_BYTES, parsed_inline
    s = world.session()
    base = submit_text("r1", {"x": torch.ones(4)})
    padded = base[:-1] + ', "pad": "' + "p" * (INLINE_BYTES - len(base) - 11) + '"}'
    assert len(padded) == INLINE_BYTES
    admitted = parsed_inline(s, padded)
    # (a field the protocol does not know: refused by the parse, which did run here)
    assert isinstance(admitted, Refusal) and "pad" in str(admitted.error)
    small = parsed_inline(s, base)
    assert isinstance(small, Incoming)
    small.reservation.release()
    longer = padded[:-2] + 'p"}'
    assert len(longer) == INLINE_BYTES + 1
    assert parsed_inline(s, longer) is None
    assert world.memory.pending_of("alice") == 0


def test_frames_that_belong_to_no_submit_are_refused(world):
    s = world.session()
    (stray,) = frames("nobody", {"x": torch.ones(4)})
    s.receive_frame(stray)
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("frame_error", None)
    assert "no submit" in err.message
    text(s, submit_text("r1", {"x": torch.ones(4)}))
    (other,) = frames("r2", {"x": torch.ones(4)})
    s.receive_frame(other)
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("frame_error", "r1")
    # A malformed frame drops the submit it interrupts: its memory is released, and its own
    # late frames are dropped without an answer.
    assert s.incoming is None and world.memory.pending_of("alice") == 0
    for frame in frames("r1", {"x": torch.ones(4)}):
        s.receive_frame(frame)
    assert s.data_to_send() == [] and s.events_received() == []


def test_oversized_and_malformed_frames_are_typed_errors(world):
    s = world.session()
    s.receive_frame(b"\x00" * (MAX_FRAME_BYTES + 1))
    s.receive_frame(b"\x01")
    s.receive_frame(b"\xff\xff\xff\x00" + b"{}")
    s.receive_frame(b"\x02\x00\x00\x00[]")
    errors = answers(s)
    assert [e.code for e in errors] == ["frame_error"] * 4
    assert "chunks of at most" in errors[0].message


def test_a_lying_frame_cannot_write_outside_its_tensor(world):
    s = world.session()
    x = torch.arange(8, dtype=torch.float32)
    text(s, submit_text("r1", {"x": x}))
    (frame,) = frames("r1", {"x": torch.arange(9, dtype=torch.float32)})  # 4 bytes too many
    s.receive_frame(frame)
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("frame_error", "r1")
    assert "does not continue" in err.message
    assert s.incoming is None and world.memory.pending_of("alice") == 0
    assert s.events_received() == []


def test_an_unfinished_submit_is_dropped_at_its_deadline(world):
    s = world.session()
    x = torch.randn(CHUNK_BYTES // 2)   # 2 chunks; only the first is sent
    text(s, submit_text("slow", {"x": x}))
    first, second = frames("slow", {"x": x})
    s.receive_frame(first)
    held = world.memory.pending_of("alice")
    assert held == x.numel() * 4
    world.clock.now += world.limits.submit_timeout_s - 1
    s.expire()   # early: a stale timer changes nothing
    assert s.incoming is not None and s.data_to_send() == []
    world.clock.now += 1
    s.expire()
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("frame_error", "slow")
    assert "did not all arrive within 60 seconds" in err.message
    assert s.deadline is None and world.memory.pending_of("alice") == 0
    s.receive_frame(second)   # late: dropped, no answer
    assert s.data_to_send() == [] and s.events_received() == []


def test_a_new_submit_drops_the_unfinished_one(world):
    s = world.session()
    text(s, submit_text("liar", {"x": torch.ones(1000)}))   # declares 4000 bytes, sends none
    text(s, submit_text("honest", {"y": torch.ones(3)}))
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("frame_error", "liar")
    assert world.memory.pending_of("alice") == 12   # only the honest request's bytes
    for frame in frames("liar", {"x": torch.ones(1000)}):
        s.receive_frame(frame)   # the dropped request's frames: ignored
    for frame in frames("honest", {"y": torch.ones(3)}):
        s.receive_frame(frame)
    assert s.data_to_send() == []
    (event,) = s.events_received()
    assert event.incoming.submit.request_id == "honest"


def test_memory_is_reserved_before_any_buffer_and_a_refused_submit_loses_its_frames(world):
    s = world.session()
    big = torch.empty(65 * MiB // 4)   # one MiB over this user's pending budget
    message = submit_text("greedy", {"x": big})
    admitted = s.admit(message)
    assert isinstance(admitted, Refusal)
    s.receive_admitted(admitted)
    (err,) = answers(s)
    assert (err.code, err.request_id, err.details.get("rule")) == \
        ("limit_exceeded", "greedy", "max_pending_bytes_per_user")
    assert world.memory.pending_of("alice") == 0
    (frame, *_) = frames("greedy", {"x": big[:16]})
    s.receive_frame(frame)   # the refused request's frames follow: dropped
    assert s.data_to_send() == [] and s.incoming is None


def test_declared_tensors_past_the_request_limit_are_refused_unallocated(world):
    s = world.session()
    huge = json.dumps({"type": "submit", "request_id": "huge", "graph": graph(),
                       "tensors": [{"tid": "x", "dtype": "float32", "shape": [1 << 30]}]})
    text(s, huge)
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("frame_error", "huge")
    assert "declared tensors total" in err.message
    assert world.memory.pending_of("alice") == 0


def test_a_tensor_both_uploaded_and_referenced_is_refused(world):
    s = world.session()
    ref = {"tid": "x", "resident": "v" + "0" * 24, "dtype": "float32", "shape": [4],
           "stride": [1], "offset": 0}
    text(s, submit_text("both", {"x": torch.ones(4)}, refs=[ref]))
    (err,) = answers(s)
    assert (err.code, err.request_id) == ("protocol_error", "both")


def test_references_resolve_only_in_the_users_own_store(world):
    kept = torch.arange(64, dtype=torch.float32)
    rid = "v" + "ab" * 12
    world.residents.for_user("alice").put(rid, kept)
    ref = {"tid": "x", "resident": rid, "dtype": "float32", "shape": [8, 8],
           "stride": [8, 1], "offset": 0}
    mallory = world.session("mallory")
    text(mallory, submit_text("steal", {}, refs=[ref]))
    (err,) = answers(mallory)
    assert (err.code, err.request_id) == ("resident_missing", "steal")
    alice = world.session("alice")
    text(alice, submit_text("mine", {}, refs=[ref]))
    assert alice.data_to_send() == []
    (event,) = alice.events_received()
    ((tid, base, _),) = event.incoming.refs
    assert tid == "x" and torch.equal(base, kept)
    assert world.memory.pending_of("alice") == kept.numel() * 4   # materialised size


def test_a_stride_zero_reference_counts_its_materialised_size(world):
    """A view of a 4-byte value that expands to 256 MiB is refused before anything is
    copied: what it would take once materialised counts, not what it refers to."""
    rid = "v" + "cd" * 12
    world.residents.for_user("alice").put(rid, torch.ones(1))
    ref = {"tid": "x", "resident": rid, "dtype": "float32", "shape": [1 << 26],
           "stride": [0], "offset": 0}
    s = world.session("alice")
    text(s, submit_text("expand", {}, refs=[ref]))
    (err,) = answers(s)
    assert err.request_id == "expand" and err.code in ("limit_exceeded", "frame_error")
    assert world.memory.pending_of("alice") == 0 and s.events_received() == []


def test_dense_and_malformed_text_is_refused_before_parsing(world):
    s = world.session()
    dense = '{"type":"submit","request_id":"dense","x":[' + "[]," * 200_000 + "[]]}"
    refusal = s.admit(dense)
    assert isinstance(refusal, Refusal)
    s.receive_admitted(refusal)
    text(s, "{not json")
    text(s, json.dumps({"type": "hello", "protocol": 1, "client_version": "t", "x": 1}))
    text(s, json.dumps({"type": "launch_missiles"}))
    errors = answers(s)
    assert [e.code for e in errors] == ["protocol_error"] * 4
    assert "too dense" in errors[0].message and errors[0].request_id == "dense"
    # The dense submit named its id in its head: its frames are dropped, not errors.
    (frame,) = frames("dense", {"x": torch.ones(2)})
    s.receive_frame(frame)
    assert s.data_to_send() == []


def test_cancels_are_forwarded_and_their_ids_capped(world):
    s = world.session()
    for i in range(5000):
        text(s, json.dumps({"type": "cancel", "request_id": f"nope-{i}"}))
    events = s.events_received()
    assert len(events) == 5000 and all(isinstance(e, CancelRequest) for e in events)
    assert events[-1].request_id == "nope-4999"
    assert len(s.cancelled) == 1024 and "nope-4999" in s.cancelled
    assert s.data_to_send() == []


def test_model_info_is_answered_from_the_entry_or_refused(world):
    s = world.session()
    text(s, json.dumps({"type": "model_info", "model": "tiny-gpt2"}))
    assert s.data_to_send() == ['{"type":"model_info","model":"tiny-gpt2"}']
    text(s, json.dumps({"type": "model_info", "model": "gpt-5"}))
    (err,) = answers(s)
    assert err.code == "unknown_model" and "served: tiny-gpt2" in err.message
    text(s, json.dumps({"type": "model_info", "model": "tiny-gpt2",
                        "tl_flags": ["use_attn_result"]}))
    (probe,) = s.events_received()
    assert isinstance(probe, ProbeHookMode) and probe.request.tl_flags == ["use_attn_result"]
    assert s.data_to_send() == []


def test_weights_need_a_model_whose_parameters_this_process_holds(world):
    s = world.session()
    text(s, json.dumps({"type": "weights", "request_id": "w1", "model": "tiny-gpt2",
                        "names": ["transformer.wte.weight"]}))
    (err,) = answers(s)
    assert err.code == "hookwire_error" and "other processes" in err.message
    assert s.events_received() == [] and not s.weights_in_flight


def test_after_close_an_admitted_submit_is_released_not_run(world):
    s = world.session()
    admitted = s.admit(submit_text("late", {"x": torch.ones(16)}))
    assert world.memory.pending_of("alice") == 64
    s.close()
    s.receive_admitted(admitted)
    assert world.memory.pending_of("alice") == 0
    assert s.events_received() == [] and s.incoming is None


def test_close_releases_the_arriving_submit(world):
    s = world.session()
    text(s, submit_text("half", {"x": torch.ones(1 << 16)}))
    assert world.memory.pending_of("alice") == 1 << 18
    s.close()
    assert world.memory.pending_of("alice") == 0 and s.deadline is None


def test_one_users_sessions_share_its_budget_and_others_are_untouched(world):
    a1, a2, bob = world.session("alice"), world.session("alice"), world.session("bob")
    text(a1, submit_text("a1", {"x": torch.empty(40 * MiB // 4)}))
    text(a2, submit_text("a2", {"x": torch.empty(40 * MiB // 4)}))  # 80 MiB > 64 MiB
    (err,) = answers(a2)
    assert (err.code, err.request_id) == ("limit_exceeded", "a2")
    text(bob, submit_text("b", {"x": torch.empty(40 * MiB // 4)}))
    assert bob.data_to_send() == [] and bob.incoming is not None
    text(bob, submit_text("b2", {"y": torch.empty(1)}))  # drops "b": budget back
    assert world.memory.pending_of("bob") == 4


# ---- the Ray relay's reading of a replica's answer (server/relay_session.py) ---------------

def test_the_relay_forwards_the_answer_and_keeps_resident_results_at_the_front(world):
    from hookwire.protocol import Done, Progress, Result, dump
    from hookwire.server.relay_session import RelaySession, is_final

    store = world.residents.for_user("alice")
    upload = torch.arange(10.0)
    relay = RelaySession(store, {"input_ids": upload})
    value, kept_id, upload_id = torch.randn(400_000), "v" + "1" * 24, "h" + "2" * 24
    items = [{"replica": "r-a", "pid": 1, "model": "tiny-gpt2"},
             dump(Progress(request_id="q", stage="started"))]
    assert [relay.receive(i) for i in items] == [None, items[1]]
    assert relay.replica["replica"] == "r-a" and not relay.relayed   # progress only so far
    result = dump(Result(request_id="q", name="resid", tensor=header_for("t0", value),
                         resident=kept_id))
    stream = [result, *encode_chunks("q", "t0", value),
              {"keep_upload": "input_ids", "as": upload_id}, dump(Done(request_id="q"))]
    forwarded = [relay.receive(i) for i in stream]
    assert forwarded == stream[:-2] + [None, stream[-1]]   # the note is not forwarded
    assert relay.relayed and relay.finished and is_final(stream[-1])
    assert torch.equal(store.get(kept_id), value) and torch.equal(store.get(upload_id), upload)


def test_a_refused_message_is_freed_without_the_cycle_collector(world):
    """The refusal's traceback (and the exceptions it chains) held the parser's frames, and
    through them the message: with the collector off, every message must be let go."""
    import gc
    import sys

    s = world.session()
    messages = ["{not json" + "x" * 100_000,
                '{"type":"submit","request_id":"d","x":[' + "[]," * 100_000 + "[]]}",
                json.dumps({"type": "submit", "request_id": "s", "graph": {"nodes": 5},
                            "pad": "y" * 100_000}),
                submit_text("m", {"x": torch.empty(65 * MiB // 4)})]   # over the budget
    gc.disable()
    try:
        for message in messages:
            before = sys.getrefcount(message)
            text(s, message)
            assert sys.getrefcount(message) == before
    finally:
        gc.enable()
    assert [e.code for e in answers(s)] == ["protocol_error", "protocol_error",
                                            "protocol_error", "limit_exceeded"]
