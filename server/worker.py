"""The model worker: one thread that takes batches from the scheduler and runs them.

Each request is prepared on its own (validated, shapes inferred, constants placed) and a
failure there answers only that request. Requests that can share a forward (logits or
nothing back, no backward pass) run as one batched forward (:mod:`hookwire.batching`);
others run alone. Every accepted request ends in exactly one ``done`` or ``error``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import torch

from hookwire.batching import BatchMember, run_batch
from hookwire.errors import (Cancelled, DeadlineExceeded, ExecutionError,
                             GraphValidationError, HookwireError, LimitExceeded,
                             ProtocolError,
                             ServerShuttingDown, UnknownModel)
from hookwire.executor import Interleaver
from hookwire.frames import CHUNK_BYTES, encode_chunks, header_for
from hookwire.module_sites import is_module_site
from hookwire.protocol import Done, Error, Progress, Result, dump
from hookwire.server.attention_sites import attention_weight_sites, weight_site_modules
from hookwire.server.generation import run_generation, validate_generation
from hookwire.server.narrowing import narrowed_arguments, narrowing_site
from hookwire.server.residents import keep_uploads, new_result_id
from hookwire.server.scheduler import Scheduler
from hookwire.server.tl_modes import marked_for_graph
from hookwire.validate import Limits, infer_shapes, validate_structure

log = logging.getLogger("hookwire.server")

BATCH_WINDOW_S = 0.005   # how long the first request of a batch waits for batch mates
MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 64 * 512


@dataclass
class Job:
    conn: object                     # server.app.ConnState
    request_id: str
    submit: object                   # protocol.Submit
    tensors: dict
    received_bytes: int
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class Prepared:
    """A validated request, ready to run alone or in a batch."""
    job: Job
    entry: object
    interleaver: Interleaver
    tokens: torch.Tensor
    t_start: float
    t_validated: float
    sent: list = field(default_factory=lambda: [0])
    mask: torch.Tensor | None = None   # attention mask of a module-site graph
    on_modules: bool = False           # runs on HF module sites (the plain HF forward)
    attention_weights: bool = False    # hooks attention probabilities (server.attention_sites)
    narrow: tuple | None = None        # (site, call) of a narrowing write (server.narrowing)
    generation: list | None = None     # a generate request's validated forwards


def error_message(request_id: str, exc: BaseException) -> str:
    if isinstance(exc, HookwireError):
        return dump(Error(request_id=request_id, code=exc.code, message=exc.message,
                          details={k: v for k, v in exc.details.items()
                                   if isinstance(v, (str, int, float, bool)) or v is None}))
    return dump(Error(request_id=request_id, code="internal_error",
                      message=f"{type(exc).__name__}: {exc}"))


def batch_key(job: Job):
    """Jobs with equal keys may share a forward; None: the job runs alone."""
    graph = job.submit.graph
    spec = graph.forward
    if job.submit.generate is not None:
        return None  # a token loop with its own KV cache runs alone
    if graph.backward is not None or spec.return_type not in ("logits", None) or \
            any(is_module_site(site.name) for site in graph.sites):
        return None  # module-site graphs (pyvene) batch their own rows already
    return (graph.model, spec.output_attentions)


def _rows(job: Job) -> int:
    t = job.tensors.get(job.submit.graph.inputs.get("input_ids", ""))
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() == 2 else 1


def _tokens(job: Job) -> int:
    t = job.tensors.get(job.submit.graph.inputs.get("input_ids", ""))
    return int(t.numel()) if isinstance(t, torch.Tensor) else 1


class ModelWorker(threading.Thread):
    def __init__(self, models: dict, limits: Limits, batching: bool = True,
                 window_s: float = BATCH_WINDOW_S):
        super().__init__(name="hookwire-model-worker", daemon=True)
        self.models = models
        self.limits = limits
        self.batching = batching
        self.scheduler = Scheduler(limits.max_queued_per_user, window_s if batching else 0.0,
                                   MAX_BATCH_ROWS, MAX_BATCH_TOKENS)
        self.current: list[Job] = []   # what is running now (for shutdown)

    def submit(self, job: Job) -> int:
        return self.scheduler.put(job, job.conn.user)

    def queue_depth(self) -> int:
        return self.scheduler.qsize()

    # The engine seam (see server/ray_engine.py for the other engine): what /health shows of
    # the engine, and a cancel hook -- this worker checks ``conn.cancelled``/``closed`` at
    # each site itself, so it has nothing to do.
    def describe(self) -> dict:
        return {"kind": "embedded"}

    def cancel(self, conn, request_id: str | None = None) -> None:
        pass

    def stop(self):
        """Refuse what is still queued (each gets a typed error) and end the thread."""
        for job in self.scheduler.close():
            job.conn.send_threadsafe(error_message(job.request_id, ServerShuttingDown(
                "the server is shutting down; the request did not run. Retry when it is "
                "back")))

    def run(self):
        key = batch_key if self.batching else (lambda job: None)
        while True:
            jobs = self.scheduler.next_batch(key, _rows, _tokens)
            if jobs is None:
                return
            self.current = jobs
            try:
                self.execute_batch(jobs)
            except Exception:  # a bug of ours must not kill the worker
                log.exception("batch failed")
            finally:
                self.current = []

    # ---- one batch -----------------------------------------------------------------------
    def execute_batch(self, jobs: list[Job]):
        ready: list[Prepared] = []
        for job in jobs:
            if job.conn.closed:
                continue
            if job.request_id in job.conn.cancelled:
                job.conn.send_threadsafe(error_message(job.request_id, Cancelled(
                    "cancelled before it started")))
                continue
            try:
                ready.append(self.prepare(job))
            except Exception as exc:
                self._fail(job, exc)
        if len(ready) == 1:
            p = ready[0]
            try:
                self.run_alone(p)
            except Exception as exc:
                self._fail(p.job, exc)
        elif ready:
            self.run_together(ready)

    def _fail(self, job: Job, exc: BaseException):
        if not isinstance(exc, HookwireError):
            log.exception("request %s failed", job.request_id, exc_info=exc)
        job.conn.send_threadsafe(error_message(job.request_id, exc))

    def prepare(self, job: Job) -> Prepared:
        t_start = time.perf_counter()
        graph = job.submit.graph
        entry = self.models.get(graph.model)
        if entry is None:
            raise UnknownModel(f"model {graph.model!r} is not served here; "
                               f"served: {', '.join(self.models)}")
        job.conn.send_threadsafe(dump(Progress(request_id=job.request_id, stage="started")))
        keep_uploads(job.conn.store, job.submit.keep, job.tensors)
        input_ids = job.tensors.get(graph.inputs.get("input_ids", ""))
        if input_ids is None or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ProtocolError("input_ids must be an attached int64 tensor of shape (batch, seq)")
        vocab = entry.hosted.bridge.cfg.d_vocab
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ProtocolError(f"token ids must lie in [0, {vocab})")
        check_forward_size(entry, graph.forward, *input_ids.shape, self.limits)
        constants = {tid: job.tensors[tid] for tid in graph.constants if tid in job.tensors}
        missing = [tid for tid in graph.constants if tid not in job.tensors]
        if missing:
            raise ProtocolError(f"constants declared but not attached: {missing[:5]}")
        vg = validate_structure(graph, entry.site_table, entry.site_order, self.limits)
        on_modules = _uses_module_sites(graph)
        batch, seq = input_ids.shape
        infer_shapes(vg, batch, seq, constants, self.limits,
                     outputs=output_shapes(entry, graph.forward, batch, seq))
        device = entry.hosted.device
        constants = {k: v.to(device) for k, v in constants.items()}
        p = Prepared(job, entry, None, input_ids.to(device), t_start, time.perf_counter(),
                     mask=_attention_mask(job, graph, input_ids, device) if on_modules else None,
                     on_modules=on_modules)
        if on_modules:
            weight_modules = weight_site_modules(entry.hf_model)
            p.attention_weights = any(id(entry.site_modules.get(info.name)) in weight_modules
                                      for info in vg.site_infos)
            p.narrow = narrowing_site(vg)
        p.interleaver = Interleaver(vg, constants, self._saver(p), self._site_watch(p))
        if job.submit.generate is not None:
            p.generation = validate_generation(job, entry, self.limits, input_ids)
        return p

    def _saver(self, p: Prepared):
        def on_save(name, value, snapshot=True, keep=True):
            p.sent[0] += self._send_tensor(p.job, name, value, snapshot, keep)
        return on_save

    def _site_watch(self, p: Prepared):
        """Called at each site the request reaches: stop it if cancelled, disconnected or
        over its wall time; otherwise report progress."""
        job, limit = p.job, self.limits.max_request_seconds
        rid = job.request_id

        def on_site(k, n):
            if rid in job.conn.cancelled or job.conn.closed:
                raise Cancelled(f"request {rid} was cancelled at site {k} of {n}")
            if time.perf_counter() - p.t_start > limit:
                raise DeadlineExceeded(f"request {rid} ran longer than {limit:g} s; stopped "
                                       f"at site {k} of {n}", rule="max_request_seconds")
            job.conn.send_threadsafe(dump(Progress(request_id=rid, stage="site", site=k, of=n)))
        return on_site

    @staticmethod
    def _forward(entry, spec, tokens, on_modules=False, mask=None, attention_weights=False,
                 narrow=None):
        bridge = entry.hosted.bridge

        def forward():
            if on_modules:  # HF module sites live in the plain HF forward (logits only)
                # Entered here, after the graph's site hooks: see server.narrowing.
                with attention_weight_sites(entry.hf_model, attention_weights), \
                        narrowed_arguments(entry.hf_model, narrow, tokens.shape[0]):
                    return type(entry.hf_model).forward(entry.hf_model, input_ids=tokens,
                                                        attention_mask=mask,
                                                        use_cache=False).logits
            # The class's forward, not an instance attribute someone may have set on it.
            extra = {"output_attentions": True} if spec.output_attentions else {}
            return type(bridge).forward(bridge, tokens, return_type=spec.return_type or "logits",
                                        loss_per_token=spec.loss_per_token, **extra)
        return forward

    def run_alone(self, p: Prepared):
        if p.generation is not None:
            run_generation(self, p, p.generation)
            return
        spec = p.job.submit.graph.forward
        il = p.interleaver
        rid = p.job.request_id

        def on_backward():
            p.job.conn.send_threadsafe(dump(Progress(request_id=rid, stage="backward")))

        # Autograd only for graphs that differentiate; the weights are never a target of it.
        with il.grad_mode(), marked_for_graph(p.entry.site_modules, il.vg):
            output = il.run(p.entry.site_modules,
                            self._forward(p.entry, spec, p.tokens, p.on_modules, p.mask,
                                          p.attention_weights, p.narrow),
                            spec.return_type is not None)
            outputs = {}
            if spec.return_type in ("logits", "loss"):
                outputs[spec.return_type] = output
            elif spec.return_type == "both":
                outputs["logits"], outputs["loss"] = output
            done = self._complete(p, outputs, on_backward, batch_size=1)
        # Only now: the model's TL hook marks are gone before the client hears "done".
        p.job.conn.send_threadsafe(done)

    def run_together(self, ready: list[Prepared]):
        """One forward for several requests: rows stacked, shorter ones right-padded."""
        entry, spec = ready[0].entry, ready[0].job.submit.graph.forward
        full_seq = max(p.tokens.shape[1] for p in ready)
        blocks, members, row = [], [], 0
        failed: list = []  # (job, error), answered once the TL hook marks are gone
        for p in ready:
            b, s = p.tokens.shape
            blocks.append(torch.nn.functional.pad(p.tokens, (0, full_seq - s), value=0))
            members.append(BatchMember(
                p.interleaver, slice(row, row + b), s,
                need_output=p.job.submit.graph.forward.return_type is not None,
                on_error=lambda exc, p=p: failed.append((p.job, exc))))
            row += b
        tokens = torch.cat(blocks)
        finals: list = []
        try:
            self._run_members(ready, members, entry, spec, tokens, full_seq, finals, failed)
        finally:
            for job, exc in failed:
                self._fail(job, exc)
            for job, done in finals:
                job.conn.send_threadsafe(done)

    def _run_members(self, ready, members, entry, spec, tokens, full_seq, finals, failed):
        t0 = time.perf_counter()
        with torch.no_grad(), contextlib.ExitStack() as marks:
            for p in ready:
                marks.enter_context(marked_for_graph(entry.site_modules, p.interleaver.vg))
            try:
                output = run_batch(members, entry.site_modules,
                                   self._forward(entry, spec, tokens), full_seq)
            except Exception as exc:  # the model itself failed: everyone still running
                for m in members:
                    if m.active:
                        m.fail(exc if isinstance(exc, HookwireError) else ExecutionError(
                            f"the batched forward failed: {type(exc).__name__}: {exc}"))
                return
            forward_s = time.perf_counter() - t0
            for p, m in zip(ready, members):
                if not m.active:
                    continue
                try:
                    if not p.interleaver.finished_sites:
                        raise ExecutionError(f"the forward pass reached "
                                             f"{p.interleaver.sites_done} of "
                                             f"{len(p.interleaver.vg.site_infos)} sites")
                    p.interleaver.timings["execute_s"] = forward_s
                    outputs = {}
                    if m.need_output:
                        outputs["logits"] = output[m.rows, :m.seq]
                    finals.append((p.job, self._complete(p, outputs, None,
                                                         batch_size=len(ready))))
                except Exception as exc:
                    failed.append((p.job, exc))

    def _complete(self, p: Prepared, outputs: dict, on_backward, batch_size: int) -> str:
        """Send the outputs, run output/gradient stages; returns the ``done`` message."""
        spec = p.job.submit.graph.forward
        if spec.send_output:
            for kind, value in outputs.items():
                # Outputs are not kept resident: logits are the largest thing a request
                # makes and almost never come back as a hook's input, so keeping them
                # would only push the values that do (caches) out of the user's quota.
                self._saver(p)(f"__{kind}__", value, snapshot=False, keep=False)
        p.interleaver.finish(outputs, on_backward)
        t_done = time.perf_counter()
        timings = {"queued_s": p.t_start - p.job.enqueued,
                   "validate_s": p.t_validated - p.t_start,
                   "execute_s": t_done - p.t_validated, "batch_size": float(batch_size)}
        if "backward_s" in p.interleaver.timings:
            timings["backward_s"] = p.interleaver.timings["backward_s"]
        return dump(Done(request_id=p.job.request_id, bytes_sent=p.sent[0],
                         bytes_received=p.job.received_bytes, timings=timings))

    def _send_tensor(self, job: Job, name: str, value, snapshot: bool = True,
                     keep: bool = True) -> int:
        if not isinstance(value, torch.Tensor):
            raise ProtocolError(f"save {name!r} is not a tensor")
        # Snapshot values saved mid-forward: the model may still edit them in place. (A
        # batch member's value is a view of its rows; the copy is its own, contiguous.)
        kept = value.detach().clone() if snapshot or value._base is not None else \
            value.detach()
        value = kept.to("cpu")
        tid = f"t{abs(hash((job.request_id, name))) % (1 << 40)}"
        header = header_for(tid, value)
        resident = None
        if keep and job.submit.keep_results:
            resident = new_result_id()
            if not job.conn.store.put(resident, kept):
                resident = None  # larger than the user's whole quota
        job.conn.send_threadsafe(dump(Result(request_id=job.request_id, name=name,
                                             tensor=header, resident=resident)))
        total = 0
        if value.numel():
            for frame in encode_chunks(job.request_id, tid, value, CHUNK_BYTES):
                total += len(frame)
                job.conn.send_threadsafe(frame)
        return total


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


def check_forward_size(entry, spec, batch: int, seq: int, limits: Limits) -> None:
    """The model's own forward is bounded before it runs, like the graph's ops: no more
    positions than the model has, and no more output (logits, attention weights) than
    ``Limits.max_output_bytes``."""
    cfg = entry.hosted.bridge.cfg
    n_ctx = getattr(cfg, "n_ctx", None)
    if n_ctx and seq > n_ctx:
        raise GraphValidationError(f"input of {seq} positions; model {entry.hosted.name!r} "
                                   f"has {n_ctx}", rule="input_size")
    shape, dtype = output_shapes(entry, spec, batch, seq)["logits"]
    size = math.prod(shape) * dtype.itemsize
    if spec.output_attentions:
        size += cfg.n_layers * batch * cfg.n_heads * seq * seq * dtype.itemsize
    if size > limits.max_output_bytes:
        raise LimitExceeded(f"the forward of a {batch}x{seq} input would make {size} bytes of "
                            f"output; limit {limits.max_output_bytes}", rule="max_output_bytes")


def output_shapes(entry, spec, batch: int, seq: int) -> dict:
    """(shape, dtype) of what the forward returns, for graphs that read it."""
    dtype = entry.sites[-1].dtype if entry.sites else torch.float32
    loss_shape = (batch, seq - 1) if spec.loss_per_token else ()
    return {"logits": ((batch, seq, entry.hosted.bridge.cfg.d_vocab), dtype),
            "loss": (loss_shape, dtype)}


__all__ = ["ModelWorker", "Job", "batch_key", "output_shapes"]
