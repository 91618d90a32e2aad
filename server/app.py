"""The websocket server: one asyncio front that speaks the protocol, and one model worker
thread that runs validated graphs against the preloaded models.

The front talks to an *engine*: by default the ``ModelWorker`` thread in this process; with
``engine="ray"`` a ``RayEngine`` whose Ray Serve replicas each run that same worker
(server/ray_engine.py). The front never runs model code; the worker never touches sockets.
Results cross from the worker to a connection's outbox with ``call_soon_threadsafe``, and a
writer task per connection sends them in order, so each saved tensor leaves the moment it
exists.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import http
import json
import logging
import threading
from collections import Counter
from dataclasses import dataclass, field

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from hookwire import __version__
from hookwire.errors import (FrameError, HookwireError, LimitExceeded, ProtocolError,
                             UnknownModel)
from hookwire.frames import TensorAssembler, decode_frame
from hookwire.protocol import (PROTOCOL_VERSION, Accepted, Cancel, Error, Hello, HelloOk,
                               ModelInfoRequest, Submit, WeightsRequest, dump,
                               parse_client_message)
from hookwire.server.hf_modules import (module_table, plain_hf_model, probe_module_layouts,
                                        probe_module_sites)
from hookwire.server.manifest import describe, probe_sites, site_lookup
from hookwire.server.models import HostedModel
from hookwire.server.residents import Residents, ResidentStore, resolve_refs
from hookwire.server.weights import begin_transfer, check_weights_request, send_weights
from hookwire.server.worker import BATCH_WINDOW_S, Job, ModelWorker
from hookwire.validate import Limits

log = logging.getLogger("hookwire.server")



@dataclass
class ModelEntry:
    hosted: HostedModel
    sites: list
    site_table: dict
    site_order: dict
    info_json: str
    site_modules: dict
    hf_model: object = None  # the plain HF tree that module sites ("hf:...") run on
    # TL hook-switch combination (graph.hook_mode) -> manifest.HookMode, probed on first use
    modes: dict = field(default_factory=dict)


class ConnState:
    """One client connection: its outbox, the request whose tensors are arriving, and the
    store of values kept for its user."""

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop,
                 user: str, store: ResidentStore):
        self.ws = ws
        self.loop = loop
        self.user = user
        self.store = store
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.cancelled: set[str] = set()
        # (submit, assembler of its uploads, bytes so far, tensors it referred to)
        self.incoming: tuple[Submit, TensorAssembler, int, dict] | None = None
        self.discarded: dict[str, None] = {}  # refused request ids (bounded, oldest dropped)

    def discard(self, request_id: str) -> None:
        self.discarded[request_id] = None
        while len(self.discarded) > 1024:
            self.discarded.pop(next(iter(self.discarded)))

    def send_threadsafe(self, item) -> None:
        if not self.closed:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)


def _refused_submit_id(message: str) -> str | None:
    """The request id of a submit that failed validation, so its error names it and its
    frames can be dropped. Only a plain JSON read: nothing of it is trusted further."""
    try:
        raw = json.loads(message)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json can parse
        return None
    if isinstance(raw, dict) and raw.get("type") == "submit":
        rid = raw.get("request_id")
        if isinstance(rid, str) and len(rid) <= 64:
            return rid
    return None


_PRECHECK_BYTES = 1 << 20


def _precheck_node_count(message: str, max_nodes: int) -> None:
    """Refuse an over-long graph before pydantic builds it: pydantic takes ~13 us a node
    (45 s for a 64 MB message of tiny nodes, holding the GIL, so the whole front stalls),
    plain ``json.loads`` ~10x less. The count is re-checked by the validator."""
    try:
        raw = json.loads(message)
    except (ValueError, RecursionError):
        return  # parse_client_message answers with the precise error
    nodes = raw.get("graph", {}).get("nodes") if isinstance(raw, dict) and \
        isinstance(raw.get("graph"), dict) else None
    if isinstance(nodes, list) and len(nodes) > max_nodes:
        raise LimitExceeded(f"graph: {len(nodes)} nodes; limit {max_nodes}", rule="max_nodes")


def _internal_error(exc: Exception) -> HookwireError:
    err = HookwireError(f"internal error: {type(exc).__name__}: {str(exc)[:200]}")
    err.code = "internal_error"  # the worker's code for the same thing (worker.error_message)
    return err


def _jsonable(details: dict) -> dict:
    return {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool))
            or v is None}


def prepare_model(hosted: HostedModel) -> ModelEntry:
    # TL hook points first, then HF module sites (hookwire.module_sites): additive, so TL
    # clients see the sites they always saw, in the same order.
    sites = probe_sites(hosted.bridge)
    hf_model, module_sites, layouts = None, [], ({}, {})
    if getattr(getattr(hosted.bridge, "original_model", None), "config", None) is None:
        # A bridge over a module that is no HF model (TL's native models...): TL sites only.
        log.info("%s: no HF module sites (the bridge wraps no HF model)", hosted.name)
    else:
        try:
            hf_model = plain_hf_model(hosted.bridge)
            module_sites = probe_module_sites(hf_model)
            layouts = probe_module_layouts(hf_model)
        except Exception:  # a model whose HF tree we cannot mirror still serves its TL sites
            log.exception("no HF module sites for %s", hosted.name)
            hf_model, module_sites, layouts = None, [], ({}, {})
    sites = sites + module_sites
    info = describe(hosted, sites)
    info.module_layouts, info.step_module_layouts = layouts
    site_table, site_order = site_lookup(hosted.bridge, sites)
    site_modules = {name: hp for name, hp in hosted.bridge.hook_dict.items()}
    if hf_model is not None:
        site_modules.update(module_table(hf_model, module_sites))
    return ModelEntry(
        hosted=hosted, sites=sites, site_table=site_table, site_order=site_order,
        info_json=dump(info), site_modules=site_modules, hf_model=hf_model)


class HookwireServer:
    def __init__(self, models: dict[str, HostedModel], host: str = "127.0.0.1",
                 port: int = 8765, api_keys: list[str] | None = None,
                 limits: Limits | None = None, batching: bool = True,
                 batch_window_s: float = BATCH_WINDOW_S, engine=None):
        self.host, self.port = host, port
        self.api_keys = [k.encode() for k in api_keys] if api_keys else None
        self.limits = limits or Limits()
        if engine is None:  # embedded: the models run in a thread of this process
            self.entries = {name: prepare_model(h) for name, h in models.items()}
            engine = ModelWorker(self.entries, self.limits, batching=batching,
                                 window_s=batch_window_s)
        else:  # e.g. RayEngine: its replicas hold the models; it tells what they offer
            self.entries = engine.entries
        self.worker = engine  # the engine seam: submit, queue_depth, cancel, describe, stop
        self.connections_per_user: Counter = Counter()
        self.states: set = set()
        self.residents = Residents(self.limits.max_resident_bytes, self.limits.resident_ttl_s)
        self._server = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- handshake: auth and health before any upgrade -----------------------------------
    def _process_request(self, connection, request):
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
                await state.ws.send(item)
            except ConnectionClosed:
                return

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
        state = ConnState(ws, asyncio.get_running_loop(), user, self.residents.for_user(user))
        self.connections_per_user[user] += 1
        self.states.add(state)
        writer = asyncio.create_task(self._writer(state))
        try:
            async for message in ws:
                try:
                    self._on_message(state, message)
                except Exception as exc:
                    if not isinstance(exc, HookwireError):
                        # A bug of ours (the fuzzers look for these) answers this message
                        # with an error and drops any half-received request; it must not
                        # end the connection or the server.
                        log.exception("handling a client message failed")
                        exc = _internal_error(exc)
                    rid = state.incoming[0].request_id if state.incoming else None
                    if (isinstance(exc, FrameError) or exc.code == "internal_error") and \
                            state.incoming is not None:
                        state.discard(state.incoming[0].request_id)
                        state.incoming = None
                    if rid is None and isinstance(message, str):
                        rid = _refused_submit_id(message)
                        if rid is not None:
                            state.discard(rid)  # its tensor frames will follow: drop them
                    state.outbox.put_nowait(dump(Error(request_id=rid, code=exc.code,
                                                       message=exc.message,
                                                       details=_jsonable(exc.details))))
        except ConnectionClosed:
            pass
        finally:
            state.closed = True
            state.outbox.put_nowait(None)
            self.states.discard(state)
            self.connections_per_user[user] -= 1
            if self.connections_per_user[user] <= 0:
                del self.connections_per_user[user]
            if user.startswith("conn:"):
                self.residents.drop_user(user)
            self.worker.cancel(state)  # whatever of this connection is still running
            await writer

    def _on_message(self, state: ConnState, message):
        if isinstance(message, bytes):
            head, payload = decode_frame(message)
            if head["rid"] in state.discarded:
                return  # the rest of a request that was already refused
            if state.incoming is None:
                raise FrameError("binary frame with no submit waiting for tensors")
            submit, asm, size, referred = state.incoming
            if head["rid"] != submit.request_id:
                raise FrameError("binary frame for a different request")
            asm.add(head, payload)
            state.incoming = (submit, asm, size + len(message), referred)
            if asm.complete:
                state.incoming = None
                self._enqueue(state, submit, {**asm.tensors(), **referred},
                              size + len(message))
            return
        if len(message) > _PRECHECK_BYTES:
            _precheck_node_count(message, self.limits.max_nodes)
        msg = parse_client_message(message)
        if isinstance(msg, Hello):
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
        elif isinstance(msg, Submit):
            if state.incoming is not None:
                # The previous submit declared more bytes than it sent (a lying header, or a
                # client that gave up): it is refused and dropped, so one bad request cannot
                # wedge the connection; the new one proceeds.
                old = state.incoming[0].request_id
                state.incoming = None
                state.discard(old)
                state.outbox.put_nowait(dump(Error(
                    request_id=old, code=FrameError.code, message="a new submit arrived "
                    "before this request's declared tensors were complete; dropped")))
            asm = TensorAssembler(msg.tensors, self.limits.max_constant_bytes + (256 << 20))
            if {r.tid for r in msg.refs} & {h.tid for h in msg.tensors}:
                raise ProtocolError("a tensor id is both uploaded and referenced")
            referred = resolve_refs(state.store, msg.refs, self.limits.max_constant_bytes)
            if asm.complete:
                self._enqueue(state, msg, {**asm.tensors(), **referred}, len(message))
            else:
                state.incoming = (msg, asm, len(message), referred)
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

    def _enqueue(self, state: ConnState, submit: Submit, tensors, size: int):
        try:
            position = self.worker.submit(Job(state, submit.request_id, submit, tensors, size))
        except HookwireError as exc:  # queue full: answered under the request's own id
            state.outbox.put_nowait(dump(Error(request_id=submit.request_id, code=exc.code,
                                               message=exc.message,
                                               details=_jsonable(exc.details))))
            return
        state.outbox.put_nowait(dump(Accepted(request_id=submit.request_id,
                                              queue_position=position)))

    # ---- lifecycle -----------------------------------------------------------------------
    async def serve_async(self, ready: threading.Event | None = None,
                          stop: asyncio.Event | None = None):
        self.loop = asyncio.get_running_loop()
        self._stop_event = stop or asyncio.Event()
        if not self.worker.is_alive():
            self.worker.start()
        async with serve(self._handle, self.host, self.port, compression=None,
                         max_size=self.limits.max_message_bytes,
                         process_request=self._process_request,
                         ping_interval=None, write_limit=8 << 20, max_queue=64) as server:
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

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"
