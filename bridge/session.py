"""The protocol's client side as a state machine that does no I/O: :class:`ClientSession`.

A session builds every message the client sends from the protocol models
(:mod:`hookwire.protocol`) and reads what the server sends back into *events*; it never
touches a socket. :class:`hookwire.client.Connection` only moves bytes: it sends what the
session's ``hello`` / ``model_info`` / ``submit`` / ``weights`` / ``cancel`` return, feeds
each received message to :meth:`ClientSession.receive`, and acts on the events (hands a
value to the user's callback, returns the result, raises the server's error). The server's
side of the same protocol is ``server/session.py`` (``ServerSession``); both follow
websockets' own split between its protocol core (``websockets/protocol.py``) and the
layers that move its bytes.

The session trusts nothing the server sends (SECURITY.md, *The client, facing a malicious
server*): an answer to something it did not ask, a result it did not ask for
(:mod:`hookwire.expected_results`), bytes for a tensor that was not announced, more bytes
than announced, or an end before every announced value arrived is a ``ProtocolError``
raised from :meth:`~ClientSession.receive` -- the connection must then be dropped. One
exchange is open at a time (the connection's lock serialises them).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterator, Sequence, Union

import torch

from hookwire import __version__
from hookwire.errors import HookwireError, ProtocolError, error_from_code
from hookwire.expected_results import ExpectedResults, expected_results
from hookwire.frames import (CHUNK_BYTES, DTYPE_NAMES, TensorAssembler, decode_frame,
                             encode_chunks, header_for)
from hookwire.protocol import (PROTOCOL_VERSION, Accepted, Cancel, Done, Error, Hello,
                               HelloOk, ModelInfo, ModelInfoRequest, Progress, ResidentRef,
                               Result, SubmitHead, WeightsRequest, dump, parse_server_message)

MAX_RESULT_BYTES = 64 << 30  # what a client accepts from a server in one request


# ---- events: what the session hands its connection (receive) ------------------------------

@dataclass
class Answered:
    """The answer to ``hello`` (:class:`HelloOk`) or ``model_info`` (:class:`ModelInfo`)."""
    message: Union[HelloOk, ModelInfo]


@dataclass
class ValueReceived:
    """A saved value of the request, complete (its last byte arrived, or it is an alias of
    an earlier value). ``resident``: the id under which the server keeps it, if it does."""
    name: str
    tensor: torch.Tensor
    resident: str | None = None


@dataclass
class RequestEvent:
    """A message of the request the user may want to see as it comes (``accepted``,
    ``progress``, ``result``: progress bars, a ``RemoteRun``'s status)."""
    message: Union[Accepted, Progress, Result]


@dataclass
class RequestDone:
    """The request finished: every value it asked for, its timings, and the bytes the
    client sent and received for it."""
    values: dict[str, torch.Tensor]
    done: Done
    sent: int
    received: int


@dataclass
class RequestFailed:
    """The server ended the request (or the exchange) with a typed error; the connection
    stays usable."""
    error: HookwireError


@dataclass
class _Exchange:
    """What the session waits for: an answer of ``answer_type``, or (``request_id`` set) a
    request's stream of results ending in ``done`` or ``error``."""
    answer_type: type[HelloOk] | type[ModelInfo] | None = None
    request_id: str | None = None
    expected: ExpectedResults | None = None
    tl_flags: frozenset = frozenset()
    values: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # tid -> (name, assembler, resident)
    sent: int = 0
    received: int = 0
    announced: int = 0


class ClientSession:
    """The client's side of one connection, without I/O.

    Outgoing: :meth:`hello`, :meth:`model_info`, :meth:`submit` (its text, then its tensors'
    frames, lazily), :meth:`weights` each open an exchange and return what to send;
    :meth:`cancel` may be sent at any time. Incoming: :meth:`receive` takes one websocket
    message (text or bytes) and returns the events it completes: :class:`Answered`,
    :class:`RequestEvent`, :class:`ValueReceived`, :class:`RequestDone`,
    :class:`RequestFailed`. :attr:`open` says whether an exchange still waits for its end
    (a connection abandoned mid-exchange must not be reused: the server may still be
    sending).
    """

    def __init__(self):
        self._exchange: _Exchange | None = None

    @property
    def open(self) -> bool:
        return self._exchange is not None

    @property
    def bytes_sent(self) -> int:
        """Bytes sent for the open request so far (its frames count as they are taken)."""
        return self._exchange.sent if self._exchange is not None else 0

    def _start(self, exchange: _Exchange) -> None:
        if self._exchange is not None:
            raise ProtocolError("a client session runs one exchange at a time")
        self._exchange = exchange

    # ---- outgoing ------------------------------------------------------------------------
    def hello(self) -> str:
        self._start(_Exchange(answer_type=HelloOk))
        return dump(Hello(protocol=PROTOCOL_VERSION, client_version=__version__))

    def model_info(self, name: str, tl_flags=()) -> str:
        self._start(_Exchange(answer_type=ModelInfo, tl_flags=frozenset(tl_flags)))
        return dump(ModelInfoRequest(model=name, tl_flags=sorted(tl_flags)))

    def weights(self, request_id: str, model: str, names: list[str]) -> str:
        self._start(_Exchange(request_id=request_id))
        return dump(WeightsRequest(request_id=request_id, model=model, names=list(names)))

    def cancel(self, request_id: str) -> str:
        """Ask the server to stop a request (it ends with a ``cancelled`` error)."""
        return dump(Cancel(request_id=request_id))

    def submit(self, request_id: str, graph: dict, uploads: dict[str, torch.Tensor],
               refs: Sequence[dict] = (), keep: dict[str, str] | None = None,
               keep_results: bool = True, generate: dict | None = None,
               attached: dict[str, torch.Tensor] | None = None,
               info=None, progress: bool = True) -> Iterator[Union[str, bytes]]:
        """The submit's text, then each upload's chunk frames (made as they are taken).
        ``refs``: attached tensors the server holds (``ResidentRef`` fields); ``keep``:
        uploads to keep (tid -> content id); ``attached``: every attached tensor, uploaded
        or referred to, and ``info`` the model's ``RemoteModelInfo``, to work out what this
        request may get back (:func:`~hookwire.expected_results.expected_results`).
        ``progress=False``: the server sends no ``accepted`` and no ``progress`` messages."""
        graph_json = json.dumps(graph, separators=(",", ":"))
        expected = expected_results(graph, graph_json, attached if attached is not None
                                    else uploads, info, generate)
        head = SubmitHead(request_id=request_id,
                          tensors=[header_for(tid, t) for tid, t in uploads.items()],
                          refs=[ResidentRef(**ref) for ref in refs], keep=keep or {},
                          keep_results=keep_results, progress=progress)
        text = head.with_graph(graph_json, None if generate is None else
                               json.dumps(generate, separators=(",", ":")))
        exchange = _Exchange(request_id=request_id, expected=expected, sent=len(text))
        self._start(exchange)
        return self._submit_frames(text, request_id, exchange, uploads)

    @staticmethod
    def _submit_frames(text: str, request_id: str, exchange: _Exchange,
                       uploads: dict[str, torch.Tensor]) -> Iterator[Union[str, bytes]]:
        yield text
        for tid, t in uploads.items():
            for frame in encode_chunks(request_id, tid, t, CHUNK_BYTES):
                exchange.sent += len(frame)
                yield frame

    # ---- incoming ------------------------------------------------------------------------
    def receive(self, data: Union[str, bytes]) -> list:
        """One message from the server; the events it completes. Raises ``ProtocolError``
        when the server breaks the protocol (drop the connection then)."""
        exchange = self._exchange
        if exchange is None:
            raise ProtocolError("server sent a message while no exchange was open")
        if exchange.request_id is None:
            return self._receive_answer(exchange, data)
        exchange.received += len(data)
        if isinstance(data, bytes):
            return self._receive_frame(exchange, data)
        msg = parse_server_message(data)
        if getattr(msg, "request_id", exchange.request_id) not in (exchange.request_id, None):
            raise ProtocolError("server answered a request this client did not send")
        if isinstance(msg, Error):
            self._exchange = None
            return [RequestFailed(error_from_code(msg.code, msg.message, msg.details))]
        if isinstance(msg, Done):
            if exchange.pending:
                raise ProtocolError("server finished before sending every result")
            self._exchange = None
            return [RequestDone(exchange.values, msg, exchange.sent, exchange.received)]
        if not isinstance(msg, (Accepted, Progress, Result)):
            raise ProtocolError(f"server sent {msg.type} during request "
                                f"{exchange.request_id}")
        events = self._on_result(exchange, msg) if isinstance(msg, Result) else []
        events.append(RequestEvent(msg))
        return events

    def _receive_answer(self, exchange: _Exchange, data) -> list:
        answer_type = exchange.answer_type
        # hello and model_info, the only exchanges without a request id, name their answer
        assert answer_type is not None
        if isinstance(data, bytes):
            raise ProtocolError("expected a control message, got binary data")
        msg = parse_server_message(data)
        if isinstance(msg, Error):
            self._exchange = None
            return [RequestFailed(error_from_code(msg.code, msg.message, msg.details))]
        if not isinstance(msg, answer_type):
            raise ProtocolError(f"expected {answer_type.model_fields['type'].default},"
                                f" got {msg.type}")
        if isinstance(msg, ModelInfo) and frozenset(msg.tl_flags) != exchange.tl_flags:
            raise ProtocolError("server described the model with other TL hook switches "
                                "than asked for")
        self._exchange = None
        return [Answered(msg)]

    def _on_result(self, exchange: _Exchange, msg: Result) -> list:
        values, expected = exchange.values, exchange.expected
        if msg.alias_of is not None:
            # The same tensor as an earlier value of this request: a view of it.
            base = values.get(msg.alias_of)
            if base is None or tuple(base.shape) != tuple(msg.tensor.shape) or \
                    DTYPE_NAMES.get(base.dtype) != msg.tensor.dtype:
                raise ProtocolError(f"server sent {msg.name!r} as an alias of a value it had "
                                    "not sent, or of another shape or dtype")
            if expected is not None:
                expected.admit(msg.name, 0)  # a view: no bytes of its own
            values[msg.name] = base.detach()
            return [ValueReceived(msg.name, values[msg.name])]
        if expected is not None:
            expected.admit(msg.name, msg.tensor.nbytes())
        # Bounded per request, not only per tensor: a server cannot make this client
        # reserve more than MAX_RESULT_BYTES in announced results.
        exchange.announced += msg.tensor.nbytes()
        if exchange.announced > MAX_RESULT_BYTES:
            raise ProtocolError(f"server announced {exchange.announced} bytes of results; "
                                f"this client accepts {MAX_RESULT_BYTES}")
        asm = TensorAssembler([msg.tensor], MAX_RESULT_BYTES)
        if msg.tensor.nbytes() == 0:
            values[msg.name] = asm.tensors()[msg.tensor.tid]
            return [ValueReceived(msg.name, values[msg.name])]  # (nothing to refer to)
        exchange.pending[msg.tensor.tid] = (msg.name, asm, msg.resident)
        return []

    def _receive_frame(self, exchange: _Exchange, data: bytes) -> list:
        head, payload = decode_frame(data)
        if head["rid"] != exchange.request_id or head["tid"] not in exchange.pending:
            raise ProtocolError("server sent bytes for a tensor it did not announce")
        name, asm, resident = exchange.pending[head["tid"]]
        asm.add(head, payload)
        if not asm.complete:
            return []
        del exchange.pending[head["tid"]]
        exchange.values[name] = asm.tensors()[head["tid"]]
        return [ValueReceived(name, exchange.values[name], resident)]


__all__ = ["ClientSession", "Answered", "ValueReceived", "RequestEvent", "RequestDone",
           "RequestFailed", "MAX_RESULT_BYTES"]
