"""The websocket server: one asyncio front that speaks the protocol, and one model worker
thread that runs validated graphs against the preloaded models.

The front never runs model code; the worker never touches sockets. Results cross from the
worker to a connection's outbox with ``call_soon_threadsafe``, and a writer task per
connection sends them in order, so each saved tensor leaves the moment it exists.
"""
from __future__ import annotations

import asyncio
import hmac
import http
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Response

from hookwire import __version__
from hookwire.errors import (Cancelled, FrameError, GraphValidationError, HookwireError,
                             ProtocolError, UnknownModel)
from hookwire.executor import Interleaver
from hookwire.frames import (CHUNK_BYTES, TensorAssembler, decode_frame, encode_chunks,
                             header_for)
from hookwire.protocol import (PROTOCOL_VERSION, Accepted, Cancel, Done, Error, Hello, HelloOk,
                               ModelInfoRequest, Progress, Result, Submit, dump,
                               parse_client_message)
from hookwire.module_sites import is_module_site
from hookwire.server.hf_modules import module_table, plain_hf_model, probe_module_sites
from hookwire.server.manifest import describe, probe_sites, site_lookup
from hookwire.server.models import HostedModel
from hookwire.validate import Limits, infer_shapes, validate_structure

log = logging.getLogger("hookwire.server")

MAX_MESSAGE_BYTES = 64 << 20  # one websocket message; tensors arrive in 1 MiB chunks


@dataclass
class ModelEntry:
    hosted: HostedModel
    sites: list
    site_table: dict
    site_order: dict
    info_json: str
    site_modules: dict
    hf_model: object = None  # the plain HF tree that module sites ("hf:...") run on


@dataclass
class Job:
    conn: "ConnState"
    request_id: str
    submit: Submit
    tensors: dict[str, torch.Tensor]
    received_bytes: int
    enqueued: float = field(default_factory=time.perf_counter)


class ConnState:
    """One client connection: its outbox and the request whose tensors are arriving."""

    def __init__(self, ws: ServerConnection, loop: asyncio.AbstractEventLoop):
        self.ws = ws
        self.loop = loop
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.closed = False
        self.cancelled: set[str] = set()
        self.incoming: tuple[Submit, TensorAssembler, int] | None = None
        self.discarded: dict[str, None] = {}  # refused request ids (bounded, oldest dropped)

    def discard(self, request_id: str) -> None:
        self.discarded[request_id] = None
        while len(self.discarded) > 1024:
            self.discarded.pop(next(iter(self.discarded)))

    def send_threadsafe(self, item) -> None:
        if not self.closed:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, item)


class ModelWorker(threading.Thread):
    """Runs jobs one after another (cross-user batching arrives with issue 5)."""

    def __init__(self, models: dict[str, ModelEntry], limits: Limits):
        super().__init__(name="hookwire-model-worker", daemon=True)
        self.models = models
        self.limits = limits
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = False

    def submit(self, job: Job) -> int:
        self.jobs.put(job)
        return self.jobs.qsize()

    def stop(self):
        self.stopping = True
        self.jobs.put(None)

    def run(self):
        while True:
            job = self.jobs.get()
            if job is None or self.stopping:
                return
            if job.conn.closed:
                continue
            if job.request_id in job.conn.cancelled:
                job.conn.send_threadsafe(dump(Error(request_id=job.request_id, code="cancelled",
                                                    message="cancelled before it started")))
                continue
            try:
                self.execute(job)
            except HookwireError as exc:
                job.conn.send_threadsafe(dump(Error(request_id=job.request_id, code=exc.code,
                                                   message=exc.message,
                                                   details=_jsonable(exc.details))))
            except Exception as exc:  # a bug of ours must not kill the worker
                log.exception("request %s failed", job.request_id)
                job.conn.send_threadsafe(dump(Error(request_id=job.request_id,
                                                    code="internal_error",
                                                    message=f"{type(exc).__name__}: {exc}")))

    def execute(self, job: Job):
        t_start = time.perf_counter()
        graph = job.submit.graph
        entry = self.models.get(graph.model)
        if entry is None:
            raise UnknownModel(f"model {graph.model!r} is not served here; "
                               f"served: {', '.join(self.models)}")
        rid = job.request_id
        send = job.conn.send_threadsafe
        send(dump(Progress(request_id=rid, stage="started")))
        input_ids = job.tensors.get(graph.inputs.get("input_ids", ""))
        if input_ids is None or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ProtocolError("input_ids must be an attached int64 tensor of shape (batch, seq)")
        vocab = entry.hosted.bridge.cfg.d_vocab
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ProtocolError(f"token ids must lie in [0, {vocab})")
        constants = {tid: job.tensors[tid] for tid in graph.constants if tid in job.tensors}
        missing = [tid for tid in graph.constants if tid not in job.tensors]
        if missing:
            raise ProtocolError(f"constants declared but not attached: {missing[:5]}")
        vg = validate_structure(graph, entry.site_table, entry.site_order, self.limits)
        on_modules = _uses_module_sites(graph)
        batch, seq = input_ids.shape
        infer_shapes(vg, batch, seq, constants, self.limits)
        t_validated = time.perf_counter()

        device = entry.hosted.device
        constants = {k: v.to(device) for k, v in constants.items()}
        sent = [0]

        def on_save(name, value, snapshot=True):
            sent[0] += self._send_tensor(job, name, value, snapshot)

        def on_site(k, n):
            if rid in job.conn.cancelled or job.conn.closed:
                raise Cancelled(f"request {rid} was cancelled at site {k} of {n}")
            send(dump(Progress(request_id=rid, stage="site", site=k, of=n)))

        interleaver = Interleaver(vg, constants, on_save, on_site)
        spec = graph.forward
        need_output = spec.return_type is not None
        bridge = entry.hosted.bridge
        tokens = input_ids.to(device)
        mask = _attention_mask(job, graph, input_ids, device) if on_modules else None

        def forward():
            if on_modules:  # HF module sites live in the plain HF forward (logits only)
                return type(entry.hf_model).forward(entry.hf_model, input_ids=tokens,
                                                 attention_mask=mask, use_cache=False).logits
            # The class's forward, not an instance attribute someone may have set on it.
            extra = {"output_attentions": True} if spec.output_attentions else {}
            return type(bridge).forward(bridge, tokens, return_type=spec.return_type or "logits",
                                        loss_per_token=spec.loss_per_token, **extra)

        with torch.no_grad():
            output = interleaver.run(entry.site_modules, forward, need_output)
        if spec.return_type == "logits":
            on_save("__logits__", output, snapshot=False)
        elif spec.return_type == "loss":
            on_save("__loss__", output, snapshot=False)
        elif spec.return_type == "both":
            logits, loss = output
            on_save("__logits__", logits, snapshot=False)
            on_save("__loss__", loss, snapshot=False)
        t_done = time.perf_counter()
        send(dump(Done(request_id=rid, bytes_sent=sent[0], bytes_received=job.received_bytes,
                       timings={"queued_s": t_start - job.enqueued,
                                "validate_s": t_validated - t_start,
                                "execute_s": t_done - t_validated})))

    def _send_tensor(self, job: Job, name: str, value, snapshot: bool = True) -> int:
        if not isinstance(value, torch.Tensor):
            raise ProtocolError(f"save {name!r} is not a tensor")
        # Snapshot values saved mid-forward: the model may still edit them in place.
        value = value.detach().to("cpu", copy=snapshot)
        tid = f"t{abs(hash((job.request_id, name))) % (1 << 40)}"
        header = header_for(tid, value)
        job.conn.send_threadsafe(dump(Result(request_id=job.request_id, name=name,
                                             tensor=header)))
        total = 0
        if value.numel():
            for frame in encode_chunks(job.request_id, tid, value, CHUNK_BYTES):
                total += len(frame)
                job.conn.send_threadsafe(frame)
        return total


def _refused_submit_id(message: str) -> str | None:
    """The request id of a submit that failed validation, so its error names it and its
    frames can be dropped. Only a plain JSON read: nothing of it is trusted further."""
    try:
        raw = json.loads(message)
    except ValueError:
        return None
    if isinstance(raw, dict) and raw.get("type") == "submit":
        rid = raw.get("request_id")
        if isinstance(rid, str) and len(rid) <= 64:
            return rid
    return None


def _jsonable(details: dict) -> dict:
    return {k: v for k, v in details.items() if isinstance(v, (str, int, float, bool))
            or v is None}


def _attention_mask(job: Job, graph, input_ids, device):
    """The optional 0/1 attention mask of a module-site graph (padded rows)."""
    mask = job.tensors.get(graph.inputs.get("attention_mask", ""))
    if mask is None:
        return None
    if mask.shape != input_ids.shape or mask.dtype not in (torch.int64, torch.bool) or \
            bool(((mask != 0) & (mask != 1)).any()):
        raise ProtocolError("attention_mask must be a 0/1 int64 or bool tensor shaped like "
                            "input_ids")
    return mask.to(device, torch.int64)


def _uses_module_sites(graph) -> bool:
    """True for a graph on HF module sites; refuses one that mixes them with TL hook points
    (the two kinds fire in different forwards)."""
    kinds = {is_module_site(site.name) for site in graph.sites}
    if len(kinds) > 1:
        raise GraphValidationError("a graph uses TL hook points or HF module sites ('hf:...'), "
                                   "not both: they fire in different forwards",
                                   rule="site_kinds")
    if kinds != {True} and any(n.op == "site.write" and n.kwargs.get("mode") == "narrow"
                               for n in graph.nodes):
        raise GraphValidationError("narrowing writes run on HF module sites only",
                                   rule="narrow_site")
    if kinds == {True} and graph.forward.return_type not in ("logits", None):
        raise GraphValidationError("graphs on HF module sites return logits or nothing",
                                   rule="return_type")
    return kinds == {True}


def prepare_model(hosted: HostedModel) -> ModelEntry:
    # TL hook points first, then HF module sites (hookwire.module_sites): additive, so TL
    # clients see the sites they always saw, in the same order.
    sites = probe_sites(hosted.bridge)
    try:
        hf_model = plain_hf_model(hosted.bridge)
        module_sites = probe_module_sites(hf_model)
    except Exception:  # a model whose HF tree we cannot mirror still serves its TL sites
        log.exception("no HF module sites for %s", hosted.name)
        hf_model, module_sites = None, []
    sites = sites + module_sites
    info = describe(hosted, sites)
    site_table, site_order = site_lookup(hosted.bridge, sites)
    site_modules = {name: hp for name, hp in hosted.bridge.hook_dict.items()}
    if hf_model is not None:
        site_modules.update(module_table(hf_model))
    return ModelEntry(
        hosted=hosted, sites=sites, site_table=site_table, site_order=site_order,
        info_json=dump(info), site_modules=site_modules, hf_model=hf_model)


class HookwireServer:
    def __init__(self, models: dict[str, HostedModel], host: str = "127.0.0.1",
                 port: int = 8765, api_keys: list[str] | None = None,
                 limits: Limits | None = None):
        self.entries = {name: prepare_model(h) for name, h in models.items()}
        self.host, self.port = host, port
        self.api_keys = [k.encode() for k in api_keys] if api_keys else None
        self.limits = limits or Limits()
        self.worker = ModelWorker(self.entries, self.limits)
        self._server = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- handshake: auth and health before any upgrade -----------------------------------
    def _process_request(self, connection, request):
        if request.path == "/health":
            body = json.dumps({"status": "ok", "version": __version__,
                               "protocol": PROTOCOL_VERSION, "models": list(self.entries),
                               "queue_depth": self.worker.jobs.qsize()}).encode()
            return Response(200, "OK", Headers([("Content-Type", "application/json"),
                                                ("Content-Length", str(len(body)))]), body)
        if self.api_keys is not None:
            auth = request.headers.get("Authorization", "")
            token = auth[7:].encode() if auth.startswith("Bearer ") else b""
            # Constant-time comparison against every key.
            ok = False
            for key in self.api_keys:
                ok |= hmac.compare_digest(token, key)
            if not ok:
                return connection.respond(http.HTTPStatus.UNAUTHORIZED, "missing or wrong API key\n")
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

    async def _handle(self, ws: ServerConnection):
        state = ConnState(ws, asyncio.get_running_loop())
        writer = asyncio.create_task(self._writer(state))
        try:
            async for message in ws:
                try:
                    self._on_message(state, message)
                except HookwireError as exc:
                    rid = state.incoming[0].request_id if state.incoming else None
                    if isinstance(exc, FrameError) and state.incoming is not None:
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
            await writer

    def _on_message(self, state: ConnState, message):
        if isinstance(message, bytes):
            head, payload = decode_frame(message)
            if head["rid"] in state.discarded:
                return  # the rest of a request that was already refused
            if state.incoming is None:
                raise FrameError("binary frame with no submit waiting for tensors")
            submit, asm, size = state.incoming
            if head["rid"] != submit.request_id:
                raise FrameError("binary frame for a different request")
            asm.add(head, payload)
            state.incoming = (submit, asm, size + len(message))
            if asm.complete:
                state.incoming = None
                self._enqueue(state, submit, asm.tensors(), size + len(message))
            return
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
            state.outbox.put_nowait(entry.info_json)
        elif isinstance(msg, Submit):
            if state.incoming is not None:
                raise ProtocolError("a new submit arrived before the previous one's tensors")
            asm = TensorAssembler(msg.tensors, self.limits.max_constant_bytes + (256 << 20))
            if asm.complete:
                self._enqueue(state, msg, asm.tensors(), len(message))
            else:
                state.incoming = (msg, asm, len(message))
        elif isinstance(msg, Cancel):
            state.cancelled.add(msg.request_id)

    def _enqueue(self, state: ConnState, submit: Submit, tensors, size: int):
        position = self.worker.submit(Job(state, submit.request_id, submit, tensors, size))
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
                         max_size=MAX_MESSAGE_BYTES, process_request=self._process_request,
                         ping_interval=None, write_limit=8 << 20, max_queue=64) as server:
            self._server = server
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop_event.wait()
        self.worker.stop()
        self.worker.join(timeout=30)

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"
