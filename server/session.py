"""The protocol's server side as a state machine that does no I/O: one :class:`ServerSession`
per client connection.

The session is the whole of what the server says and decides for a connection -- the
handshake answer, which model descriptions to send, when a submit is admitted, which binary
frame belongs to which declared tensor, when a half-received request is dropped, which
errors end which request. It takes the connection's *messages* in and hands out *data to
send* and *events* for its transport; it never touches a socket, a thread, a timer or the
model. ``server/app.py`` (the websocket front) only moves bytes between the socket and the
session, runs the session's events (hands a complete request to the engine, forwards a
cancel, starts a probe or a weights transfer) and arms one timer at
:attr:`ServerSession.deadline`. Tests drive a session directly, with no socket and no model
(``tests/test_server_session.py``), in milliseconds.

The shape follows websockets' own split (``websockets/protocol.py`` against its
``asyncio/connection.py``): ``receive_*`` methods take input, :meth:`~ServerSession.data_to_send`
and :meth:`~ServerSession.events_received` drain output. One thing is particular to us: the
cost of a control message grows with its size, and the front's event loop serves everyone,
so receiving a text message is two steps --

* :meth:`~ServerSession.admit` (in the intake's threads, ``server/intake.py``): the one
  bounded parse, and for a submit its admission (references checked against the user's
  resident values, memory reserved, buffers allocated). It only reads the session and never
  raises: what it refuses comes back as a :class:`Refusal`;
* :meth:`~ServerSession.receive_admitted` (on the loop): O(1) state changes and answers.

A binary frame is at most one chunk (``MAX_FRAME_BYTES``), so
:meth:`~ServerSession.receive_frame` copies at most one chunk, on the loop.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from hookwire import __version__
from hookwire.errors import FrameError, HookwireError, ProtocolError, UnknownModel
from hookwire.frames import CHUNK_BYTES, MAX_HEADER_BYTES, TensorAssembler, decode_frame
from hookwire.protocol import (PROTOCOL_VERSION, Cancel, Hello, ModelInfoRequest, Submit,
                               WeightsRequest,
                               parse_client_message_bounded)
from hookwire.server import replies
from hookwire.server.memory import NO_RESERVATION, MemoryBudget, Reservation
from hookwire.server.prepare import ModelEntry
from hookwire.server.residents import ResidentStore, check_refs
from hookwire.server.weights import begin_transfer, check_weights_request
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server")

MAX_FRAME_BYTES = CHUNK_BYTES + MAX_HEADER_BYTES + 4   # one chunk frame, as clients send them
MAX_LIST_ITEMS = 100_000  # tensors, refs (protocol.Submit)
SUBMIT_SLACK_BYTES = 256 << 20  # declared uploads may pass max_constant_bytes by this much
# What a parsed message holds per container ([ or {): a maximal graph's 600,007 containers
# held 122 MiB once parsed into pydantic objects, 149 MiB at the parse's peak (tracemalloc).
PARSED_BYTES_PER_CONTAINER = 256
# Messages parsing into less than this reserve nothing (a cancel must pass a full budget).
PARSED_BYTES_RESERVED_FROM = 1 << 20


def max_containers(limits: Limits) -> int:
    """Containers ([ and {) a legitimate message can need: a graph's nodes (~10 each),
    tensor headers and references (2-3 each), and some slack
    (:func:`hookwire.protocol.check_structure` refuses more before parsing)."""
    return 16 * limits.max_nodes + 5 * MAX_LIST_ITEMS + 4096


class RecentIds(OrderedDict):
    """A set of request ids that keeps only the most recent ``cap`` (a client cannot grow
    the server's memory by naming ids)."""

    def __init__(self, cap: int = 1024):
        super().__init__()
        self.cap = cap

    def add(self, rid: str) -> None:
        self[rid] = None
        self.move_to_end(rid)
        while len(self) > self.cap:
            self.popitem(last=False)

    def discard(self, rid: str) -> None:
        self.pop(rid, None)


@dataclass
class Incoming:
    """A submit admitted by :meth:`ServerSession.admit`: its memory is reserved, its
    buffers allocated; its declared tensors may still be arriving."""
    submit: Submit
    assembler: TensorAssembler
    refs: list                # checked references (materialised when it runs)
    reservation: Reservation
    size: int                 # bytes received so far
    deadline: float | None = None  # while waiting for tensors: dropped after this
    text: str | bytes | None = None  # the submit's message as it arrived

    def drop(self) -> None:
        self.reservation.release()


@dataclass
class Refusal:
    """What :meth:`ServerSession.admit` hands back for a message it refused (or failed on):
    the error, carrying ``request_id`` when the refused message was a submit."""
    error: BaseException


# ---- events: what the session asks of its transport (events_received) ---------------------

@dataclass
class RunRequest:
    """A submit whose declared tensors all arrived: hand it to the engine, then tell the
    session :meth:`~ServerSession.accepted` (its queue position) or
    :meth:`~ServerSession.refused` (e.g. ``QueueFull``)."""
    incoming: Incoming


@dataclass
class CancelRequest:
    """The client asked to stop ``request_id``: tell the engine."""
    request_id: str


@dataclass
class ProbeHookMode:
    """``model_info`` with TL hook switches on: the engine probes that combination (it runs
    the model, so not on the loop); its answer, or :func:`error_text`, goes to the client."""
    request: ModelInfoRequest


@dataclass
class SendWeights:
    """A checked ``weights`` request: stream ``wanted`` ([(name, parameter)]) to the client
    off the loop (``server/weights.send_weights``)."""
    request_id: str
    wanted: list


def internal_error(exc: BaseException) -> HookwireError:
    """A bug of ours, as the typed error the client gets (an engine's bug goes out as
    :func:`hookwire.server.replies.error` writes it)."""
    err = HookwireError(f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
    err.code = "internal_error"
    return err


def forget_tracebacks(exc: BaseException | None) -> None:
    """Drop the tracebacks of ``exc`` and the exceptions it chains: their frames hold the
    message being parsed (up to ``max_message_bytes``) and, through the raising frame's own
    locals, the exception again -- a cycle that would keep the message until the cycle
    collector runs."""
    seen, todo = set(), [exc]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        todo += [exc.__cause__, exc.__context__]


def error_text(exc: BaseException, request_id: str | None = None) -> str:
    """The ``error`` message for ``exc`` (logged and wrapped when it is not one of ours)."""
    if not isinstance(exc, HookwireError):
        log.error("handling a client message failed", exc_info=exc)
        exc = internal_error(exc)
    return replies.error(request_id, exc)


class ServerSession:
    """One client connection's protocol state, without I/O.

    Inputs: :meth:`admit` then :meth:`receive_admitted` for each text message (see the
    module docstring for why two steps), :meth:`receive_frame` for each binary one,
    :meth:`accepted` / :meth:`refused` with the engine's answer to a :class:`RunRequest`,
    :meth:`expire` when the clock passes :attr:`deadline`, :meth:`close` when the socket
    is gone. Outputs: :meth:`data_to_send` (control messages, as JSON text) and
    :meth:`events_received` (:class:`RunRequest`, :class:`CancelRequest`,
    :class:`ProbeHookMode`, :class:`SendWeights`).

    State: the submit whose tensors are arriving (``incoming``: at most one; a new submit
    drops an unfinished one), request ids whose frames are dropped (``discarded``: refused
    requests), request ids the client cancelled (``cancelled``: engines read it), and
    ``closed`` / ``weights_in_flight``. Every id set is capped (:class:`RecentIds`).

    ``user`` names whose ``store`` (resident values) and ``memory`` budget the session's
    requests use; ``entries`` are the models served (name -> an entry with ``info_json``).
    ``clock`` is ``time.monotonic`` unless a test drives time itself.
    """

    def __init__(self, user: str, store: ResidentStore, memory: MemoryBudget | None,
                 limits: Limits, entries: dict, clock: Callable[[], float] = time.monotonic):
        self.user, self.store, self.memory = user, store, memory
        self.limits, self.entries, self.clock = limits, entries, clock
        self.max_containers = max_containers(limits)
        self.incoming: Incoming | None = None
        self.cancelled = RecentIds()
        self.discarded = RecentIds()  # refused request ids: their frames are dropped
        self.closed = False
        self.weights_in_flight = False  # server/weights.py: one transfer at a time
        self._out: list[str] = []
        self._events: list = []
        self._handlers = {Incoming: self._on_submit, Refusal: self._on_refusal,
                          Hello: self._on_hello, ModelInfoRequest: self._on_model_info,
                          Cancel: self._on_cancel, WeightsRequest: self._on_weights}

    # ---- output ------------------------------------------------------------------------
    def data_to_send(self) -> list[str]:
        """Control messages to send, in order (and forgets them)."""
        out, self._out = self._out, []
        return out

    def events_received(self) -> list:
        """Events for the transport, in order (and forgets them)."""
        events, self._events = self._events, []
        return events

    @property
    def deadline(self) -> float | None:
        """When (on ``clock``) the arriving submit is dropped unless complete; None if no
        submit is waiting for tensors."""
        return self.incoming.deadline if self.incoming is not None else None

    def _send_error(self, exc: BaseException, request_id: str | None) -> None:
        self._out.append(error_text(exc, request_id))

    # ---- off the loop: everything that grows with a message ----------------------------
    def admit(self, message: str | bytes, pause=None):
        """Parse a control message (once, bounded) and admit a submit: check its references
        against the user's resident values, reserve the memory its tensors will take
        (declared uploads + materialised references), then allocate their buffers. Returns
        the message, an :class:`Incoming`, or a :class:`Refusal`; never raises. Runs in the
        intake's threads, so it changes nothing in the session. ``pause``: see
        :func:`~hookwire.protocol.parse_client_message_bounded`."""
        parsed = [NO_RESERVATION]

        def reserve_parsed(containers: int) -> None:
            nbytes = containers * PARSED_BYTES_PER_CONTAINER
            if nbytes >= PARSED_BYTES_RESERVED_FROM:
                parsed[0] = self.memory.reserve(self.user, nbytes, "this message, parsed")
        try:
            _, msg = parse_client_message_bounded(message, self.max_containers, pause,
                                                  before_parse=reserve_parsed)
            if not isinstance(msg, Submit):
                parsed[0].release()
                return msg
            incoming = self._admit_submit(msg, len(message), parsed[0])
            incoming.text = message
            return incoming
        except Exception as exc:
            parsed[0].release()
            return Refusal(exc)

    def _admit_submit(self, msg: Submit, size: int,
                      parsed: Reservation = NO_RESERVATION) -> Incoming:
        """``parsed``: the memory reserved for the parsed message; the request holds it until
        it ends, with the rest of its reservation."""
        try:
            if {r.tid for r in msg.refs} & {h.tid for h in msg.tensors}:
                raise ProtocolError("a tensor id is both uploaded and referenced")
            refs, ref_bytes = check_refs(self.store, msg.refs, self.limits.max_constant_bytes)
            declared = sum(h.nbytes() for h in msg.tensors)
            limit = self.limits.max_constant_bytes + SUBMIT_SLACK_BYTES
            if declared > limit:
                raise FrameError(f"declared tensors total {declared} bytes; limit {limit}")
            reservation = self.memory.reserve(self.user, declared + ref_bytes,
                                              f"request {msg.request_id}")
            reservation.absorb(parsed)
            try:
                asm = TensorAssembler(msg.tensors, limit)
            except BaseException:
                reservation.release()
                raise
        except HookwireError as exc:
            exc.request_id = msg.request_id
            raise
        return Incoming(msg, asm, refs, reservation, size)

    # ---- on the loop: O(1) per message (a frame copies at most one chunk) --------------
    def receive_admitted(self, admitted) -> None:
        """What :meth:`admit` returned for the connection's next text message."""
        try:
            self._handlers[type(admitted)](admitted)
        except Exception as exc:
            self._fail(exc)

    def receive_frame(self, data: bytes) -> None:
        """One binary message: a chunk of a declared tensor of the arriving submit."""
        try:
            self._on_frame(data)
        except Exception as exc:
            self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        """A message was refused, or handling it failed (a bug of ours: the fuzzers look
        for these). It is answered with an error; a refused submit's frames will follow and
        are dropped; a malformed frame (or our bug) drops the arriving submit. The
        connection goes on."""
        if not isinstance(exc, HookwireError):
            log.error("handling a client message failed", exc_info=exc)
            exc = internal_error(exc)
        rid = getattr(exc, "request_id", None)  # a submit the intake refused
        if rid is not None:
            self.discarded.add(rid)
        elif self.incoming is not None:
            rid = self.incoming.submit.request_id
            if isinstance(exc, FrameError) or exc.code == "internal_error":
                self.discarded.add(rid)
                self.drop_incoming()
        self._send_error(exc, rid)
        forget_tracebacks(exc)

    def _on_frame(self, data: bytes) -> None:
        if len(data) > MAX_FRAME_BYTES:
            raise FrameError(f"binary frame of {len(data)} bytes; tensors travel in chunks "
                             f"of at most {CHUNK_BYTES} bytes")
        head, payload = decode_frame(data)
        if head["rid"] in self.discarded:
            return  # the rest of a request that was already refused
        incoming = self.incoming
        if incoming is None:
            raise FrameError("binary frame with no submit waiting for tensors")
        if head["rid"] != incoming.submit.request_id:
            raise FrameError("binary frame for a different request")
        incoming.assembler.add(head, payload)
        incoming.size += len(data)
        if incoming.assembler.complete:
            self.incoming = None
            incoming.deadline = None
            self._events.append(RunRequest(incoming))

    def _on_refusal(self, refusal: Refusal) -> None:
        self._fail(refusal.error)

    def _on_submit(self, incoming: Incoming) -> None:
        if self.closed:
            incoming.drop()
            return
        if self.incoming is not None:
            # The previous submit declared more bytes than it sent (a lying header, or a
            # client that gave up): it is refused and dropped, so one bad request cannot
            # wedge the connection; the new one proceeds.
            old = self.drop_incoming().submit.request_id
            self.discarded.add(old)
            self._send_error(FrameError("a new submit arrived before this request's "
                                        "declared tensors were complete; dropped"), old)
        if incoming.assembler.complete:
            self._events.append(RunRequest(incoming))
        else:
            incoming.deadline = self.clock() + self.limits.submit_timeout_s
            self.incoming = incoming

    def _on_hello(self, msg: Hello) -> None:
        if msg.protocol != PROTOCOL_VERSION:
            raise ProtocolError(f"client speaks protocol {msg.protocol}, this server "
                                f"{PROTOCOL_VERSION} (server {__version__}); upgrade the "
                                "older side")
        self._out.append(replies.hello_ok(list(self.entries)))

    def _entry(self, model: str):
        entry = self.entries.get(model)
        if entry is None:
            raise UnknownModel(f"model {model!r} is not served here; served: "
                               f"{', '.join(self.entries)}")
        return entry

    def _on_model_info(self, msg: ModelInfoRequest) -> None:
        entry = self._entry(msg.model)
        if msg.tl_flags:
            self._events.append(ProbeHookMode(msg))  # probing runs the model
        else:
            self._out.append(entry.info_json)

    def _on_cancel(self, msg: Cancel) -> None:
        self.cancelled.add(msg.request_id)
        self._events.append(CancelRequest(msg.request_id))

    def _on_weights(self, msg: WeightsRequest) -> None:
        entry = self._entry(msg.model)
        if not isinstance(entry, ModelEntry):
            raise HookwireError("this server's engine holds its models in other processes "
                                "and does not send weights")
        try:
            wanted = check_weights_request(entry, msg, self.limits)
            begin_transfer(self)
        except HookwireError as exc:  # answered under the request's own id
            self._send_error(exc, msg.request_id)
            return
        self._events.append(SendWeights(msg.request_id, wanted))

    # ---- the engine's answer, the clock, the end ---------------------------------------
    def accepted(self, request_id: str, queue_position: int) -> None:
        """The engine queued the request of a :class:`RunRequest`."""
        self._out.append(replies.accepted(request_id, queue_position))

    def refused(self, request_id: str, exc: HookwireError) -> None:
        """The engine refused it (its memory is released by the caller's ``Job.finish``)."""
        self._send_error(exc, request_id)

    def expire(self) -> None:
        """The clock passed :attr:`deadline`: a submit whose declared tensors did not all
        arrive in time is dropped, its memory released, its late frames discarded."""
        incoming = self.incoming
        if incoming is None or self.closed or self.clock() < incoming.deadline:
            return
        self.drop_incoming()
        rid = incoming.submit.request_id
        self.discarded.add(rid)
        self._send_error(FrameError(f"the request's declared tensors did not all arrive "
                                    f"within {self.limits.submit_timeout_s:g} seconds; "
                                    "dropped"), rid)

    def drop_incoming(self) -> Incoming | None:
        """Drop the arriving submit (its memory is released); returns it."""
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.drop()
        return incoming

    def close(self) -> None:
        """The connection is gone: nothing more is sent, the arriving submit is dropped
        (engines stop this connection's requests when they read ``closed``)."""
        self.closed = True
        self.drop_incoming()


__all__ = ["ServerSession", "Incoming", "Refusal", "RunRequest", "CancelRequest",
           "ProbeHookMode", "SendWeights", "RecentIds", "error_text", "internal_error",
           "max_containers", "MAX_FRAME_BYTES"]
