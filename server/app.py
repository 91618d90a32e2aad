"""The websocket front: the transport of the protocol. It moves bytes between sockets and
each connection's :class:`~hookwire.server.session.ServerSession` (the protocol's state,
with no I/O: ``server/session.py``), and runs what the session asks for.

The front talks to an *engine*: by default the ``ModelWorker`` thread in this process; with
``engine="ray"`` a ``RayEngine`` whose Ray Serve replicas each run that same worker
(server/ray_engine.py). The front never runs model code; the worker never touches sockets.
Results cross from the worker to a connection's outbox with ``call_soon_threadsafe``, and a
writer task per connection sends them in order, so each saved tensor leaves the moment it
exists.

The event loop does nothing whose cost grows with a message: control messages are parsed,
and submits admitted (references checked, memory reserved, buffers allocated), by the
session's ``admit`` in the intake's threads (server/intake.py); binary frames are at most
one chunk each. Memory that requests hold while queued, and results nobody has read yet,
are counted per user and server-wide (server/memory.py); a submit whose tensors do not all
arrive in ``Limits.submit_timeout_s`` is dropped (the session's deadline, one timer per
connection here), and a client that reads nothing for ``Limits.send_timeout_s`` is
disconnected.
"""
from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import http
import json
import logging
import math
import select
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from hookwire import __version__
from hookwire.errors import HookwireError
from hookwire.protocol import PROTOCOL_VERSION
from hookwire.server.binary_send import send_binary
from hookwire.server.connection_gate import ConnectionGate, Gatekeeper
from hookwire.server.fd_limit import ensure_file_descriptors
from hookwire.server.frame_budget import FrameBudget
from hookwire.server.handoff import Handoff
from hookwire.server.hook_modes import HookModeAnswers
from hookwire.server.intake import FrontShare, Intake, parsed_inline
from hookwire.server.memory import MemoryBudget
from hookwire.server.models import HostedModel
from hookwire.server.prepare import prepare_model
from hookwire.server.residents import Residents
from hookwire.server.session import (MAX_FRAME_BYTES, CancelRequest,  # noqa: F401 (re-exported)
                                     ProbeHookMode, RunRequest, SendWeights, ServerSession,
                                     error_text)
from hookwire.server.weights import send_weights
from hookwire.server.worker import BATCH_WINDOW_S, Job, ModelWorker
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server")

# A connection that sent anything this recently may still send a batch mate: the batch window
# waits for it (HookwireServer.mates_possible). A lone caller's request runs at once.
RECENTLY_ACTIVE_S = 1.0
# ... unless it has shown that it sends one request at a time: SEQUENTIAL_AFTER requests of
# its own, none of which arrived while another connection's request was queued or running
# (within the last OVERLAP_MEMORY_S). Such a connection's next request comes after its
# current one is answered, never beside another's: waiting for it only delays the other.
SEQUENTIAL_AFTER = 3
OVERLAP_MEMORY_S = 30.0
MAX_WATCHED_CONNECTIONS = 64  # more open connections than this: the window always runs out
MIN_KEY_CHARS = 16      # an API key shorter than this is refused at start-up (not a secret)
# Text answers (errors, model descriptions, a request's messages) waiting in one connection's
# outbox, at most, before the server stops reading that connection until its client reads
# some: each message may cause an answer, and a client that sends without reading would
# otherwise make them pile up until send_timeout_s dropped it (a non-reading tenant's
# malformed messages grew a server by ~4.5 MiB a second). Bounded below a legitimate pattern's
# (a client reads each request's answers as they come: a request's own messages are a few
# KiB), above one answer's (a large model's description: ~1 MiB).
MAX_UNSENT_TEXT_BYTES = 4 << 20
# Threads copying and framing weights transfers' parts (each part bounded: PART_BYTES).
WEIGHTS_THREADS = 2


class ConnState:
    """One client connection as the transport and the engines see it: its socket, its
    outbox (what the writer task sends, in order) and its :class:`ServerSession` (the
    protocol state, ``server/session.py``). Engines (the worker thread, the Ray relay, a
    weights transfer) hold it as ``job.conn``: they read ``user``, ``store``, ``memory``,
    ``cancelled`` and ``closed`` (the session's) and answer through ``send_threadsafe``
    (and ``flush_due``, see there).
    Binary frames waiting in the outbox (results not yet sent) count against the user's
    memory budget until they leave."""

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop,
                 session: ServerSession):
        self.ws = ws
        self.loop = loop
        self.session = session
        self.memory = session.memory
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.queued_bytes = 0  # binary frames in the outbox (weights transfers wait on it)
        self._frames_left = asyncio.Event()  # set when a binary frame leaves the outbox
        self.queued_text = 0  # characters of text answers in the outbox (MAX_UNSENT_TEXT_BYTES)
        self._text_left = asyncio.Event()  # set when a text answer leaves the outbox
        self.timer: asyncio.TimerHandle | None = None  # armed at session.deadline
        self.timer_at: float | None = None
        self.last_active = time.monotonic()  # when it last sent anything (the batch window)
        self.in_intake = 0  # its control messages being parsed in the intake's threads
        self.frames: FrameBudget | None = None  # what its incoming frames cost (memory, time)
        # What the batch window learns of it (HookwireServer.mates_possible): its requests,
        # those not over yet, and when one last arrived while another connection's was open.
        self.submitted = 0
        self.open_requests: set[str] = set()
        self.last_overlap = -math.inf
        # What the worker thread (or another) sends reaches the loop in bursts (server/handoff.py).
        self.handoff = Handoff(loop, self._take_handoff, lambda: self.session.closed)

    # What engines read: the session's.
    user = property(lambda self: self.session.user)
    store = property(lambda self: self.session.store)
    cancelled = property(lambda self: self.session.cancelled)
    closed = property(lambda self: self.session.closed)

    @property
    def weights_in_flight(self) -> bool:
        return self.session.weights_in_flight

    @weights_in_flight.setter
    def weights_in_flight(self, value: bool) -> None:  # server/weights.py, at its end
        self.session.weights_in_flight = value

    def more_coming(self) -> bool:
        """Whether this connection is in the middle of sending something: a submit's tensors,
        a message being parsed, frames received but not handled yet, or bytes waiting in the
        socket (called from the worker thread; reads only)."""
        if self.session.incoming is not None or self.in_intake:
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

    def may_send_mate(self, now: float) -> bool:
        """Whether a request of this connection could arrive beside another's: unknown
        yet (fewer than SEQUENTIAL_AFTER requests), or one did lately."""
        return self.submitted < SEQUENTIAL_AFTER or now - self.last_overlap < OVERLAP_MEMORY_S

    def send_threadsafe(self, item, may_wait: bool = False) -> None:
        """Hand ``item`` to the outbox from another thread (:meth:`Handoff.send`: items
        handed over together travel in one wake-up of the loop; ``may_wait``: it may wait a
        moment for what comes next)."""
        self.handoff.send(item, may_wait)

    def flush_due(self) -> None:
        """Hand over what waited once it has waited long enough (:meth:`Handoff.flush_due`:
        the worker calls this at each site and block of a forward)."""
        self.handoff.flush_due()

    @property
    def handoffs(self) -> int:
        """Wake-ups of the loop to take hand-offs (diagnostics, tests)."""
        return self.handoff.wakeups

    def _take_handoff(self, items: list) -> None:  # on the loop
        for item in items:
            self._put(item)

    def _put(self, item) -> None:  # on the loop
        if self.closed and item is not None:
            return
        if isinstance(item, bytes):
            self.queued_bytes += len(item)
            if self.memory is not None:
                self.memory.force(self.user, len(item))
        elif isinstance(item, str):
            self.queued_text += len(item)
        self.outbox.put_nowait(item)

    def put_text(self, text: str) -> None:
        """Queue a text answer (on the loop), counted until sent (``text_below``)."""
        self._put(text)

    def sent(self, item) -> None:
        """``item`` left the outbox (sent, or dropped with the connection)."""
        if isinstance(item, bytes):
            self.queued_bytes -= len(item)
            if self.memory is not None:
                self.memory.release(self.user, len(item))
            self._frames_left.set()
        elif isinstance(item, str):
            self.queued_text -= len(item)
            self._text_left.set()

    async def text_below(self, nchars: int, still_open) -> None:
        """Wait, on the loop, until at most ``nchars`` of text answers wait in the outbox or
        ``still_open()`` is false (the writer has stopped: what waits will never leave)."""
        while self.queued_text > nchars and still_open():
            self._text_left.clear()
            try:  # (woken by an answer leaving; looks at the writer at least once a second)
                await asyncio.wait_for(self._text_left.wait(), 1.0)
            except TimeoutError:
                pass

    async def outbox_below(self, nbytes: int) -> bool:
        """Wait, on the loop, until at most ``nbytes`` of binary frames wait in the outbox
        (a weights transfer's window: it holds no thread meanwhile). False: the
        connection ended."""
        while self.queued_bytes > nbytes and not self.closed:
            self._frames_left.clear()
            try:  # (woken by a frame leaving; looks at ``closed`` at least once a second)
                await asyncio.wait_for(self._frames_left.wait(), 1.0)
            except TimeoutError:
                pass
        return not self.closed


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
    and one writer task per connection, each connection's protocol state in a
    :class:`~hookwire.server.session.ServerSession`.

    It never runs model code: accepted submits become :class:`~hookwire.server.worker.Job`
    objects handed to an *engine* (``self.worker``: a :class:`ModelWorker` thread built
    from ``models`` here, or the ``engine`` passed in, e.g. a ``RayEngine``). Work whose cost
    grows with a message (the session's ``admit``: parsing, references to resident values,
    memory reservation, buffers) runs in the :class:`~hookwire.server.intake.Intake`'s
    threads, and each user's share of the front's time is capped
    (:class:`~hookwire.server.intake.FrontShare`). The session decides what each message
    means (binary frames fill the declared tensors of the arriving submit; once all have
    arrived the session asks for the job to be enqueued, or drops it at its deadline,
    ``Limits.submit_timeout_s``); this class runs what it asks for. Per-user state that
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
        self.relays_jobs = getattr(engine, "relays_jobs", False)
        if hasattr(engine, "may_join"):  # the embedded worker: end batch windows early
            engine.may_join = self.mates_possible
        self.connections_per_user: Counter = Counter()
        self.states: set = set()
        self.open_requests: set[tuple[int, str]] = set()  # (id(ConnState), request id)
        self.residents = Residents(self.limits.max_resident_bytes, self.limits.resident_ttl_s,
                                   self.limits.max_resident_bytes_total,
                                   self.limits.max_resident_device_bytes)
        self.memory = MemoryBudget(self.limits.max_pending_bytes_per_user,
                                   self.limits.max_pending_bytes_total)
        self.intake: Intake | None = None
        # Copying and framing weights, a part at a time (server/weights.py): threads of their
        # own, never the loop's shared executor, and never held while a client is slow.
        self.weights_pool: ThreadPoolExecutor | None = None
        self._transfers: set = set()  # weights transfers running (tasks on the loop)
        self.hook_modes: HookModeAnswers | None = None  # (made when it serves)
        self.share = FrontShare(self.limits.front_share)
        # Sockets before they have a user: counted by address from the moment they are
        # accepted (server/connection_gate.py).
        lim = self.limits
        self.gate = ConnectionGate(lim.max_handshakes, lim.max_handshakes_per_address,
                                   lim.max_handshake_bytes, lim.max_connections_per_address)
        self._server = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def mates_possible(self, queued: list) -> bool:
        """Whether a request not queued yet could still join the batch the worker is forming
        (called in the worker thread, while it waits out the batch window): a connection is
        in the middle of sending something (:meth:`ConnState.more_coming`), or one without
        a queued request sent anything in the last ``RECENTLY_ACTIVE_S`` and may send
        requests beside others' (:meth:`ConnState.may_send_mate`: a client calling one
        request after another, however often, cannot). No: the batch runs now instead of
        waiting for mates that cannot come, so a lone caller -- or one sequential caller
        among idle or equally sequential ones -- pays no window. Which requests end up
        batched never changes a result (co-batched results equal solo ones), only when
        they run."""
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
            if id(state) not in waiting and now - state.last_active < RECENTLY_ACTIVE_S \
                    and state.may_send_mate(now):
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
        refusal = connection.admit()  # (last: only a connection about to open is counted)
        if refusal is not None:
            return connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, refusal + "\n")
        return None

    async def _writer(self, state: ConnState):
        while True:
            item = await state.outbox.get()
            if item is None:
                return
            cpu = time.thread_time()
            try:
                # A client that stops reading would make its results pile up here: after
                # send_timeout_s without progress it is disconnected. (asyncio.timeout, not
                # wait_for: the send runs in this task, so its CPU time is measured here.)
                async with asyncio.timeout(self.limits.send_timeout_s):
                    if isinstance(item, bytes):  # a result's frame: no serialized copy
                        await send_binary(state.ws, item)
                    else:
                        await state.ws.send(item)
            except (ConnectionClosed, TimeoutError) as exc:
                if isinstance(exc, TimeoutError):
                    log.warning("dropping a connection of %s: it read nothing for %g s",
                                state.user, self.limits.send_timeout_s)
                    state.ws.transport.abort()
                state.sent(item)
                return
            state.sent(item)
            # Answering costs the loop as much as reading does (a flood of refused submits:
            # as many refusals): the user's share of the front pays for it.
            self.share.charge_sent(state.user, time.thread_time() - cpu, item)

    async def _handle(self, ws: ServerConnection):
        """One connection: read messages into its session, run what the session asks for,
        and hand its answers to the writer task. Nothing here grows with a message: text is
        admitted in the intake's threads, a frame is at most one chunk."""
        # With API keys a user is a key (its resident values outlive a connection); without,
        # each connection is its own user.
        user = getattr(ws, "hookwire_user", None) or f"conn:{id(ws)}"
        session = ServerSession(user, self.residents.for_user(user), self.memory, self.limits,
                                self.entries)
        state = ConnState(ws, asyncio.get_running_loop(), session)
        # Large frames are counted in the memory budget before websockets buffers them, and
        # every frame (pings too) in the user's share of the front (server/frame_budget.py).
        frames = state.frames = FrameBudget(ws, self.memory, user, self.share,
                                             self.limits.submit_timeout_s)
        self.connections_per_user[user] += 1
        self.states.add(state)
        writer = asyncio.create_task(self._writer(state))
        try:
            async for message in ws:
                # CPU time of this thread, not wall time: a message must not be charged for
                # the GIL or the loop it waited for (under load a victim's small messages were
                # charged other threads' time, and its reads waited for a share it never used).
                t0, cost = time.thread_time(), [0.0]
                state.last_active = time.monotonic()
                if isinstance(message, bytes):
                    session.receive_frame(message)
                else:
                    # Parsed, and a submit admitted, in the intake's threads (a message of at
                    # most INLINE_BYTES here: see server/intake.py).
                    admitted = parsed_inline(session, message)
                    if admitted is None:
                        state.in_intake += 1
                        try:
                            admitted = await self.intake.run(user, len(message), session.admit,
                                                             message, cost=cost)
                        finally:
                            state.in_intake -= 1
                        t0 = time.thread_time()  # (waiting for the intake is not loop time)
                    session.receive_admitted(admitted)
                    del admitted
                self._flush(state)
                # This user's share of the front: over it, its next read waits (server/intake).
                self.share.charge(user, time.thread_time() - t0 + cost[0], message)
                del message
                frames.message_done()
                await self.share.wait_turn(user)
                if state.queued_text > MAX_UNSENT_TEXT_BYTES:
                    # Its client reads nothing: read nothing more of it until it does
                    # (TCP holds it back; send_timeout_s drops it if it never reads).
                    await state.text_below(MAX_UNSENT_TEXT_BYTES,
                                           lambda: not writer.done())
        except ConnectionClosed:
            pass
        finally:
            frames.close()
            session.close()
            if state.timer is not None:
                state.timer.cancel()
            state.outbox.put_nowait(None)
            self.states.discard(state)
            for rid in list(state.open_requests):  # (their jobs finish later, or never ran)
                self.open_requests.discard((id(state), rid))
            self.connections_per_user[user] -= 1
            if self.connections_per_user[user] <= 0:
                del self.connections_per_user[user]
            if user.startswith("conn:"):
                self.residents.drop_user(user)
            self.worker.cancel(state)  # whatever of this connection is still running
            await writer
            while not state.outbox.empty():  # what the writer did not send
                state.sent(state.outbox.get_nowait())
            if user.startswith("conn:"):
                self.share.forget(user)  # (after the writer's last charge)

    # ---- running what the session asks for (on the loop: O(1) each) ---------------------
    def _flush(self, state: ConnState) -> None:
        """Run the session's events, queue its answers, and keep the connection's timer at
        the session's deadline."""
        session = state.session
        for event in session.events_received():
            if isinstance(event, RunRequest):
                self._run(state, event.incoming)
            elif isinstance(event, CancelRequest):
                self.worker.cancel(state, event.request_id)
            elif isinstance(event, ProbeHookMode):
                self.hook_modes.ask(state, event.request)  # (known: answered here, O(1))
            elif isinstance(event, SendWeights):
                # A task on the loop, copying in the weights pool: a client that stops
                # reading holds no thread (server/weights.py).
                task = self.loop.create_task(send_weights(state, event.request_id,
                                                          event.wanted, self.weights_pool))
                self._transfers.add(task)
                task.add_done_callback(self._transfers.discard)
        for text in session.data_to_send():
            state.put_text(text)
        deadline = None if session.closed else session.deadline
        if deadline != state.timer_at:
            if state.timer is not None:
                state.timer.cancel()
            state.timer, state.timer_at = None, deadline
            if deadline is not None:
                state.timer = self.loop.call_later(max(0.0, deadline - session.clock()),
                                                   self._on_deadline, state)

    def _on_deadline(self, state: ConnState) -> None:
        state.timer = state.timer_at = None
        state.session.expire()
        self._flush(state)

    def _run(self, state: ConnState, incoming) -> None:
        """A complete submit: to the engine, and the session learns its answer."""
        submit = incoming.submit
        job = Job(state, submit.request_id, submit, incoming.assembler.tensors(),
                  incoming.size, refs=incoming.refs, reservation=incoming.reservation,
                  # (an engine that sends jobs to other processes sends this text as is)
                  submit_text=incoming.text if self.relays_jobs else None)
        self._note_arrival(state, job)
        try:
            position = self.worker.submit(job)
        except HookwireError as exc:  # queue full: answered under the request's own id
            job.finish()
            state.session.refused(submit.request_id, exc)
            return
        if submit.progress:  # (a client that shows no progress is not told its place)
            state.session.accepted(submit.request_id, position)

    def _note_arrival(self, state: ConnState, job: Job) -> None:
        """Count the request for the batch window: it arrived beside another connection's
        open request, or not; it is open until its job finishes (any thread)."""
        now = time.monotonic()
        state.submitted += 1
        if len(self.open_requests) > len(state.open_requests):
            state.last_overlap = now
        key = (id(state), job.request_id)
        self.open_requests.add(key)  # (set add/discard: atomic under the GIL)
        state.open_requests.add(job.request_id)

        def over():
            self.open_requests.discard(key)
            state.open_requests.discard(job.request_id)
        job.on_finish = over

    # ---- lifecycle -----------------------------------------------------------------------
    async def serve_async(self, ready: threading.Event | None = None,
                          stop: asyncio.Event | None = None):
        self.loop = asyncio.get_running_loop()
        self._stop_event = stop or asyncio.Event()
        self.intake = Intake(getattr(self.worker, "busy", None))
        self.weights_pool = ThreadPoolExecutor(WEIGHTS_THREADS,
                                               thread_name_prefix="hookwire-weights")
        # model_info with TL hook switches: answered from what the engine probed, at the
        # front; a combination is probed once, in threads of its own (server/hook_modes.py).
        self.hook_modes = HookModeAnswers(getattr(self.worker, "hook_mode_info", None))
        if not self.worker.is_alive():
            self.worker.start()
        # The connection caps only hold if the process can open that many sockets.
        ensure_file_descriptors(self.limits.max_connections + self.limits.max_handshakes)
        async with serve(self._handle, self.host, self.port, compression=None,
                         max_size=self.limits.max_message_bytes,
                         process_request=self._process_request,
                         create_connection=functools.partial(Gatekeeper, self.gate),
                         # Sockets waiting to be accepted; asyncio also accepts up to this
                         # many per turn of the loop (see Limits.listen_backlog).
                         backlog=self.limits.listen_backlog,
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
            for task in list(self._transfers):
                task.cancel()
            self.weights_pool.shutdown(wait=False, cancel_futures=True)
            self.hook_modes.close()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"
