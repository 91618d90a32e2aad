"""The client side of the wire: connect, ask what a model looks like, submit a traced graph,
and collect saved tensors as they stream in. What is said on the wire, and what the client
accepts back, is its :class:`~hookwire.session.ClientSession`'s (``bridge/session.py``); a
:class:`Connection` moves the session's bytes over a websocket and hands its events to the
caller's callbacks.

Synchronous on purpose: hooks are traced in the user's thread and notebooks have their own
event loop, so the client does not need one of its own. Its websocket is
``ws_connection.WebsocketConnection`` (websockets' protocol; large result frames read straight
from the socket, in the caller's thread).
"""
from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import torch
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from hookwire.errors import (AuthError, ProtocolError, ResidentMissing, ServerUnavailable,
                             TooManyConnections)
from hookwire.ir import hook_mode
from hookwire.frames import DTYPE_NAMES, DTYPES
from hookwire.residents import MIN_REF_BYTES, ClientResidents, content_id, contiguous_strides
from hookwire.site_layout import check_layout
from hookwire.ws_connection import WebsocketConnection
from hookwire.protocol import MAX_CONTROL_BYTES, ModelInfo
from hookwire.session import (MAX_RESULT_BYTES, ClientSession,  # noqa: F401
                              RequestDone, RequestEvent, RequestFailed, ValueReceived)
from hookwire.validate import SiteInfo


@dataclass
class Settings:
    url: str | None = None
    api_key: str | None = None


_settings = Settings()


def configure(url: str | None = None, api_key: str | None = None) -> None:
    """Set the default server and API key (else HOOKWIRE_URL / HOOKWIRE_API_KEY)."""
    _settings.url = url
    _settings.api_key = api_key


def resolve_server(url: str | None = None, api_key: str | None = None) -> tuple[str, str | None]:
    url = url or _settings.url or os.environ.get("HOOKWIRE_URL")
    if not url:
        raise ServerUnavailable("no hookwire server configured: call hookwire.configure("
                                "url='ws://host:port'), set HOOKWIRE_URL, or pass "
                                "remote='ws://host:port'")
    return url, api_key or _settings.api_key or os.environ.get("HOOKWIRE_API_KEY")


@dataclass
class RemoteModelInfo:
    """What a server tells a client about one model (enough for a weightless stand-in)."""
    name: str
    architecture: str
    config: dict
    sites: list[SiteInfo]
    tokenizer_files: dict[str, str]
    site_index: dict[tuple[str, int], int] = field(default_factory=dict)
    hook_names: frozenset = frozenset()
    hook_aliases: dict[str, str] = field(default_factory=dict)  # alias -> canonical
    module_layouts: dict[str, list[str]] = field(default_factory=dict)
    step_module_layouts: dict[str, list[str]] = field(default_factory=dict)
    module_kwarg_layouts: dict[str, dict[str, str]] = field(default_factory=dict)
    step_module_kwarg_layouts: dict[str, dict[str, str]] = field(default_factory=dict)
    unserved: dict[str, str] = field(default_factory=dict)  # site -> why it cannot be hooked
    output: str = "logits"          # or "last_hidden_state" (a base model without LM head)
    output_dtype: torch.dtype = torch.float32
    generate_refused: str | None = None   # why it cannot generate on the server
    causal: bool = True   # False: rows of different lengths must not be padded together
    output_width: int | None = None   # last dim of the forward's output, as measured
    list_outputs: frozenset = frozenset()  # output sites whose module returns a list
    tl_refused: str | None = None          # why TL hook points are not served
    tl_config: dict = field(default_factory=dict)
    tl_flags: frozenset = frozenset()  # TL hook switches on when these sites were recorded

    @classmethod
    def from_message(cls, msg: ModelInfo) -> "RemoteModelInfo":
        sites = _site_infos(msg.sites)
        info = cls(msg.model, msg.architecture, msg.config, sites, msg.tokenizer_files)
        info.site_index = {(s.name, s.call): i for i, s in enumerate(sites)}
        info.hook_names = frozenset(msg.hook_names)
        info.hook_aliases = dict(msg.hook_aliases)
        info.module_layouts = {k: list(v) for k, v in msg.module_layouts.items()}
        info.step_module_layouts = {k: list(v) for k, v in msg.step_module_layouts.items()}
        info.module_kwarg_layouts = {k: dict(v) for k, v in msg.module_kwarg_layouts.items()}
        info.step_module_kwarg_layouts = {k: dict(v) for k, v in
                                          msg.step_module_kwarg_layouts.items()}
        info.unserved = {str(k): str(v) for k, v in msg.unserved_sites.items()}
        info.output = msg.output
        if msg.output_dtype not in DTYPES:
            raise ProtocolError(f"server described the output with dtype {msg.output_dtype!r}")
        info.output_dtype = DTYPES[msg.output_dtype]
        info.generate_refused = msg.generate_refused
        info.causal = msg.causal
        info.output_width = msg.output_width
        info.list_outputs = frozenset(msg.list_outputs)
        info.tl_refused = msg.tl_refused
        info.tl_config = dict(msg.tl_config)
        info.tl_flags = frozenset(msg.tl_flags)
        return info

    def unserved_reason(self, name: str) -> str | None:
        """Why a hook on site ``name`` cannot run remotely (None: it can, or never fires)."""
        reason = self.unserved.get(name)
        if reason is None and name.startswith("hf:"):
            reason = self.unserved.get("hf:*")
        return reason


def _site_infos(descriptions) -> list[SiteInfo]:
    sites = []
    for s in descriptions:
        if s.dtype not in DTYPES:
            raise ProtocolError(f"server described site {s.name!r} with dtype {s.dtype!r}")
        try:
            layout = check_layout(s.layout, len(s.shape))
        except ValueError as exc:
            raise ProtocolError(f"server described site {s.name!r}: {exc}") from None
        sites.append(SiteInfo(s.name, s.call, tuple(s.shape), DTYPES[s.dtype], s.grad,
                              s.eager, layout))
    return sites


@dataclass
class RunResult:
    values: dict[str, torch.Tensor]
    timings: dict[str, float]
    bytes_sent: int
    bytes_received: int
    tensor_bytes_sent: int = 0     # payload bytes of uploaded tensors
    tensors_referenced: int = 0    # attached tensors sent as references to resident values


@dataclass
class UploadStats:
    """Running totals for one connection (what benchmarks read)."""
    requests: int = 0
    bytes_sent: int = 0
    tensor_bytes_sent: int = 0
    tensors_referenced: int = 0
    resident_misses: int = 0


# A server closes a socket before answering its handshake when the client's address holds as
# many half-open connections as it allows (server/connection_gate.py): a burst of connections
# from one address (many threads, one NAT) gets through on a later try.
HANDSHAKE_RETRY_DELAYS_S = (0.1, 0.3, 0.9)


def _open_websocket(url: str, headers, open_timeout: float):
    """A websocket to ``url`` (``ws_connection.WebsocketConnection``: results' frames are
    read straight from the socket), tried again after ``HANDSHAKE_RETRY_DELAYS_S`` when the
    server closed the socket before any answer. A refusal with an answer (HTTP 401/429/503)
    or a server that cannot be reached raises at once."""
    for delay in (*HANDSHAKE_RETRY_DELAYS_S, None):
        # max_size: the server sends tensors in 1 MiB frames and control messages are
        # bounded (protocol.MAX_CONTROL_BYTES), so a larger message is refused unread.
        try:
            return WebsocketConnection(url, headers, open_timeout, max_size=MAX_CONTROL_BYTES)
        except (InvalidHandshake, ConnectionResetError, ConnectionClosed) as exc:
            if delay is None or isinstance(exc, InvalidStatus):
                raise
            time.sleep(delay)


def _reason(response) -> str:
    """The first line of a refused handshake's body (the server says why), printable only."""
    body = getattr(response, "body", b"") or b""
    line = body[:200].decode("utf-8", "replace").strip().splitlines()
    return "".join(ch for ch in line[0] if ch.isprintable()) if line else ""


class Connection:
    """One websocket to one server, speaking through a :class:`ClientSession`. Thread-safe:
    requests are serialized by a lock (``cancel`` may come from another thread)."""

    def __init__(self, url: str, api_key: str | None = None, open_timeout: float = 30):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            self.ws = _open_websocket(url, headers, open_timeout)
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status == 401:
                raise AuthError(f"the server at {url} refused the API key (HTTP 401)") from None
            reason = _reason(exc.response)
            if status == 429:
                raise TooManyConnections(f"the server at {url} refused another connection "
                                         f"(HTTP 429: {reason or 'too many for this API key'})"
                                         ": close one first") from None
            raise ServerUnavailable(f"the server at {url} answered HTTP {status}"
                                    + (f": {reason}" if reason else "")) from None
        except (OSError, InvalidHandshake, ConnectionClosed) as exc:
            raise ServerUnavailable(f"cannot open a connection to a hookwire server at {url}: "
                                    f"{type(exc).__name__}: {exc}") from None
        self.url = url
        self.lock = ConnectionLock()
        self.broken = False
        self.session = ClientSession()  # the protocol's state; this object moves its bytes
        self.models: dict[str, RemoteModelInfo] = {}
        self.residents = ClientResidents()
        self.use_residents = True
        self.stats = UploadStats()
        self._ids = itertools.count()
        self.ws.send(self.session.hello())
        hello_ok = self._answer()
        self.server_version = hello_ok.server_version
        self.available_models = hello_ok.models

    def close(self):
        self.ws.close()

    def _recv(self):
        try:
            return self.ws.recv()
        except ConnectionClosed as exc:
            raise ServerUnavailable(f"the connection to {self.url} closed: {exc}") from None

    def _answer(self):
        """The answer to the session's open ``hello`` or ``model_info`` (a typed error is
        raised)."""
        while True:
            for event in self.session.receive(self._recv()):
                if isinstance(event, RequestFailed):
                    raise event.error
                return event.message

    def model_info(self, name: str, tl_flags=()) -> RemoteModelInfo:
        """What the server's ``name`` looks like; with ``tl_flags`` (TL's ``set_use_*``
        switches), its TL sites as they fire with those switches on."""
        key = name if not tl_flags else f"{name}|{hook_mode(tl_flags)}"
        known = self.models.get(key)
        if known is not None:  # (no lock: a busy connection still answers from its cache)
            return known
        with self.lock:
            if key not in self.models:
                self.ws.send(self.session.model_info(name, tl_flags))
                try:
                    answer = self._answer()
                except BaseException:
                    if self.session.open:  # interrupted, or the server broke the protocol:
                        self.broken = True  # its answer may still come; never reuse this
                        self.abort()
                    raise
                self.models[key] = RemoteModelInfo.from_message(answer)
            return self.models[key]

    def run(self, graph: dict, tensors: dict[str, torch.Tensor],
            on_event: Callable[[object], None] | None = None,
            on_value: Callable[[str, torch.Tensor], None] | None = None,
            on_submit: Callable[[str], None] | None = None,
            submit_extra: dict | None = None, progress: bool = True) -> RunResult:
        """Submit a graph with its tensors; block until done. Each saved value is handed to
        ``on_value`` the moment its last byte arrives, before the forward pass ends.
        ``submit_extra``: further fields of the submit message (``generate``).
        ``progress=False``: the server sends no ``progress`` messages (nothing shows them;
        a small model's call is then a few messages shorter)."""
        if not progress:
            submit_extra = {**(submit_extra or {}), "progress": False}
        with self.lock:
            rid = f"r{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            if on_submit is not None:
                on_submit(rid)
            try:
                # The server may have dropped values we refer to (expired or evicted): it
                # then refuses the request before running anything, we forget those and send
                # their bytes. A second miss (values expiring at once) sends every byte.
                for _ in range(2):
                    try:
                        return self._submit_and_collect(rid, graph, tensors, on_event,
                                                        on_value, refer=True,
                                                        extra=submit_extra)
                    except ResidentMissing as exc:
                        self.stats.resident_misses += 1
                        self.residents.forget(str(exc.details.get("missing", "")).split(","))
                        rid = f"r{next(self._ids)}-{uuid.uuid4().hex[:8]}"
                        if on_submit is not None:
                            on_submit(rid)
                return self._submit_and_collect(rid, graph, tensors, on_event, on_value,
                                                refer=False, extra=submit_extra)
            except BaseException:
                # Interrupted (Ctrl-C in a notebook), a callback raised, or the stream broke:
                # this socket may still carry the old request's messages, so it must not be
                # reused. Tell the server to stop (best effort) and drop the connection.
                # (A typed error from the server ends its request cleanly: keep the socket.)
                if self.session.open:
                    self._abandon(rid)
                raise

    def fetch_weights(self, model: str, names: list[str]) -> RunResult:
        """Some of ``model``'s parameters, by the names its ``named_parameters()`` gives
        (bounded by the server's ``Limits.max_weight_bytes`` per request)."""
        with self.lock:
            rid = f"w{next(self._ids)}-{uuid.uuid4().hex[:8]}"
            try:
                self.ws.send(self.session.weights(rid, model, names))
                return self._collect(None, None)
            except BaseException:
                if self.session.open:
                    self._abandon(rid)
                raise

    def _plan_uploads(self, tensors: dict[str, torch.Tensor], refer: bool):
        """Split attached tensors into uploads and references to resident values; ask the
        server to keep uploads that are big enough to be worth referring to later."""
        uploads, refs, keep = {}, [], {}
        for tid, t in tensors.items():
            if refer and self.use_residents:
                ref = self.residents.ref_for(t)
                if ref is None and t.numel() * t.element_size() >= MIN_REF_BYTES:
                    cid = content_id(t)
                    if cid in self.residents.server_has:
                        ref = {"resident": cid, "dtype": DTYPE_NAMES[t.dtype],
                               "shape": list(t.shape), "stride": contiguous_strides(t.shape),
                               "offset": 0}
                    else:
                        keep[tid] = cid
                if ref is not None:
                    refs.append({"tid": tid, **ref})
                    continue
            elif self.use_residents and t.numel() * t.element_size() >= MIN_REF_BYTES:
                keep[tid] = content_id(t)
            uploads[tid] = t
        return uploads, refs, keep

    def _submit_and_collect(self, rid, graph, tensors, on_event, on_value,
                            refer: bool = True, extra: dict | None = None) -> RunResult:
        uploads, refs, keep = self._plan_uploads(tensors, refer)
        outgoing = self.session.submit(
            rid, graph, uploads, refs, keep, keep_results=self.use_residents,
            generate=(extra or {}).get("generate"), attached=tensors,
            info=self.models.get(graph.get("model")),
            progress=(extra or {}).get("progress", True))
        for data in outgoing:
            self.ws.send(data)
        result = self._collect(on_event, on_value)
        self.residents.server_has.update(keep.values())
        result.tensor_bytes_sent = sum(t.numel() * t.element_size() for t in uploads.values())
        result.tensors_referenced = len(refs)
        self.stats.requests += 1
        self.stats.bytes_sent += result.bytes_sent
        self.stats.tensor_bytes_sent += result.tensor_bytes_sent
        self.stats.tensors_referenced += len(refs)
        return result

    def _abandon(self, rid: str) -> None:
        """Give up on request ``rid`` now (Ctrl-C, a failing callback): ask the server to stop
        it, then drop the socket at once. No closing handshake: the server may still be
        streaming results that nobody will read, and waiting for its close frame behind
        them took up to websockets' close timeout (10 s). The server notices the closed
        connection (and the cancel) at the model's next block and stops the forward."""
        self.broken = True
        try:
            self.cancel(rid)
        except Exception:
            pass
        self.abort()

    def abort(self) -> None:
        """Close the TCP connection without a closing handshake."""
        sock = getattr(self.ws, "socket", None)
        try:
            if sock is not None:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            if sock is not None:
                sock.close()
        except OSError:
            pass

    def cancel(self, request_id: str) -> None:
        """Ask the server to stop a request (safe from another thread while run() waits)."""
        self.ws.send(self.session.cancel(request_id))

    def _collect(self, on_event, on_value) -> RunResult:
        """Feed what arrives to the session until the open request ends; hand values and
        events to the callbacks as they come."""
        while True:
            for event in self.session.receive(self._recv()):
                if isinstance(event, ValueReceived):
                    if event.resident:
                        self.residents.register_download(event.tensor, event.resident)
                    if on_value is not None:
                        on_value(event.name, event.tensor)
                elif isinstance(event, RequestEvent):
                    if on_event is not None:
                        on_event(event.message)
                elif isinstance(event, RequestDone):
                    return RunResult(event.values, event.done.timings, event.sent,
                                     event.received)
                elif isinstance(event, RequestFailed):
                    raise event.error


# Connections per (url, key). One request runs on a connection at a time; calls that overlap
# (threads, blocking=False runs) take another of up to POOL_SIZE connections when the first is
# busy, so their requests are in flight together and the server can co-batch them (16: half a
# server's default max_connections_per_user; bench/bench_sweep.py measured 2.7x at 16, 2.0x at 8).
POOL_SIZE = 16
# How long a connection handed to one thread is kept for it before that thread starts using
# it (a call traces its hooks in between); after that it is anyone's again.
CLAIM_S = 1.0
_connections: dict[tuple[str, str | None], list[Connection]] = {}
_connections_lock = threading.Lock()
# A connection was let go (a count, so a waiter cannot miss one). Its own lock: letting a
# connection go never waits for the pool's, which is held while a new connection opens.
_released = threading.Condition()
_released_count = 0


class ConnectionLock:
    """A connection's lock (one exchange at a time). Letting it go wakes the calls waiting
    for a connection of a full pool (``get_connection``), so each takes the first one that
    frees. ``claim``: the thread it was handed to and when, until that thread takes it."""

    def __init__(self):
        self._lock = threading.Lock()
        self.claim: tuple[int, float] | None = None

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        taken = self._lock.acquire(blocking, timeout)
        if taken:
            self.claim = None
        return taken

    def release(self) -> None:
        global _released_count
        self._lock.release()
        with _released:
            _released_count += 1
            _released.notify_all()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def _usable(conn: Connection) -> bool:
    # (websockets' client read in a thread of its own and saw a close at once; this one
    # reads in its caller's, so an idle connection's socket is looked at here)
    return not conn.broken and conn.ws.is_open(idle=not conn.lock.locked())


def _free_for(conn: Connection, thread: int, now: float) -> bool:
    """Not running an exchange, and not just handed to another thread that is about to."""
    claim = conn.lock.claim
    return not conn.lock.locked() and (claim is None or claim[0] == thread or
                                       now - claim[1] > CLAIM_S)


def get_connection(url: str | None = None, api_key: str | None = None,
                   wait: bool = True) -> Connection:
    """A cached connection for (url, key), reopened if the server closed it: the first one
    free, else a new one while fewer than POOL_SIZE are open, else -- the pool full and
    busy -- the first that frees (``wait=False``: the first of the pool at once, busy or
    not; for a model description it has cached). Calls one after another always get the
    same connection (its resident values and model descriptions are reused); calls that
    overlap each get one of their own, and past POOL_SIZE of them each waits for whichever
    connection frees first, not for one in particular."""
    url, api_key = resolve_server(url, api_key)
    me = threading.get_ident()
    while True:
        with _released:
            seen = _released_count
        with _connections_lock:
            pool = _connections.setdefault((url, api_key), [])
            pool[:] = [conn for conn in pool if _usable(conn)]
            now = time.monotonic()
            for conn in pool:
                if _free_for(conn, me, now):
                    conn.lock.claim = (me, now)
                    return conn
            if len(pool) < POOL_SIZE:
                conn = Connection(url, api_key)
                conn.lock.claim = (me, now)
                pool.append(conn)
                return conn
            if not wait:
                return pool[0]
        # Until a connection is let go; now and then regardless (claims expire, connections
        # break).
        with _released:
            if _released_count == seen:
                _released.wait(CLAIM_S)


def close_connections() -> None:
    with _connections_lock:
        for pool in _connections.values():
            for conn in pool:
                try:
                    conn.close()
                except Exception:
                    pass
        _connections.clear()
