"""The model worker: one thread that takes batches from the scheduler and runs them.

Each request is prepared on its own (validated, shapes inferred, constants placed) and a
failure there answers only that request. Requests that can share a forward (logits or
nothing back, no backward pass, no write into a site that is not batch-major) run as one
batched forward (:mod:`hookwire.batching`); others run alone. Every accepted request ends in
exactly one ``done`` or ``error``.

Co-tenancy (SECURITY.md): a batch is bounded as a whole (rows, tokens and output *after*
right-padding, intermediates of all members); if the model itself fails on a batch, the
batch runs again without the members that wrote into the model (each of those alone), so one
member's data fails that member only; the deadline is checked between nodes and during
validation; and a finished request drops its tensors at once (no reference cycles left for
the collector).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
from types import SimpleNamespace
import weakref
from typing import Callable
from dataclasses import dataclass, field

import torch

from hookwire.batching import BatchMember, run_batch, site_batching
from hookwire.errors import (Cancelled, DeadlineExceeded, ExecutionError,
                             GraphValidationError, HookwireError, LimitExceeded,
                             ProtocolError, ServerShuttingDown, UnknownModel,
                             UnsupportedModel)
from hookwire.executor import Interleaver
from hookwire.ir import SITE_WRITE, hook_mode, is_parameter
from hookwire.ir.args import Ref
from hookwire.module_sites import is_module_site
from hookwire.server import replies
from hookwire.server.attention_sites import (attention_weight_sites, eager_attention,
                                             weight_site_modules)
from hookwire.server.cancel_watch import stop_between_blocks
from hookwire.server.device_rates import IdleRefinement, rates_for
from hookwire.server.constants import graph_constants
from hookwire.server.generation import run_generation, validate_generation
from hookwire.server.give_way import GiveWay
from hookwire.server.heap import FullCollections, IdleTrim
from hookwire.server.index_guard import embeddings_guarded
from hookwire.server.local_calls import local_calls_wait
from hookwire.server.memory import NO_RESERVATION
from hookwire.server.narrowing import narrowed_arguments, narrowing_site
from hookwire.server.residents import keep_uploads, materialize_refs, new_result_id
from hookwire.server.scheduler import Scheduler
from hookwire.server.forward_memory import forward_activation_bytes, model_config
from hookwire.server.validation_cache import ValidationCache
from hookwire.server.manifest import HookMode, probe_hook_mode
from hookwire.server.tl_modes import flags_applied, marked_for_graph
from hookwire.validate import Limits, infer_shapes, validate_structure

log = logging.getLogger("hookwire.server")

BATCH_WINDOW_S = 0.005   # how long the first request of a batch waits for batch mates
MAX_BATCH_ROWS = 64
MAX_BATCH_TOKENS = 64 * 512
# A batch member with more of its own work than this runs in a forward of its own, after the
# light members it was batched with (worker._groups).
HEAVY_BYTES = 16 << 20
HEAVY_FLOPS = 10 ** 9
HEAVY_NODES = 5000   # a graph this long takes its own time to run, whatever its op sizes
# A request taken to run in another's place (server/give_way.py) looks light before it is
# validated; once validated, ops estimated to take longer than this in all (hookwire.op_time)
# make it wait until the batch it would have interrupted is over.
IN_PLACE_SECONDS = 0.02
MAX_SIZE_RATIO = 8  # batch mates' token counts differ by at most this factor


@dataclass
class Job:
    """An accepted submit waiting for (or in) the worker: its connection, the protocol
    ``Submit``, its uploaded tensors, its resident references (materialised only when it
    runs), its memory reservation and its batch key. ``finish`` releases all of it."""
    conn: object                     # server.app.ConnState
    request_id: str
    submit: object                   # protocol.Submit
    tensors: dict
    received_bytes: int
    enqueued: float = field(default_factory=time.perf_counter)
    # References to resident values, checked when the submit arrived and materialised only
    # when the request runs (server.residents.check_refs): [(tid, base tensor, ref)].
    refs: list = field(default_factory=list)
    reservation: object = NO_RESERVATION  # the memory it holds (server.memory)
    key: object = "unset"            # batch_key, computed once in the worker thread
    # Whether it shares a forward only at its own length (ModelWorker._never_padded), once.
    never_padded: object = "unset"
    on_finish: Callable[[], None] | None = None  # the front's note that it is over (once)
    # In a model process: whether the front, when it submitted this, saw a connection that
    # could still send a batch mate (server/process_engine.py).
    mates_possible: bool = True
    # The submit's message as it arrived: an engine that hands the job to another process
    # sends it as is, instead of writing the parsed submit out again (server/job_payload.py).
    submit_text: str | bytes | None = None
    # Validated when taken to run in another request's place, and put back in its queue
    # because it proved long (ModelWorker.execute_in_place): it runs from this.
    prepared: object = None

    def finish(self) -> None:
        """The request is over: its memory is released and its tensors dropped."""
        self.reservation.release()
        self.tensors, self.refs = {}, []
        self.answered()

    def answered(self) -> None:
        """Its final answer (``done`` or an error) is on its way: the front counts it as
        over from now on (its client may send the next request before ``finish`` runs)."""
        on_finish, self.on_finish = self.on_finish, None
        if on_finish is not None:
            on_finish()


@dataclass
class Prepared:
    """A validated request, ready to run alone or in a batch. ``t_start`` is its deadline
    clock (moved on by the time it gave way to others); ``t_validated`` when its run began;
    ``began`` and ``validated_at`` the wall times its timings report (never moved)."""
    job: Job
    entry: object
    interleaver: Interleaver
    tokens: torch.Tensor
    t_start: float
    t_validated: float
    began: float = 0.0
    validated_at: float = 0.0
    sent: list = field(default_factory=lambda: [0])
    sent_names: set = field(default_factory=set)  # saves already streamed (not re-sent on retry)
    constants: dict = field(default_factory=dict)  # on the device, to rebuild the interleaver
    value_ranges: dict = field(default_factory=dict)  # site index -> [low, high)
    writes: bool = False               # the graph writes into the model (a suspect on failure)
    mask: torch.Tensor | None = None   # attention mask of a module-site graph
    positions: torch.Tensor | None = None  # its position ids (left-padded rows)
    on_modules: bool = False           # runs on HF module sites (the plain HF forward)
    attention_weights: bool = False    # hooks attention probabilities (server.attention_sites)
    eager: bool = False                # uses sites that fire only with eager attention
    narrow: tuple | None = None        # (site, call) of a narrowing write (server.narrowing)
    generation: list | None = None     # a generate request's validated forwards
    residual: torch.Tensor | None = None  # start_at_layer: the residual entering block k

    def timings(self, t_done: float, **counts: float) -> dict[str, float]:
        """The ``done`` message's timings: waiting in the queue, validating, running (wall
        times, whatever was given way to others meanwhile), and ``counts``."""
        return {"queued_s": self.began - self.job.enqueued,
                "validate_s": self.validated_at - self.began,
                "execute_s": t_done - self.t_validated, **counts}

    def release(self) -> None:
        """The request is over: drop what it holds (no cycle keeps it for the collector)."""
        if self.interleaver is not None:
            self.interleaver.release()
        self.constants, self.tokens, self.mask, self.generation = {}, None, None, None


def batch_key(job: Job, entry=None):
    """Jobs with equal keys may share a forward; None: the job runs alone.

    Alone: generation, backward passes, losses, module-site graphs (pyvene batches its own
    rows), models whose TL hook points are not served. With the model's ``entry``, the layout
    of each site decides too (``hookwire.batching.site_batching``): a write into a site that
    is not batch-major (position ids, rotary tables: one tensor for the whole batch) would
    reach every batch mate, and a site whose layout cannot be split by rows (batch and
    sequence flattened into one dim) cannot be shared at all. A replacing write into one of
    the entry's ``solo_replace_sites`` (server/batch_probe.py) would move every batch mate
    onto another code path. Graphs on sites that fire only with eager attention share a
    forward only with each other; on a model that is not causal, only requests of equal
    length do (they are never right-padded)."""
    graph = job.submit.graph
    spec = graph.forward
    if job.submit.generate is not None:
        return None  # a token loop with its own KV cache runs alone
    if graph.backward is not None or spec.return_type not in ("logits", None) or \
            spec.start_at_layer is not None or graph.inputs.get("attention_mask") or \
            graph.inputs.get("position_ids") or \
            any(is_module_site(site.name) for site in graph.sites):
        return None  # module-site graphs (pyvene) batch their own rows already
    if entry is None:
        return (graph.model, spec.output_attentions, False, hook_mode(spec.tl_flags))
    if entry.tl_refused is not None:
        return None  # no TL forward to share: runs alone, on the plain HF forward
    writes = [n for n in graph.nodes if n.op == SITE_WRITE and n.args]
    written = {n.args[0] for n in writes}
    replaced = {n.args[0] for n in writes if n.kwargs.get("mode", "replace") != "inplace"}
    solo_replace = getattr(entry, "solo_replace_sites", frozenset())
    eager = False
    for i, site in enumerate(graph.sites):
        info = entry.site_table.get((site.name, site.call))
        if info is None or not site_batching(info.shape, writes=i in written):
            return None  # (an unknown site is refused when the request is prepared)
        if i in replaced and (info.name, info.call) in solo_replace:
            return None
        eager |= info.eager
    # TL's hook switches are the model's state during the forward: only equal ones
    # share it. A model that is not causal is never right-padded: only requests of its own
    # length share its forward.
    length = () if getattr(entry, "causal", True) else (_input_shape(job)[1],)
    return (graph.model, spec.output_attentions, eager, hook_mode(spec.tl_flags)) + length


def writes_key_positions(job: Job, entry) -> bool:
    """Whether the job writes a site with two position dims (attention scores and patterns:
    (B, heads, S query, S key)). Right-padded beside a longer batch mate, its view of such a
    site leaves out the padding keys, which causal masking leaves at the mask value (-3.4e38)
    or 0: a write that puts its own keys at or below that value (a head's scores filled
    with ``finfo.min`` or -inf to ablate it) no longer outranks them, and its positions
    attend to the padding -- solo they attend uniformly over its own keys (or are NaN). Such
    a job shares a forward only where it is not padded (``ModelWorker.batch_fits``)."""
    writes = {n.args[0] for n in job.submit.graph.nodes if n.op == SITE_WRITE and n.args}
    for i in writes:
        site = job.submit.graph.sites[i] if isinstance(i, int) and \
            0 <= i < len(job.submit.graph.sites) else None
        info = None if site is None else entry.site_table.get((site.name, site.call))
        if info is None or sum(d == "S" for d in info.shape) >= 2:
            return True
    return False


def _input_shape(job: Job) -> tuple:
    """(batch, seq) of the job's input ids, uploaded or referred to (1, 1 if malformed)."""
    tid = job.submit.graph.inputs.get("input_ids", "")
    t = job.tensors.get(tid)
    shape = tuple(t.shape) if isinstance(t, torch.Tensor) else next(
        (tuple(ref.shape) for ref_tid, _, ref in job.refs if ref_tid == tid), ())
    return (int(shape[0]), int(shape[1])) if len(shape) == 2 else (1, 1)


def _rows(job: Job) -> int:
    return _input_shape(job)[0]


def _tokens(job: Job) -> int:
    b, s = _input_shape(job)
    return b * s


def flush_subnormals() -> bool:
    """Compute with subnormal floats (below ~1.2e-38 in float32 and bfloat16) flushed to zero
    in this thread -- x86's FTZ/DAZ modes -- and in the CPU thread team it creates for
    parallel ops (a new thread inherits its creator's mode). Subnormal arithmetic takes a
    microcode assist on x86 CPUs: a 1024 x 1024 matrix of 1e-40 times a random one took 4.3 s
    here against 25 ms, ~170x what the flops budget prices, in one op the deadline cannot
    interrupt; a tenant sending such products held the worker and a co-tenant's 1 x 8 read
    queued 17 s (bench_fairness ``subnormals``). GPUs compute subnormals at full speed; this
    only changes CPU results, and only values that small (they read as 0). Returns whether
    the CPU supports it (logged once when it does not)."""
    supported = torch.set_flush_denormal(True)
    if not supported:
        log.warning("this CPU cannot flush subnormal floats to zero: a request computing "
                    "with them runs ~100x slower than its flops budget allows")
    return supported


class ModelWorker(threading.Thread):
    """The embedded engine: one daemon thread that owns the hosted models and runs every
    request against them, so the front never runs model code and the model never waits on
    a socket.

    The front calls ``submit(job)`` (the job enters the :class:`Scheduler`'s per-user queue;
    ``QueueFull`` past ``Limits.max_queued_per_user``), ``queue_depth()``, ``describe()``
    (for ``/health``), ``cancel()``, ``hook_mode_info()`` and ``stop()``; ``RayEngine``
    offers the same methods, which is the whole engine seam. ``run`` loops: take a batch of
    compatible jobs (:func:`batch_key`, :meth:`batch_fits`), ``prepare`` each (validate
    against the site tables of its TL hook switches, infer shapes, place constants; a
    failure answers that job only), group the prepared jobs (:meth:`_groups`: light ones
    share a forward, heavy ones run alone after them), then ``run_alone`` or
    ``run_together`` (:mod:`hookwire.batching`). Results go to the job's connection with
    ``send_threadsafe`` as they are produced (:meth:`_send_tensor`: header message plus
    1 MiB chunk frames); every job ends in exactly one ``done`` or ``error``. If the model
    itself fails on a batch, :meth:`_run_again` re-runs its members apart so the failure
    lands on whoever caused it. ``model_lock`` is held while a batch runs or a model is
    probed for a new combination of TL hook switches (:meth:`hook_mode`); ``busy`` tells
    the front's intake to yield while a batch runs.
    """
    def __init__(self, models: dict, limits: Limits, batching: bool = True,
                 window_s: float = BATCH_WINDOW_S):
        super().__init__(name="hookwire-model-worker", daemon=True)
        self.models = models
        self.limits = limits
        self.batching = batching
        self.scheduler = Scheduler(limits.max_queued_per_user, window_s if batching else 0.0,
                                   MAX_BATCH_ROWS, MAX_BATCH_TOKENS)
        self.current: list[Job] = []   # what is running now (for shutdown)
        self.validated = ValidationCache()  # validated graphs, reused by sweeps
        self.busy = threading.Event()  # set while a batch runs (the front's intake yields)
        self.model_lock = threading.RLock()  # held while the models run (or are probed)
        # Set by the front (HookwireServer.mates_possible): whether a request not queued yet
        # could still join the batch being formed; None waits the whole window.
        self.may_join: Callable[[list], bool] | None = None
        # Where a long request lets waiting light ones run (server/give_way.py).
        self.give_way = GiveWay(self, _rows, _tokens)
        # Full collections of Python's cycle collector, where a serving process turned the
        # automatic ones off (server/heap.py).
        self.collections = FullCollections()
        self.trim = IdleTrim()  # freed memory back to the system once idle (server/heap.py)

    def submit(self, job: Job) -> int:
        return self.scheduler.put(job, job.conn.user)

    def queue_depth(self) -> int:
        return self.scheduler.qsize()

    # The engine seam (see server/ray_engine.py for the other engine): what /health shows of
    # the engine, and a cancel hook -- this worker checks ``conn.cancelled``/``closed`` at
    # each site itself, so it has nothing to do.
    def describe(self) -> dict:
        return {"kind": "embedded", "running": len(self.current)}

    def cancel(self, conn, request_id: str | None = None) -> None:
        pass

    def stop(self):
        """Refuse what is still queued (each gets a typed error) and end the thread."""
        for job in self.scheduler.close():
            if job.prepared is not None:
                job.prepared.release()
                job.prepared = None
            job.conn.send_threadsafe(replies.error(job.request_id, ServerShuttingDown(
                "the server is shutting down; the request did not run. Retry when it is "
                "back")))
            job.finish()

    def batch_key(self, job: Job):
        if job.key == "unset":  # once per job, here in the worker thread (O(graph))
            entry = self.models.get(job.submit.graph.model)
            try:
                job.key = None if entry is None else batch_key(job, entry)
            except Exception:  # a bug of ours: the request runs alone (and fails alone)
                log.exception("keying a request for batching failed")
                job.key = None
        return job.key

    @staticmethod
    def _never_padded(job: Job, entry) -> bool:
        """The job shares a forward only at its own length (:func:`writes_key_positions`)."""
        if job.never_padded == "unset":  # once per job (O(graph))
            try:
                job.never_padded = writes_key_positions(job, entry)
            except Exception:  # a bug of ours: it is never padded
                log.exception("checking whether a request may be padded failed")
                job.never_padded = True
        return bool(job.never_padded)

    def batch_fits(self, jobs: list[Job]) -> bool:
        """A batch is bounded as a whole after right-padding: every row carries the longest
        member's positions, so rows x longest sequence must fit the token budget and the
        forward's output (logits, attention weights) ``max_output_bytes``; and its members
        are of like size."""
        entry = self.models.get(jobs[0].submit.graph.model)
        shapes = [_input_shape(job) for job in jobs]
        rows, seq = sum(b for b, _ in shapes), max(s for _, s in shapes)
        if entry is None or rows * seq > MAX_BATCH_TOKENS:
            return False
        # Members of like size only: a small request does not wait for a big one's forward,
        # nor is it padded to a long one's length (at most half a batch is padding).
        sizes = [b * s for b, s in shapes]
        if max(sizes) > MAX_SIZE_RATIO * min(sizes) or rows * seq > 2 * sum(sizes):
            return False
        # A member that writes attention scores (or patterns) is never right-padded: its
        # write cannot reach the padding keys (writes_key_positions).
        if any(s < seq and self._never_padded(job, entry)
               for job, (_, s) in zip(jobs, shapes)):
            return False
        try:
            check_forward_size(entry, jobs[0].submit.graph.forward, rows, seq, self.limits)
        except HookwireError:
            return False
        except Exception:  # a bug of ours: the request runs alone (and fails alone)
            log.exception("sizing a batch failed")
            return False
        return True

    def run(self):
        flush_subnormals()  # (first: the CPU thread team this thread creates inherits it)
        for entry in self.models.values():  # before any request: what one op may take
            rates_for(entry.hosted.device)
        # ...and again when idle: a start on a busy machine must not leave them low
        self.rates_refinement = IdleRefinement(
            [entry.hosted.device for entry in self.models.values()],
            lambda: bool(self.scheduler.qsize()))
        # A hosted object used locally meanwhile waits for the served forwards (and they
        # for it): TL keeps per-call state on the bridge's modules (server/local_calls.py).
        waits = [wait for entry in self.models.values() if entry.hosted.bridge is not None
                 for wait in local_calls_wait(entry.hosted.bridge, self.model_lock)]
        try:
            self._serve()
        finally:
            for wait in waits:
                wait.remove()

    def _serve(self):
        key = self.batch_key if self.batching else (lambda job: None)
        while True:
            if not self.scheduler.qsize():
                self._idle_housekeeping()
            jobs = self.scheduler.next_batch(key, _rows, _tokens, self.batch_fits,
                                             may_join=self.may_join)
            if jobs is None:
                return
            self.current = jobs
            self.busy.set()
            self.give_way.begin()
            try:
                with self.model_lock:
                    self.execute_batch(jobs)
            except Exception:  # a bug of ours must not kill the worker
                log.exception("batch failed")
            finally:
                self.busy.clear()
                self.current = []
                for job in jobs:
                    job.finish()
                self.scheduler.finished({job.conn.user for job in jobs})
                del jobs
            self.collections.busy()
            self.trim.ran_batch()
            if self.trim.overdue():  # never idle long enough: now and then regardless
                self.trim.trimmed()

    def _idle_housekeeping(self) -> None:
        """What the worker does with nothing queued. A failure here (a measurement that
        cannot allocate its inputs while co-tenants hold the memory, a bug) is logged and
        never ends the worker: every request after it would wait forever."""
        try:
            self.collections.idle()  # a full collection, if due (server/heap.py)
            self.rates_refinement.idle()  # the device's rates again, if due
            if self.trim.due() and not self.scheduler.wait_for_work(self.trim.AFTER_IDLE_S):
                self.trim.trimmed()  # idle a while: freed memory back to the system
        except Exception:
            log.exception("idle housekeeping failed; serving on")

    # ---- one batch -----------------------------------------------------------------------
    def execute_in_place(self, jobs: list[Job]) -> None:
        """Run light-looking jobs in another request's place (server/give_way.py). One whose
        validated graph proves long (its ops estimated over ``IN_PLACE_SECONDS``, or heavy by
        :meth:`_heavy`) does not run there: it goes back to the head of its user's queue,
        validated (``Job.prepared``), to be scheduled as any request is; its user's later
        requests stay behind it."""
        back: list[Job] = []

        def defer(p: Prepared) -> bool:
            if p.interleaver.vg.seconds > IN_PLACE_SECONDS or self._heavy(p):
                p.job.prepared = p
                back.append(p.job)
                return True
            return False
        try:
            self._execute(jobs, defer)
        finally:
            for job in self.scheduler.put_back(back, lambda job: job.conn.user):
                self._fail(job, ServerShuttingDown("the server is shutting down; the request "
                                                   "did not run. Retry when it is back"))
                job.prepared.release()
                job.prepared = None

    def execute_batch(self, jobs: list[Job]):
        """Prepare and run one batch. Light-looking requests (server/give_way.py) go first,
        prepared and run before the others are validated, when the batch has both."""
        light = [job for job in jobs if self.give_way.looks_light(job)]
        if light and len(light) < len(jobs):
            rest = [job for job in jobs if not self.give_way.looks_light(job)]
            self._execute(light)
            self._execute(rest)
        else:
            self._execute(jobs)

    def _execute(self, jobs: list[Job], defer=None):
        ready: list[Prepared] = []
        for job in jobs:
            prepared, job.prepared = job.prepared, None  # validated before (execute_in_place)
            if job.conn.closed or job.request_id in job.conn.cancelled:
                if prepared is not None:
                    prepared.release()
                if not job.conn.closed:
                    job.conn.send_threadsafe(replies.error(job.request_id, Cancelled(
                        "cancelled before it started")))
                continue
            if prepared is not None:
                ready.append(prepared)
                continue
            try:
                ready.append(self.prepare(job))
            except Exception as exc:
                self._fail(job, exc)
        if defer is not None:  # prepared, kept for later (execute_in_place)
            ready = [p for p in ready if not defer(p)]
        try:
            for group in self._groups(ready):
                self._run_group(group)
        finally:
            for p in ready:
                p.release()

    def _run_group(self, group: list[Prepared]) -> None:
        # A request's clock (max_request_seconds) counts its own validation and its own run,
        # not the time it waited for batch mates to be validated or for earlier groups of the
        # batch to run: a co-tenant's maximal graph must not use up its deadline.
        now = time.perf_counter()
        for p in group:
            p.t_start += now - p.t_validated
            p.t_validated = now
        if len(group) == 1:
            p = group[0]
            try:
                self.run_alone(p)
            except Exception as exc:
                self._fail(p.job, exc)
        elif group:
            self.run_together(group)

    def _groups(self, ready: list[Prepared]) -> list[list[Prepared]]:
        """Which of a batch's members share a forward, in order. Light members (little work
        and memory of their own: almost every request) go first, together; a heavy member
        (``_heavy``) runs after them, alone, so it slows no light batch mate down. Members
        share a forward only while their intermediates (and held saves) together fit
        ``max_total_value_bytes`` (each alone fits: validation)."""
        light = [p for p in ready if not self._heavy(p) and not self._replaces_overlapping(p)]
        heavy = [[p] for p in ready if self._heavy(p) or self._replaces_overlapping(p)]
        groups, current, held = [], [], 0
        for p in light:
            # (with the copies of its saves it holds until its last in-place write)
            need = p.interleaver.vg.value_bytes + p.interleaver.held_bound
            if current and held + need > self.limits.max_total_value_bytes:
                groups.append(current)
                current, held = [], 0
            current.append(p)
            held += need
        return groups + ([current] if current else []) + heavy

    @staticmethod
    def _replaces_overlapping(p: Prepared) -> bool:
        """Whether the graph replaces a site with a value whose elements share memory, as
        validation traced it (``mean.expand_as(x)``, a mean ablation): it runs alone from
        the start. In a shared forward the batch's copy would lose that layout, so the
        forward stops there (``hookwire.batching.LayoutNotShared``) and its members run
        again without each other -- a wasted forward for every batch such a member joins."""
        vg = p.interleaver.vg
        for dn in vg.nodes:
            if dn.op == SITE_WRITE and dn.mode == "replace" and len(dn.args) > 1 and \
                    isinstance(dn.args[1], Ref):
                meta = vg.shapes.get(dn.args[1].node)
                if isinstance(meta, torch.Tensor) and not meta.is_contiguous() and \
                        torch._debug_has_internal_overlap(meta) == 1:  # 1: MemOverlap.Yes
                    return True
        return False

    @staticmethod
    def _heavy(p: Prepared) -> bool:
        vg = p.interleaver.vg
        constants = sum(t.numel() * t.element_size() for t in p.constants.values())
        return vg.value_bytes + constants > HEAVY_BYTES or vg.flops > HEAVY_FLOPS or \
            len(vg.nodes) > HEAVY_NODES

    def _fail(self, job: Job, exc: BaseException):
        if not isinstance(exc, HookwireError):
            log.exception("request %s failed", job.request_id, exc_info=exc)
        job.answered()
        job.conn.send_threadsafe(replies.error(job.request_id, exc))
        # The traceback's frames hold the request's tensors (and the lists that hold this
        # exception: a cycle); drop them now rather than when the collector runs.
        exc.__traceback__ = None

    def _watch(self, job: Job, clock):
        """Stops a request that was cancelled, lost its client, or ran out of time; called
        before every node, during validation too. ``clock.t_start``: when its clock started
        (moved on by the time waiting light requests ran in its place: ``give_way``)."""
        limit, rid, conn = self.limits.max_request_seconds, job.request_id, job.conn

        def check():
            if rid in conn.cancelled or conn.closed:
                raise Cancelled(f"request {rid} was cancelled")
            clock.t_start += self.give_way()
            if time.perf_counter() - clock.t_start > limit:
                raise DeadlineExceeded(f"request {rid} ran longer than {limit:g} s",
                                       rule="max_request_seconds")
        return check

    def prepare(self, job: Job) -> Prepared:
        t_start = time.perf_counter()
        graph = job.submit.graph
        entry = self.models.get(graph.model)
        if entry is None:
            raise UnknownModel(f"model {graph.model!r} is not served here; "
                               f"served: {', '.join(self.models)}")
        if job.submit.progress:
            job.conn.send_threadsafe(replies.progress(job.request_id, "started"), may_wait=True)
        clock = SimpleNamespace(t_start=t_start)  # moved on while others run in its place
        watch = self._watch(job, clock)
        if job.refs:  # counted when the submit arrived; copied only now that it runs
            # A chunk at a time, giving way in between: a tenant's views of a few resident
            # bytes may each materialise max_constant_bytes (tens of ms of copying).
            with self.give_way.allowed(job.conn.user):
                job.tensors = {**job.tensors, **materialize_refs(job.refs, between=watch)}
            job.refs = []
        if job.submit.keep:
            with self.give_way.allowed(job.conn.user):  # (copies: see materialize_refs)
                keep_uploads(job.conn.store, job.submit.keep, job.tensors, between=watch)
        input_ids = job.tensors.get(graph.inputs.get("input_ids", ""))
        if input_ids is None or input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ProtocolError("input_ids must be an attached int64 tensor of shape (batch, seq)")
        vocab = entry.hosted.vocab_size
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ProtocolError(f"token ids must lie in [0, {vocab})")
        check_forward_size(entry, graph.forward, *input_ids.shape, self.limits)
        constants = graph_constants(job, graph, entry, self.limits)
        tables = self.tables_for(graph.model, graph.forward)
        batch, seq = input_ids.shape
        outputs = output_shapes(entry, graph.forward, batch, seq)
        # A graph this worker validated before (same structure, constants of the same
        # shapes, same input size): validation would build the very same result.
        key = self.validated.key(graph, constants, batch, seq, outputs)
        vg = self.validated.get(key, tables)
        validated = vg is not None
        if not validated:
            with self.give_way.allowed(job.conn.user):  # the model is not in use here
                vg = validate_structure(graph, *tables, self.limits, on_node=watch)
        on_modules = _uses_module_sites(graph)
        if graph.forward.hf_forward and not on_modules:
            if graph.sites or entry.hf_model is None:
                raise GraphValidationError("hf_forward: the plain HF forward runs HF module "
                                           "sites only" if graph.sites else
                                           f"model {entry.hosted.name!r} has no HF forward "
                                           "here", rule="site_kinds")
            on_modules = True
        if not on_modules and entry.tl_refused is not None:
            if graph.sites:
                raise UnsupportedModel(f"model {entry.hosted.name!r}: TransformerLens hook "
                                       f"points are not served: {entry.tl_refused}")
            on_modules = entry.hf_model is not None  # no hooks: the plain forward will do
        residual = start_residual(entry, graph, job.tensors, input_ids) \
            if graph.forward.start_at_layer is not None else None
        if not validated:
            with self.give_way.allowed(job.conn.user):
                infer_shapes(vg, batch, seq, constants, self.limits, outputs=outputs,
                             on_node=watch, rates=rates_for(entry.hosted.device))
            self.validated.put(key, vg, tables)
        if job.submit.generate is None:
            check_results_can_be_sent(job, vg, graph.forward, outputs)
        began = t_start
        t_start = clock.t_start
        device = entry.hosted.device
        constants = {k: v if is_parameter(k) else v.to(device) for k, v in constants.items()}
        validated_at = time.perf_counter()
        p = Prepared(job, entry, None, input_ids.to(device), t_start, validated_at,
                     began=began, validated_at=validated_at,
                     mask=_attention_mask(job, graph, input_ids, device),
                     positions=_position_ids(job, graph, input_ids, entry, device),
                     on_modules=on_modules, eager=any(info.eager for info in vg.site_infos),
                     constants=constants,
                     residual=residual.to(device) if residual is not None else None)
        ranges = getattr(entry, "value_ranges", {})
        p.value_ranges = {i: ranges[info.name] for i, info in enumerate(vg.site_infos)
                          if info.name in ranges}
        p.writes = any(dn.op == SITE_WRITE for dn in vg.nodes)
        if on_modules:
            weight_modules = weight_site_modules(entry.hf_model)
            p.attention_weights = any(id(entry.site_modules.get(info.name)) in weight_modules
                                      for info in vg.site_infos)
            p.narrow = narrowing_site(vg)
        p.interleaver = self._interleaver(p, vg)
        if job.submit.generate is not None:
            p.generation = validate_generation(job, entry, self.limits, input_ids)
        return p

    def _interleaver(self, p: Prepared, vg) -> Interleaver:
        return Interleaver(vg, p.constants, self._saver(p), self._site_watch(p),
                           self._watch(p.job, p), p.value_ranges,
                           weights=getattr(p.entry, "weight_storages", frozenset()),
                           hold_bytes=self._hold_bytes(p.job))

    # ---- TL hook switches: sites probed per combination, on first use ---------------------
    def hook_mode(self, model: str, tl_flags) -> HookMode:
        entry = self.models.get(model)
        if entry is None:
            raise UnknownModel(f"model {model!r} is not served here; served: "
                               f"{', '.join(self.models)}")
        key = hook_mode(tl_flags)
        with self.model_lock:  # probing runs the model: never beside a request
            mode = entry.modes.get(key)
            if mode is None:
                mode = entry.modes[key] = probe_hook_mode(entry, tl_flags)
        return mode

    def hook_mode_info(self, model: str, tl_flags) -> str:
        """The ``model_info`` answer for ``model`` with TL's hook switches ``tl_flags`` on."""
        return self.hook_mode(model, tl_flags).info_json

    def tables_for(self, model: str, spec) -> tuple[dict, dict]:
        """The site tables a graph is validated against: those of the TL hook switches it
        runs with (they change which sites fire, and their order)."""
        if not spec.tl_flags:
            entry = self.models[model]
            return entry.site_table, entry.site_order
        mode = self.hook_mode(model, spec.tl_flags)
        return mode.site_table, mode.site_order

    @staticmethod
    def _hold_bytes(job: Job):
        """Saves a graph holds until its last in-place write (hookwire.held_saves) count
        against the user's memory like its queued results: refused before the copy is
        made, given back once they are sent (then counted as results). Like a result sent
        at once, only the user's own share can refuse it: other users' unread results
        (the server-wide budget) must not fail a running request."""
        def hold_bytes(n: int) -> None:
            if n >= 0:
                job.reservation.grow(n, "a saved value held until the graph's last in-place "
                                        "write", server_wide=False)
            else:
                job.reservation.shrink(-n)
        return hold_bytes

    def _saver(self, p: Prepared):
        views = SentViews()  # a value this request already sent goes again as a reference

        def on_save(name, value, snapshot=True, keep=True):
            if name in p.sent_names:  # streamed by an earlier attempt (see _run_again)
                return
            p.sent_names.add(name)
            p.sent[0] += self._send_tensor(p.job, name, value, snapshot, keep, views,
                                           may_wait=True)
        return on_save

    def _site_watch(self, p: Prepared):
        """Called at each site the request reaches: stop it if cancelled, disconnected or
        over its wall time; otherwise report progress."""
        job, limit = p.job, self.limits.max_request_seconds
        rid = job.request_id

        def on_site(k, n):
            job.conn.flush_due()  # what waited to travel (ConnState.send_threadsafe)
            if rid in job.conn.cancelled or job.conn.closed:
                raise Cancelled(f"request {rid} was cancelled at site {k} of {n}")
            if time.perf_counter() - p.t_start > limit:
                raise DeadlineExceeded(f"request {rid} ran longer than {limit:g} s; stopped "
                                       f"at site {k} of {n}", rule="max_request_seconds")
            if job.submit.progress:
                job.conn.send_threadsafe(replies.progress(rid, "site", site=k, of=n),
                                         may_wait=True)
        return on_site

    def _stop_reason(self, members: list[Prepared]):
        """For stop_between_blocks: the error that ends the forward once *every* request in
        it is cancelled, disconnected or over its wall time (between the graph's own sites
        too: a forward with no hooks has none)."""
        limit = self.limits.max_request_seconds

        def reason(p: Prepared):
            job = p.job
            if job.request_id in job.conn.cancelled or job.conn.closed:
                return Cancelled(f"request {job.request_id} was cancelled during the forward")
            if time.perf_counter() - p.t_start > limit:
                return DeadlineExceeded(f"request {job.request_id} ran longer than "
                                        f"{limit:g} s", rule="max_request_seconds")
            return None

        def check():
            given = self.give_way(at_block=True)  # a forward that may give way does it here
            for p in members:
                p.t_start += given
                p.job.conn.flush_due()  # what waited to travel (ConnState.send_threadsafe)
            reasons = [reason(p) for p in members]
            if all(r is not None for r in reasons):
                log.info("stopped a forward between blocks: %s", reasons[0].message)
                return reasons[0]
            return None
        return check

    @staticmethod
    def _forward(entry, spec, tokens, on_modules=False, mask=None, attention_weights=False,
                 positions=None, eager=False, residual=None, narrow=None):
        bridge = entry.hosted.bridge

        def forward():
            if on_modules:  # HF module sites live in the plain HF forward (logits only)
                extra = {} if positions is None else {"position_ids": positions}
                # Narrowing entered here, after the graph's site hooks: see server.narrowing.
                with attention_weight_sites(entry.hf_model, attention_weights), \
                        embeddings_guarded(entry.hf_model), \
                        narrowed_arguments(entry.hf_model, narrow, tokens.shape[0]):
                    out = type(entry.hf_model).forward(entry.hf_model, input_ids=tokens,
                                                       attention_mask=mask, use_cache=False,
                                                       **extra)
                # A base model's output is its last hidden state (what graphs read as the
                # forward's output).
                return getattr(out, entry.hosted.family.output_field)
            if bridge is None:
                raise GraphValidationError(f"model {entry.hosted.name!r} has no LM head and "
                                           "no TL hook points: use HF module sites",
                                           rule="site_kinds")
            # The class's forward, not an instance attribute someone may have set on it.
            extra = {"output_attentions": True} if spec.output_attentions else {}
            if residual is not None:
                extra["start_at_layer"] = spec.start_at_layer
            if mask is not None:  # padded rows: TL derives the positions from it, as locally
                extra["attention_mask"] = mask
            if positions is not None:
                extra["position_ids"] = positions
            # ids out of range never reach a kernel
            with eager_attention(entry.hosted.original, eager), embeddings_guarded(bridge), \
                    flags_applied(bridge, spec.tl_flags):
                return type(bridge).forward(bridge, tokens if residual is None else residual,
                                            return_type=spec.return_type or "logits",
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
            if p.job.submit.progress:
                p.job.conn.send_threadsafe(replies.progress(rid, "backward"))

        # Autograd only for graphs that differentiate; the weights are never a target of it.
        watched = p.entry.hf_model if p.on_modules else p.entry.hosted.bridge
        points = p.entry.hf_attention_points if p.on_modules else p.entry.attention_points
        done = None
        with il.grad_mode(), marked_for_graph(p.entry.site_modules, il.vg) as marks, \
                stop_between_blocks(watched, self._stop_reason([p]), points), \
                self._may_give_way_in_forward(p, marks):
            output = il.run(p.entry.site_modules,
                            self._forward(p.entry, spec, p.tokens, p.on_modules, p.mask,
                                          p.attention_weights, p.positions, p.eager,
                                          p.residual, p.narrow),
                            spec.return_type is not None)
            outputs = {}
            if spec.return_type in ("logits", "loss"):
                outputs[spec.return_type] = output
            elif spec.return_type == "both":
                outputs["logits"], outputs["loss"] = output
            if il.backward is not None:  # its backward pass goes through the model
                done = self._complete(p, outputs, on_backward, batch_size=1)
        if done is None:
            # The nodes after the forward use no module of the model (its hooks are gone):
            # waiting light requests may run in between (server/give_way.py).
            with il.grad_mode(), self.give_way.allowed(p.job.conn.user):
                done = self._complete(p, outputs, on_backward, batch_size=1)
        # Only now: the model's TL hook marks are gone before the client hears "done".
        p.job.answered()
        p.job.conn.send_threadsafe(done)

    @staticmethod
    def _forward_may_give_way(p: Prepared) -> bool:
        """Nothing of ``p``'s own is in effect on the model during its forward but its hooks
        (owned per forward) and its TL hook marks (suspended while another forward runs
        nested): a forward -- TL's, or the plain HF forward HF module sites run in -- with
        TL's default hook switches, no eager or attention-weight sites, no narrowing, no
        attention weights returned, no backward pass, not started at a block (TL's bridge
        arms the injection of the request's residual on *every* block for the whole forward:
        a forward nested in it would take that residual as its own block's input, and a
        nested start-at-layer forward's teardown would clear it), not a TL forward of a
        family whose HF code keeps per-forward state on its modules
        (``ModelEntry.tl_forward_state``), on a model that is not
        offloaded (accelerate's offload hooks move weights per block). (The plain HF tree is
        a mirror of its own, sharing only the parameters: a TL forward nested in it never
        passes through its modules, and a module-site forward nested in it finds only hooks
        that are owned per forward there.)"""
        spec = p.job.submit.graph.forward
        return not (p.eager or p.attention_weights or p.narrow is not None or
                    spec.tl_flags or spec.output_attentions or
                    spec.start_at_layer is not None or
                    (not p.on_modules and p.entry.tl_forward_state is not None) or
                    p.interleaver.backward is not None or
                    getattr(p.entry.hosted.original, "hf_device_map", None))

    def _may_give_way_in_forward(self, p: Prepared, marks):
        """Let waiting light requests of other users run between two blocks of ``p``'s
        forward and at its sites that are a block's own hook points (server/give_way.py),
        when :meth:`_forward_may_give_way`."""
        if not self._forward_may_give_way(p):
            return contextlib.nullcontext()
        il, infos = p.interleaver, p.interleaver.vg.site_infos
        ok = p.entry.block_sites | p.entry.attention_sites
        return self.give_way.in_forward(
            {p.job.conn.user}, marks.suspended,
            lambda: il.stage is not None and 0 <= il.stage < len(infos) and
            infos[il.stage].name in ok, tokens=p.tokens.numel())

    def _batch_may_give_way(self, ready: list[Prepared], member_marks: list, tokens: int):
        """A batched forward gives way between two of its blocks, as a forward of one request
        does, when each member's could alone (:meth:`_forward_may_give_way`): its site hooks
        are owned per forward, so they stay silent in the forwards run in its place, and
        every member's TL hook marks are taken off meanwhile. Never at a site: one hook per
        site serves every member there. Without this, a tenant splitting its largest forward
        into requests that co-batch made the worker run it whole while others waited."""
        if not all(self._forward_may_give_way(p) for p in ready):
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def suspend_all():
            with contextlib.ExitStack() as stack:
                for m in member_marks:
                    stack.enter_context(m.suspended())
                yield
        return self.give_way.in_forward({p.job.conn.user for p in ready}, suspend_all,
                                        lambda: False, tokens=tokens)

    def run_together(self, ready: list[Prepared]):
        """One forward for several requests: rows stacked, shorter ones right-padded. If the
        model itself fails, the members still running go again without the batch that failed
        (:meth:`_run_again`)."""
        entry, spec = ready[0].entry, ready[0].job.submit.graph.forward
        full_seq = max(p.tokens.shape[1] for p in ready)
        blocks, members, row = [], [], 0
        failed: list = []  # (job, error), answered once the TL hook marks are gone
        alone: list = []  # padded members whose own op failed: they run again by themselves

        def on_error(exc, p, padded: bool):
            # A right-padded member's rows are a view of the padded batch, strided otherwise
            # than its activation solo: an op bound to strides (``x.view(-1)`` merging batch
            # and positions) can fail only here. Solo decides: it runs again alone.
            if padded and isinstance(exc, ExecutionError):
                alone.append(p)
            else:
                failed.append((p.job, exc))
        for p in ready:
            b, s = p.tokens.shape
            blocks.append(torch.nn.functional.pad(p.tokens, (0, full_seq - s), value=0))
            members.append(BatchMember(
                p.interleaver, slice(row, row + b), s,
                need_output=p.job.submit.graph.forward.return_type is not None,
                on_error=functools.partial(on_error, p=p, padded=s < full_seq)))
            row += b
        tokens = torch.cat(blocks)
        finals: list = []
        again: list = []
        try:
            crash = self._run_members(ready, members, entry, spec, tokens, full_seq, finals,
                                      failed)
            if crash is not None:
                again = [p for p, m in zip(ready, members) if m.active]
        finally:
            for job, exc in failed:
                self._fail(job, exc)
            for job, done in finals:
                job.answered()
                job.conn.send_threadsafe(done)
            failed.clear()  # (job, exception) pairs: the exceptions' frames refer to this list
            members.clear()
        for p in alone:
            self._run_unpadded(p)
        if again:
            self._run_again(again, crash)

    def _run_unpadded(self, p: Prepared) -> None:
        """A member whose own op failed while it was right-padded in a shared forward runs
        again alone, at its own length (values it already streamed are not sent twice): its
        answer, or its error, is the one it gets solo."""
        p.interleaver.release()
        p.interleaver = self._interleaver(p, p.interleaver.vg)
        self._run_group([p])

    def _run_again(self, ready: list[Prepared], crash: BaseException) -> None:
        """The model raised on a batch: someone's data made it fail, but which member's the
        model cannot say. Members that wrote nothing into the model cannot have caused it
        (their inputs were checked), so they go again together; each member that wrote goes
        again alone. A member that fails alone gets its own error; nobody else does. Values
        the failed forward already streamed are not sent twice."""
        log.warning("a batched forward of %d requests failed (%s: %s); running them again "
                    "without each other", len(ready), type(crash).__name__, crash)
        for p in ready:
            p.interleaver.release()
            p.interleaver = self._interleaver(p, p.interleaver.vg)
        writers = [p for p in ready if p.writes]
        others = [p for p in ready if not p.writes]
        if not writers:  # nothing to tell apart: each alone
            writers, others = others, []
        for group in ([others] if others else []) + [[p] for p in writers]:
            self._run_group(group)

    def _run_members(self, ready, members, entry, spec, tokens, full_seq, finals, failed):
        """Run the batched forward; returns the exception if the model itself failed (the
        members still active are then to run again), else None."""
        t0 = time.perf_counter()
        with torch.no_grad(), contextlib.ExitStack() as marks:
            member_marks = [marks.enter_context(marked_for_graph(entry.site_modules,
                                                                 p.interleaver.vg))
                            for p in ready]
            marks.enter_context(stop_between_blocks(entry.hosted.bridge,
                                                    self._stop_reason(ready),
                                                    entry.attention_points))
            marks.enter_context(self._batch_may_give_way(ready, member_marks, tokens.numel()))
            try:
                output = run_batch(members, entry.site_modules,
                                   self._forward(entry, spec, tokens, eager=ready[0].eager),
                                   full_seq)
            except Exception as exc:  # the model itself failed
                if sum(m.active for m in members) > 1:
                    exc.__traceback__ = None
                    return exc
                for m in members:
                    if m.active:
                        m.fail(exc if isinstance(exc, HookwireError) else ExecutionError(
                            f"the forward failed: {type(exc).__name__}: {exc}"))
                return None
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
        return None

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
        timings = p.timings(t_done, batch_size=float(batch_size))
        if "backward_s" in p.interleaver.timings:
            timings["backward_s"] = p.interleaver.timings["backward_s"]
        return replies.done(p.job.request_id, p.sent[0], p.job.received_bytes, timings)

    def _send_tensor(self, job: Job, name: str, value, snapshot: bool = True,
                     keep: bool = True, views: "SentViews | None" = None,
                     may_wait: bool = False) -> int:
        """Send ``value`` as the result ``name`` (header, then frames); returns the bytes.
        ``may_wait``: its messages may wait for what comes next (``ConnState.send_threadsafe``:
        a forward's values and progress, not a generated token)."""
        if not isinstance(value, torch.Tensor):
            raise ProtocolError(f"save {name!r} is not a tensor")
        earlier = views.match(value) if views is not None else None
        if earlier is not None:
            # The very tensor (same storage, view and version) went out already under
            # ``earlier``: the client makes this one a view of it, as the two alias locally.
            job.conn.send_threadsafe(replies.alias_result(
                job.request_id, name, replies.tensor_id(job.request_id, name), value, earlier),
                may_wait=may_wait)
            return 0
        memory = getattr(job.conn, "memory", None)
        nbytes = value.numel() * value.element_size()
        if memory is not None and memory.pending_of(job.conn.user) + nbytes > memory.per_user:
            # Its results pile up unread (or its uploads are still held): the request fails
            # here, so one user's unread results never exceed its own share and never use up
            # the server-wide budget its co-tenants' requests are admitted against.
            raise LimitExceeded(
                f"result {name!r} ({nbytes} bytes) would make this user hold "
                f"{memory.pending_of(job.conn.user) + nbytes} bytes of requests and unread "
                f"results (limit {memory.per_user}): read the results of earlier requests",
                rule="max_pending_bytes_per_user")
        if views is not None:
            views.add(value, name)
        # Snapshot values saved mid-forward: the model may still edit them in place. A batch
        # member's value is a view of its rows: a value kept resident gets a copy of its
        # own (not a view holding the whole batch's tensor), as does a view that is not
        # contiguous. A contiguous view sent and dropped (a member's logits) is framed as
        # it is, before this returns.
        keeps = keep and job.submit.keep_results
        own = snapshot or (value._base is not None and (keeps or not value.is_contiguous()))
        kept = value.detach().clone() if own else value.detach()
        value = kept.to("cpu")
        tid = replies.tensor_id(job.request_id, name)
        header = replies.tensor_header(tid, value)  # a dtype the wire cannot carry fails here
        resident = None
        if keeps:
            resident = new_result_id()
            if not job.conn.store.put(resident, kept, cpu_copy=value):
                resident = None  # larger than the user's whole quota
        job.conn.send_threadsafe(replies.result_header(job.request_id, name, header, resident),
                                 may_wait=may_wait)
        total = 0
        for frame in replies.value_frames(job.request_id, tid, value):
            total += len(frame)
            job.conn.send_threadsafe(frame, may_wait=may_wait)
        return total


class SentViews:
    """The tensors one request has sent, by storage and view geometry, so a later save of
    the same unchanged tensor (TL's ``blocks.0.hook_out`` is ``blocks.1.hook_in``) is sent as
    a reference. Weak references: once a tensor object is gone its entry no longer matches
    (its storage may be reused), so a match is always the same live tensor."""

    def __init__(self):
        self.by_key: dict[tuple, tuple] = {}

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                tuple(t.stride()), t.dtype)

    def add(self, t: torch.Tensor, name: str) -> None:
        if t.numel() and not t.is_sparse:
            self.by_key[self._key(t)] = (weakref.ref(t), t._version, name)

    def match(self, t: torch.Tensor) -> str | None:
        if not t.numel() or t.is_sparse:
            return None
        entry = self.by_key.get(self._key(t))
        if entry is None or entry[0]() is None or entry[1] != t._version:
            return None
        return entry[2]


def start_residual(entry, graph, tensors: dict, input_ids) -> torch.Tensor:
    """The residual a ``start_at_layer`` forward starts from: attached, shaped
    [batch, seq, d_model] like ``input_ids`` says, in the model's dtype; the forward returns
    logits or nothing (TL computes no loss without the tokens)."""
    spec, cfg = graph.forward, entry.hosted.bridge.cfg
    n_layers = cfg.n_layers
    if not -n_layers <= spec.start_at_layer < n_layers:
        raise GraphValidationError(f"start_at_layer={spec.start_at_layer}: the model has "
                                   f"{n_layers} blocks", rule="start_at_layer")
    if spec.return_type not in ("logits", None):
        raise GraphValidationError("a forward that starts at a block returns logits or "
                                   "nothing: the loss needs the tokens", rule="return_type")
    k = spec.start_at_layer % n_layers
    for site in graph.sites:
        if site.name in ("hook_embed", "hook_tokens") or site.name.startswith("embed."):
            raise GraphValidationError(f"site {site.name!r} does not fire in a forward that "
                                       f"starts at block {k}", rule="start_at_layer")
    residual = tensors.get(graph.inputs.get("residual", ""))
    batch, seq = input_ids.shape
    entering = entry.site_table.get((f"blocks.{k}.hook_in", 0))
    dtype = entering.dtype if entering is not None else entry.sites[-1].dtype
    if residual is None or tuple(residual.shape) != (batch, seq, cfg.d_model) or \
            residual.dtype != dtype:
        raise ProtocolError(f"start_at_layer needs an attached residual of shape "
                            f"({batch}, {seq}, {cfg.d_model}) and dtype {dtype}")
    return residual


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


def _position_ids(job: Job, graph, input_ids, entry, device):
    """The optional position ids of a graph (left-padded rows count their positions from
    their first token; TL and the HF forward take them as given): int64, shaped like
    input_ids, each in [0, the model's positions)."""
    ids = job.tensors.get(graph.inputs.get("position_ids", ""))
    if ids is None:
        return None
    n_positions = model_positions(entry) or (1 << 30)
    if ids.shape != input_ids.shape or ids.dtype != torch.int64 or (ids.numel() and (
            int(ids.min()) < 0 or int(ids.max()) >= n_positions)):
        raise ProtocolError(f"position_ids must be an int64 tensor shaped like input_ids with "
                            f"values in [0, {n_positions})")
    return ids.to(device)


def _uses_module_sites(graph) -> bool:
    """True for a graph on HF module sites; refuses one that mixes them with TL hook points
    (the two kinds fire in different forwards)."""
    kinds = {is_module_site(site.name) for site in graph.sites}
    if len(kinds) > 1:
        raise GraphValidationError("a graph uses TL hook points or HF module sites ('hf:...'), "
                                   "not both: they fire in different forwards",
                                   rule="site_kinds")
    if kinds != {True} and any(n.op == SITE_WRITE and n.kwargs.get("mode") == "narrow"
                               for n in graph.nodes):
        raise GraphValidationError("narrowing writes run on HF module sites only",
                                   rule="narrow_site")
    if kinds == {True} and graph.forward.return_type not in ("logits", None):
        raise GraphValidationError("graphs on HF module sites return logits or nothing",
                                   rule="return_type")
    return kinds == {True}


def check_results_can_be_sent(job: Job, vg, spec, outputs: dict) -> None:
    """Refuse, before its forward runs, a request none of whose results could be sent:
    its user's requests and unread results already hold so much that even its smallest
    result would pass ``max_pending_bytes_per_user`` (the rule ``_send_tensor`` applies to
    each result). Without this a client that never reads keeps the worker busy with forwards
    whose every answer is refused; a client that reads as results arrive is never refused
    here (its pile is small when its request starts)."""
    memory = getattr(job.conn, "memory", None)
    if memory is None:
        return
    sizes = [_meta_bytes(vg.shapes[nid]) for nid in vg.graph.saves.values()]
    if spec.send_output and spec.return_type in ("logits", "both"):
        shape, dtype = outputs["logits"]
        sizes.append(math.prod(shape) * dtype.itemsize)
    if not sizes:
        return
    held = memory.pending_of(job.conn.user)
    if held + min(sizes) > memory.per_user:
        raise LimitExceeded(
            f"this request's smallest result ({min(sizes)} bytes) would make this user hold "
            f"{held + min(sizes)} bytes of requests and unread results (limit "
            f"{memory.per_user}): read the results of earlier requests; the request did not "
            "run", rule="max_pending_bytes_per_user")


def _meta_bytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


def check_forward_size(entry, spec, batch: int, seq: int, limits: Limits) -> None:
    """The model's own forward is bounded before it runs, like the graph's ops: no more
    positions than the model has, no more output (logits, attention weights) than
    ``Limits.max_output_bytes``, and no more activations and output at its peak than
    ``Limits.max_forward_bytes`` (server/forward_memory.py). A batch is checked as a whole
    (``batch_fits``)."""
    n_ctx = model_positions(entry)
    if n_ctx and seq > n_ctx:
        raise GraphValidationError(f"input of {seq} positions; model {entry.hosted.name!r} "
                                   f"has {n_ctx}", rule="input_size")
    shape, dtype = output_shapes(entry, spec, batch, seq)["logits"]
    size = math.prod(shape) * dtype.itemsize
    if spec.output_attentions and entry.hosted.bridge is not None:
        cfg = entry.hosted.bridge.cfg
        size += cfg.n_layers * batch * cfg.n_heads * seq * seq * dtype.itemsize
    if size > limits.max_output_bytes:
        raise LimitExceeded(f"the forward of a {batch}x{seq} input would make {size} bytes of "
                            f"output; limit {limits.max_output_bytes}", rule="max_output_bytes")
    held = size + forward_activation_bytes(model_config(entry.hosted), batch, seq,
                                           dtype.itemsize)
    if held > limits.max_forward_bytes:
        raise LimitExceeded(f"the forward of a {batch}x{seq} input would hold about {held} "
                            "bytes of activations and output at its peak (estimated from the "
                            f"model's shapes: server/forward_memory.py); limit "
                            f"{limits.max_forward_bytes}: send fewer rows or positions at a "
                            "time", rule="max_forward_bytes")


def model_positions(entry) -> int | None:
    """How many positions the model has (None: no fixed limit it declares)."""
    if entry.hosted.bridge is not None:
        return getattr(entry.hosted.bridge.cfg, "n_ctx", None)
    cfg = entry.hosted.original.config
    return getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)


def output_shapes(entry, spec, batch: int, seq: int) -> dict:
    """(shape, dtype) of what the forward returns, for graphs that read it: logits, or a base
    model's last hidden state (read as "logits")."""
    dtype = entry.output_dtype
    loss_shape = (batch, seq - 1) if spec.loss_per_token else ()
    return {"logits": ((batch, seq, entry.output_dim), dtype),
            "loss": (loss_shape, dtype)}


__all__ = ["ModelWorker", "Job", "batch_key", "output_shapes", "writes_key_positions"]
