"""The websocket server: one asyncio front that speaks the protocol, and one model worker
thread that runs validated graphs against the preloaded models.

The front talks to an *engine*: by default the ``ModelWorker`` thread in this process; with
``engine="ray"`` a ``RayEngine`` whose Ray Serve replicas each run that same worker
(server/ray_engine.py). The front never runs model code; the worker never touches sockets.
Results cross from the worker to a connection's outbox with ``call_soon_threadsafe``, and a
writer task per connection sends them in order, so each saved tensor leaves the moment it
exists.

The event loop does nothing whose cost grows with a message: control messages are parsed,
and submits admitted (references checked, memory reserved, buffers allocated), in the
intake's threads (server/intake.py); binary frames are at most one chunk each. Memory that
requests hold while queued, and results nobody has read yet, are counted per user and
server-wide (server/memory.py); a submit whose tensors do not all arrive in
``Limits.submit_timeout_s`` is dropped, and a client that reads nothing for
``Limits.send_timeout_s`` is disconnected.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import http
import json
import logging
import select
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from hookwire import __version__
from hookwire.errors import (FrameError, HookwireError, ProtocolError,
                             UnknownModel)
from hookwire.frames import CHUNK_BYTES, MAX_HEADER_BYTES, TensorAssembler, decode_frame
from hookwire.protocol import (PROTOCOL_VERSION, Accepted, Cancel, Error, Hello, HelloOk,
                               ModelInfoRequest, Submit, WeightsRequest, dump,
                               parse_client_message_bounded)
from hookwire.server.intake import FrontShare, Intake
from hookwire.server.memory import MemoryBudget, Reservation
from hookwire.server.models import HostedModel
from hookwire.server.prepare import ModelEntry, prepare_model  # noqa: F401 (re-exported)
from hookwire.server.residents import Residents, ResidentStore, check_refs
from hookwire.server.weights import begin_transfer, check_weights_request, send_weights
from hookwire.server.worker import BATCH_WINDOW_S, Job, ModelWorker
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server")

MIN_KEY_CHARS = 16      # an API key shorter than this is refused at start-up (not a secret)
MAX_FRAME_BYTES = CHUNK_BYTES + MAX_HEADER_BYTES + 4   # one chunk frame, as clients send them
MAX_LIST_ITEMS = 100_000  # tensors, refs (protocol.Submit)
# A connection that sent anything this recently may still send a batch mate: the batch window
# waits for it (HookwireServer.mates_possible). A lone caller's request runs at once.
RECENTLY_ACTIVE_S = 1.0
MAX_WATCHED_CONNECTIONS = 64  # more open connections than this: the window always runs out


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
    """A submit admitted by the intake: its memory is reserved, its buffers allocated; its
    declared tensors may still be arriving."""
    submit: Submit
    assembler: TensorAssembler
    refs: list                # checked references (materialised when it runs)
    reservation: Reservation
    size: int                 # bytes received so far
    timer: object = None      # drops it after Limits.submit_timeout_s

    def drop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.reservation.release()


class ConnState:
    """One client connection: its outbox, the request whose tensors are arriving, and the
    store of values kept for its user. Binary frames waiting in the outbox (results not yet
    sent) count against the user's memory budget until they leave."""

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop,
                 user: str, store: ResidentStore, memory: MemoryBudget | None = None):
        self.ws = ws
        self.loop = loop
        self.user = user
        self.store = store
        self.memory = memory
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.cancelled = RecentIds()
        self.incoming: Incoming | None = None
        self.queued_bytes = 0  # binary frames in the outbox (weights transfers wait on it)
        self.discarded = RecentIds()  # refused request ids: their frames are dropped
        self.last_active = time.monotonic()  # when it last sent anything (the batch window)
        self.in_intake = 0  # its control messages being parsed in the intake's threads
        self._handoff: list = []  # from other threads, waiting for the loop (send_threadsafe)
        self._handoff_lock = threading.Lock()
        self._handoff_scheduled = False

    def more_coming(self) -> bool:
        """Whether this connection is in the middle of sending something: a submit's tensors,
        a message being parsed, frames received but not handled yet, or bytes waiting in the
        socket (called from the worker thread; reads only)."""
        if self.incoming is not None or self.in_intake:
            return True
        try:
            if len(self.ws.recv_messages.frames):
                return True
            sock = self.ws.transport.get_extra_info("socket")
            if sock is None:
                return False
            poller = select.poll()  # (select() cannot watch descriptors past FD_SETSIZE)
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        except Exception:  # closing, or a websockets without these internals: maybe
            return True

    def discard(self, request_id: str) -> None:
        self.discarded.add(request_id)

    def send_threadsafe(self, item) -> None:
        """Hand ``item`` to the outbox from another thread. Items handed over before the
        loop gets to them travel together: one wake-up of the loop, not one per item (a
        result's header and its frame, then ``done``, come in a burst)."""
        if self.closed:
            return
        with self._handoff_lock:
            self._handoff.append(item)
            if self._handoff_scheduled:
                return
            self._handoff_scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._take_handoff)
        except RuntimeError:  # the loop is closed: nothing will be sent any more
            with self._handoff_lock:
                self._handoff.clear()
                self._handoff_scheduled = False
            raise

    def _take_handoff(self) -> None:  # on the loop
        with self._handoff_lock:
            items = list(self._handoff)
            self._handoff.clear()
            self._handoff_scheduled = False
        for item in items:
            self._put(item)

    def _put(self, item) -> None:  # on the loop
        if self.closed and item is not None:
            return
        if isinstance(item, bytes):
            self.queued_bytes += len(item)
            if self.memory is not None:
                self.memory.force(self.user, len(item))
        self.outbox.put_nowait(item)

    def sent(self, item) -> None:
        """``item`` left the outbox (sent, or dropped with the connection)."""
        if isinstance(item, bytes):
            self.queued_bytes -= len(item)
            if self.memory is not None:
                self.memory.release(self.user, len(item))

    def drop_incoming(self) -> Incoming | None:
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.drop()
        return incoming


def _internal_error(exc: Exception) -> HookwireError:
    err = HookwireError(f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
    err.code = "internal_error"  # the worker's code for the same thing (worker.error_message)
    return err


def _jsonable(details: dict) -> dict:
    return {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool))
            or v is None}


def check_api_keys(api_keys) -> None:
    """Refuse, at start-up, keys too short to be secret and malformed hashed entries."""
    for key in api_keys or ():
        if key.startswith("sha256:"):
            if len(key) != 71 or any(c not in "0123456789abcdefABCDEF" for c in key[7:]):
                raise ValueError("an API key entry 'sha256:<hex>' needs the 64 hex digits "
                                 "of the key's SHA-256")
        elif len(key) < MIN_KEY_CHARS:
            raise ValueError(f"an API key of {len(key)} characters is too short to be secret "
                             f"(at least {MIN_KEY_CHARS}); generate one with e.g. "
                             "python -c 'import secrets; print(secrets.token_urlsafe(24))'")


class HookwireServer:
    """The websocket front: handshake (API keys, ``/health``, connection limits), one reader
    and one writer task per connection, and the protocol's per-connection state.

    It never runs model code: accepted submits become :class:`~hookwire.server.worker.Job`
    objects handed to an *engine* (``self.worker``: a :class:`ModelWorker` thread built
    from ``models`` here, or the ``engine`` passed in, e.g. a ``RayEngine``). Work whose cost
    grows with a message (parsing, admitting a submit: references to resident values,
    memory reservation, buffers) runs in the :class:`~hookwire.server.intake.Intake`'s
    threads, and each user's share of the front's time is capped
    (:class:`~hookwire.server.intake.FrontShare`). Binary frames fill the declared tensors
    of a pending submit (:class:`~hookwire.frames.TensorAssembler`); once all have arrived
    the job is enqueued, or dropped after ``Limits.submit_timeout_s``. Per-user state that
    outlives a connection -- resident values (:class:`~hookwire.server.residents.Residents`)
    and pending memory (:class:`~hookwire.server.memory.MemoryBudget`) -- lives here,
    keyed by user (an API key's hash, or the connection when the server has no keys).
    ``serve_async`` runs it on the current event loop; ``hookwire.server.start`` and
    ``hookwire serve`` are the usual ways in.
    """
    def __init__(self, models: dict[str, HostedModel], host: str = "127.0.0.1",
                 port: int = 8765, api_keys: list[str] | None = None,
                 limits: Limits | None = None, batching: bool = True,
                 batch_window_s: float = BATCH_WINDOW_S, engine=None):
        self.host, self.port = host, port
        check_api_keys(api_keys)
        self.api_keys = [k.encode() for k in api_keys] if api_keys else None
        self.limits = limits or Limits()
        if engine is None:  # embedded: the models run in a thread of this process
            self.entries = {name: prepare_model(h) for name, h in models.items()}
            engine = ModelWorker(self.entries, self.limits, batching=batching,
                                 window_s=batch_window_s)
        else:  # e.g. RayEngine: its replicas hold the models; it tells what they offer
            self.entries = engine.entries
        self.worker = engine  # the engine seam: submit, queue_depth, cancel, describe, stop
        if hasattr(engine, "may_join"):  # the embedded worker: end batch windows early
            engine.may_join = self.mates_possible
        self.connections_per_user: Counter = Counter()
        self.states: set = set()
        self.residents = Residents(self.limits.max_resident_bytes, self.limits.resident_ttl_s,
                                   self.limits.max_resident_bytes_total,
                                   self.limits.max_resident_device_bytes)
        self.memory = MemoryBudget(self.limits.max_pending_bytes_per_user,
                                   self.limits.max_pending_bytes_total)
        # Containers ([ and {) a legitimate message can need: a graph's nodes (~10 each),
        # tensor headers and references (2-3 each), and some slack.
        self.max_containers = 16 * self.limits.max_nodes + 5 * MAX_LIST_ITEMS + 4096
        self.intake: Intake | None = None
        self.share = FrontShare(self.limits.front_share)
        self._server = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def mates_possible(self, queued: list) -> bool:
        """Whether a request not queued yet could still join the batch the worker is forming
        (called in the worker thread, while it waits out the batch window): a connection is
        in the middle of sending something (:meth:`ConnState.more_coming`), or one without
        a queued request sent anything in the last ``RECENTLY_ACTIVE_S``. No: the batch runs
        now instead of waiting for mates that cannot come, so a lone caller pays no window.
        Which requests end up batched never changes a result (co-batched results equal
        solo ones), only when they run."""
        try:
            states = list(self.states)  # the loop thread adds and drops connections
        except RuntimeError:
            return True
        if len(states) > MAX_WATCHED_CONNECTIONS:
            return True  # this many connections: mates are likely, and looking costs
        waiting = {id(job.conn) for job in queued}
        now = time.monotonic()
        for state in states:
            if state.closed:
                continue
            if id(state) not in waiting and now - state.last_active < RECENTLY_ACTIVE_S:
                return True
            if state.more_coming():
                return True
        return False

    # ---- handshake: auth and health before any upgrade -----------------------------------
    def _process_request(self, connection, request):
        if len(self.states) >= self.limits.max_connections:
            return connection.respond(http.HTTPStatus.SERVICE_UNAVAILABLE,
                                      "the server holds as many connections as it allows\n")
        if request.path == "/health":
            body = json.dumps({"status": "ok", "version": __version__,
                               "protocol": PROTOCOL_VERSION, "models": list(self.entries),
                               "queue_depth": self.worker.queue_depth(),
                               "batching": self.worker.batching,
                               "engine": self.worker.describe()}).encode()
            return Response(200, "OK", Headers([("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body)))]), body)
        if self.api_keys is not None:
            auth = request.headers.get("Authorization", "")
            token = auth[7:].encode() if auth.startswith("Bearer ") else b""
            # Constant-time comparison against every entry: a key, or a key's SHA-256
            # ("sha256:<hex>", so the key file need not hold the secret itself).
            digest = hashlib.sha256(token).hexdigest().encode()
            ok = False
            for key in self.api_keys:
                if key.startswith(b"sha256:"):
                    ok |= hmac.compare_digest(digest, key[7:].lower())
                else:
                    ok |= hmac.compare_digest(token, key)
            if not ok:
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
            # The user is the key (hashed: the key itself is not kept around in memory dumps).
            user = "key:" + hashlib.sha256(token).hexdigest()[:32]
            if self.connections_per_user[user] >= self.limits.max_connections_per_user:
                return connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS,
                                          f"at most {self.limits.max_connections_per_user} "
                                          "connections per API key\n")
            connection.hookwire_user = user
        return None

    async def _writer(self, state: ConnState):
        while True:
            item = await state.outbox.get()
            if item is None:
                return
            try:
                # A client that stops reading would make its results pile up here: after
                # send_timeout_s without progress it is disconnected.
                await asyncio.wait_for(state.ws.send(item), self.limits.send_timeout_s)
            except (ConnectionClosed, asyncio.TimeoutError) as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    log.warning("dropping a connection of %s: it read nothing for %g s",
                                state.user, self.limits.send_timeout_s)
                    state.ws.transport.abort()
                state.sent(item)
                return
            state.sent(item)

    async def _answer_hook_mode(self, state: ConnState, msg: ModelInfoRequest):
        """``model_info`` with TL hook switches on: the engine probes that combination once
        (holding the model), then every client is told from the cached answer."""
        loop = asyncio.get_running_loop()
        try:
            hook_mode_info = getattr(self.worker, "hook_mode_info", None)
            if hook_mode_info is None:
                raise HookwireError("this server's engine does not serve TL hook switches")
            answer = await loop.run_in_executor(None, hook_mode_info, msg.model,
                                                tuple(msg.tl_flags))
        except Exception as exc:
            if not isinstance(exc, HookwireError):
                log.exception("probing TL hook switches failed")
                exc = _internal_error(exc)
            answer = dump(Error(request_id=None, code=exc.code, message=exc.message,
                                details=_jsonable(exc.details)))
        state.outbox.put_nowait(answer)

    async def _handle(self, ws: ServerConnection):
        # With API keys a user is a key (its resident values outlive a connection); without,
        # each connection is its own user.
        user = getattr(ws, "hookwire_user", None) or f"conn:{id(ws)}"
        state = ConnState(ws, asyncio.get_running_loop(), user, self.residents.for_user(user),
                          self.memory)
        self.connections_per_user[user] += 1
        self.states.add(state)
        writer = asyncio.create_task(self._writer(state))
        try:
            async for message in ws:
                t0, cost = time.perf_counter(), [0.0]
                state.last_active = time.monotonic()
                try:
                    if isinstance(message, bytes):
                        self._on_frame(state, message)
                    else:
                        # Parsed, and a submit admitted, in the intake's threads: never on
                        # this loop, whatever the message holds.
                        state.in_intake += 1
                        try:
                            outcome = await self.intake.run(user, len(message), self._admit,
                                                            state, message, cost=cost)
                        finally:
                            state.in_intake -= 1
                        t0 = time.perf_counter()  # (waiting for the intake is not loop time)
                        self._on_message(state, outcome)
                except Exception as exc:
                    if not isinstance(exc, HookwireError):
                        # A bug of ours (the fuzzers look for these) answers this message
                        # with an error and drops any half-received request; it must not
                        # end the connection or the server.
                        log.exception("handling a client message failed")
                        exc = _internal_error(exc)
                    rid = getattr(exc, "request_id", None)  # a submit the intake refused
                    if rid is not None:
                        state.discard(rid)  # its tensor frames will follow: drop them
                    elif state.incoming is not None:
                        rid = state.incoming.submit.request_id
                        if isinstance(exc, FrameError) or exc.code == "internal_error":
                            state.discard(rid)
                            state.drop_incoming()
                    state.outbox.put_nowait(dump(Error(request_id=rid, code=exc.code,
                                                       message=exc.message,
                                                       details=_jsonable(exc.details))))
                    del exc
                # This user's share of the front: over it, its next read waits (server/intake).
                self.share.charge(user, time.perf_counter() - t0 + cost[0], message)
                await self.share.wait_turn(user)
        except ConnectionClosed:
            pass
        finally:
            state.closed = True
            state.drop_incoming()
            state.outbox.put_nowait(None)
            self.states.discard(state)
            self.connections_per_user[user] -= 1
            if self.connections_per_user[user] <= 0:
                del self.connections_per_user[user]
            if user.startswith("conn:"):
                self.residents.drop_user(user)
                self.share.forget(user)
            self.worker.cancel(state)  # whatever of this connection is still running
            await writer
            while not state.outbox.empty():  # what the writer did not send
                state.sent(state.outbox.get_nowait())

    # ---- in the intake's threads: everything that grows with a message -------------------
    def _admit(self, state: ConnState, message: str):
        """Parse a control message (once, bounded) and admit a submit: check its references
        against the user's resident values, reserve the memory its tensors will take
        (declared uploads + materialised references), then allocate their buffers."""
        _, msg = parse_client_message_bounded(message, self.max_containers)
        if not isinstance(msg, Submit):
            return msg
        try:
            if {r.tid for r in msg.refs} & {h.tid for h in msg.tensors}:
                raise ProtocolError("a tensor id is both uploaded and referenced")
            refs, ref_bytes = check_refs(state.store, msg.refs, self.limits.max_constant_bytes)
            declared = sum(h.nbytes() for h in msg.tensors)
            limit = self.limits.max_constant_bytes + (256 << 20)
            if declared > limit:
                raise FrameError(f"declared tensors total {declared} bytes; limit {limit}")
            reservation = self.memory.reserve(state.user, declared + ref_bytes,
                                              f"request {msg.request_id}")
            try:
                asm = TensorAssembler(msg.tensors, limit)
            except BaseException:
                reservation.release()
                raise
        except HookwireError as exc:
            exc.request_id = msg.request_id
            raise
        return Incoming(msg, asm, refs, reservation, len(message))

    # ---- on the loop: O(1) per message (a frame copies at most one chunk) ----------------
    def _on_frame(self, state: ConnState, message: bytes):
        if len(message) > MAX_FRAME_BYTES:
            raise FrameError(f"binary frame of {len(message)} bytes; tensors travel in chunks "
                             f"of at most {CHUNK_BYTES} bytes")
        head, payload = decode_frame(message)
        if head["rid"] in state.discarded:
            return  # the rest of a request that was already refused
        incoming = state.incoming
        if incoming is None:
            raise FrameError("binary frame with no submit waiting for tensors")
        if head["rid"] != incoming.submit.request_id:
            raise FrameError("binary frame for a different request")
        incoming.assembler.add(head, payload)
        incoming.size += len(message)
        if incoming.assembler.complete:
            state.incoming = None
            self._enqueue(state, incoming)

    def _expire(self, state: ConnState, incoming: Incoming) -> None:
        """A submit whose declared tensors did not all arrive in time: dropped, its memory
        released, its late frames discarded."""
        if state.incoming is not incoming or state.closed:
            return
        state.drop_incoming()
        rid = incoming.submit.request_id
        state.discard(rid)
        state.outbox.put_nowait(dump(Error(
            request_id=rid, code=FrameError.code,
            message=f"the request's declared tensors did not all arrive within "
                    f"{self.limits.submit_timeout_s:g} seconds; dropped")))

    def _on_message(self, state: ConnState, msg):
        if isinstance(msg, Incoming):
            if state.closed:
                msg.drop()
                return
            if state.incoming is not None:
                # The previous submit declared more bytes than it sent (a lying header, or a
                # client that gave up): it is refused and dropped, so one bad request cannot
                # wedge the connection; the new one proceeds.
                old = state.drop_incoming().submit.request_id
                state.discard(old)
                state.outbox.put_nowait(dump(Error(
                    request_id=old, code=FrameError.code, message="a new submit arrived "
                    "before this request's declared tensors were complete; dropped")))
            if msg.assembler.complete:
                self._enqueue(state, msg)
            else:
                state.incoming = msg
                msg.timer = self.loop.call_later(self.limits.submit_timeout_s, self._expire,
                                                 state, msg)
        elif isinstance(msg, Hello):
            if msg.protocol != PROTOCOL_VERSION:
                raise ProtocolError(f"client speaks protocol {msg.protocol}, this server "
                                    f"{PROTOCOL_VERSION} (server {__version__}); upgrade the "
                                    "older side")
            state.outbox.put_nowait(dump(HelloOk(protocol=PROTOCOL_VERSION,
                                                 server_version=__version__,
                                                 models=list(self.entries))))
        elif isinstance(msg, ModelInfoRequest):
            entry = self.entries.get(msg.model)
            if entry is None:
                raise UnknownModel(f"model {msg.model!r} is not served here; served: "
                                   f"{', '.join(self.entries)}")
            if msg.tl_flags:
                # Probing runs the model: in the engine's own thread, not on this loop.
                asyncio.get_running_loop().create_task(self._answer_hook_mode(state, msg))
            else:
                state.outbox.put_nowait(entry.info_json)
        elif isinstance(msg, Cancel):
            state.cancelled.add(msg.request_id)
            self.worker.cancel(state, msg.request_id)
        elif isinstance(msg, WeightsRequest):
            entry = self.entries.get(msg.model)
            if entry is None:
                raise UnknownModel(f"model {msg.model!r} is not served here; served: "
                                   f"{', '.join(self.entries)}")
            if not isinstance(entry, ModelEntry):
                raise HookwireError("this server's engine holds its models in other "
                                    "processes and does not send weights")
            try:
                wanted = check_weights_request(entry, msg, self.limits)
                begin_transfer(state)
            except HookwireError as exc:  # answered under the request's own id
                state.outbox.put_nowait(dump(Error(request_id=msg.request_id, code=exc.code,
                                                   message=exc.message,
                                                   details=_jsonable(exc.details))))
                return
            asyncio.get_running_loop().run_in_executor(None, send_weights, state,
                                                       msg.request_id, wanted)

    def _enqueue(self, state: ConnState, incoming: Incoming):
        if incoming.timer is not None:
            incoming.timer.cancel()
        submit = incoming.submit
        job = Job(state, submit.request_id, submit, incoming.assembler.tensors(),
                  incoming.size, refs=incoming.refs, reservation=incoming.reservation)
        try:
            position = self.worker.submit(job)
        except HookwireError as exc:  # queue full: answered under the request's own id
            job.finish()
            state.outbox.put_nowait(dump(Error(request_id=submit.request_id, code=exc.code,
                                               message=exc.message,
                                               details=_jsonable(exc.details))))
            return
        if submit.progress:  # (a client that shows no progress is not told its place)
            state.outbox.put_nowait(dump(Accepted(request_id=submit.request_id,
                                                  queue_position=position)))

    # ---- lifecycle -----------------------------------------------------------------------
    async def serve_async(self, ready: threading.Event | None = None,
                          stop: asyncio.Event | None = None):
        self.loop = asyncio.get_running_loop()
        self._stop_event = stop or asyncio.Event()
        self.intake = Intake(getattr(self.worker, "busy", None))
        if not self.worker.is_alive():
            self.worker.start()
        async with serve(self._handle, self.host, self.port, compression=None,
                         max_size=self.limits.max_message_bytes,
                         process_request=self._process_request,
                         # Messages read ahead per connection: each may be up to
                         # max_message_bytes, and a reader that is made to wait (its user's
                         # front share) must push back on the sender instead of buffering.
                         ping_interval=None, write_limit=8 << 20, max_queue=1) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop_event.wait()
            # Shutting down: queued requests get a typed error, the running batch finishes,
            # and every answer is flushed before the connections close. Nothing accepted is
            # left without its done or error.
            self.worker.stop()
            await asyncio.get_running_loop().run_in_executor(None, self.worker.join, 60)
            for _ in range(100):
                if all(st.outbox.empty() for st in list(self.states)):
                    break
                await asyncio.sleep(0.05)
            self.intake.close()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"
