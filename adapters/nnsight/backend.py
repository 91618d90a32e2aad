"""The nnsight backend that runs a captured trace on a hookwire server.

nnsight hands a ``with model.trace(...)`` / ``with model.generate(...)`` block to a *backend*
when the block exits (``backend=`` of ``trace``; ``remote=`` picks one). This one runs the
block exactly as nnsight runs it locally -- nnsight's own tracer compiles the block, builds its
workers (one per ``tracer.invoke``), tokenizes and batches the inputs, serves values, checks
the order of requests, pushes saved values into the caller's frame -- with one difference: the
model's forward is replaced (``tracer.fn``) by handoffs of proxies in the server's firing
order (:mod:`hookwire.nnsight.forward`, :mod:`hookwire.nnsight.generate`). The block's code
thereby becomes an intervention graph (data); it is validated on the server and run in the
served model's forward; the values the block saved come back and replace the proxies where
the block left them (the caller's variables, lists, dicts).

Code that cannot become graph nodes (Python control flow on tensor values, ``.item()``,
printing values, file or network I/O, ops outside the registry) raises
:class:`hookwire.errors.TraceError` naming its line, before anything is sent.
"""
from __future__ import annotations

import threading
import types

import torch
from nnsight.intervention.cache import CacheView
from nnsight.intervention.envoy import Envoy
from nnsight.intervention.tracer import InterleavingTracer
from nnsight.tracing.backend import Backend
from nnsight.tracing.tracer import save
from nnsight.tracing.util import push

from hookwire.client import get_connection
from hookwire.errors import HookwireError
from hookwire.module_sites import ServerObject
from hookwire.nnsight.generate import GenerationJob
from hookwire.nnsight.target import target_of
from hookwire.nnsight.trace_job import ForwardJob
from hookwire.nnsight.values import NotSent
from hookwire.rebind import rebind, rebuilt
from hookwire.remote_call import RemoteCall
from hookwire.runs import RemoteRun, SavedValue
from hookwire.trace import trace_error


class RemoteBackend(Backend):
    """Runs nnsight traces on a hookwire server (``backend=`` of any nnsight model's
    ``trace``/``generate``; what ``remote=`` of :mod:`hookwire.nnsight`'s models builds).

    ``model``: the served model's name (default: the one the server serves with this model's
    architecture and config). ``url``/``api_key``: default ``hookwire.configure`` /
    HOOKWIRE_URL. ``blocking=False``: the block is traced now (errors raise at the ``with``),
    the request runs in the background: ``backend()`` is None until it is done, then the saved
    values by name (nnsight's polling spelling); ``backend.result()`` waits for them;
    ``backend.run`` is the :class:`hookwire.runs.RemoteRun` (``events()``, ``cancel()``).
    ``progress``: a tqdm bar (None: when stderr is a terminal)."""

    def __init__(self, model: str | None = None, *, url: str | None = None,
                 api_key: str | None = None, blocking: bool = True,
                 progress: bool | None = None):
        self.model = model
        self.url, self.api_key = url, api_key
        self.blocking, self.progress = blocking, progress
        self.run: RemoteRun | None = None
        self._delivery = None

    # ---- called by nnsight when the `with` block exits ------------------------------------
    def __call__(self, tracer=None):
        if tracer is None:   # nnsight's non-blocking poll
            if self.run is None:
                raise HookwireError("this backend has not run a trace yet")
            return self.result() if self.run.done() else None
        if not isinstance(tracer, InterleavingTracer):
            raise HookwireError("a hookwire backend runs model.trace(...) and "
                                "model.generate(...) blocks; inside a session, pass remote= "
                                "to each trace")
        envoy = tracer.envoy
        conn = get_connection(self.url, self.api_key)
        target = target_of(envoy, conn, self.model)
        generating = getattr(tracer.fn, "__name__", None) == "generate"
        job = (GenerationJob if generating else ForwardJob)(envoy, target)
        job.trace(tracer)   # the block runs here: every TraceError is raised now
        delivery = _Delivery(job, tracer.info.frame, tracer.info.code)
        job = None
        if self.blocking:
            delivery.run(self, None)
            delivery.push_frame()
            return None
        self._delivery = delivery
        self.run = RemoteRun(lambda run: delivery.run(self, run)).start()
        return None

    # ---- non-blocking ---------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> dict:
        """Wait for a non-blocking run; the block's saved values by name (also put where the
        block left them: containers at once, the caller's variables when called from the
        thread that ran the trace)."""
        if self.run is None:
            raise HookwireError("this backend has not run a trace yet")
        self.run.result(timeout)
        return self._delivery.push_frame()

    def events(self):
        return self.run.events()

    def cancel(self) -> None:
        self.run.cancel()


# Not searched for the block's values (large; user code keeps no traced value in them).
_MODELS = (torch.nn.Module, Envoy, InterleavingTracer)


def _code_names(code) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:   # comprehensions, lambdas, nested functions
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _server_object_in(value, depth: int = 3):
    """A :class:`ServerObject` or :class:`NotSent` in ``value`` or the lists, tuples and dicts
    it holds (the first thousand items of each, ``depth`` levels down), or None."""
    if isinstance(value, (ServerObject, NotSent)):
        return value
    if isinstance(value, CacheView):   # tracer.cache(include_inputs=True): the inputs
        cache = object.__getattribute__(value, "_cache")
        return _server_object_in([entry.inputs for entries in cache.entries.values()
                                  for entry in entries], depth)
    if depth <= 0 or not isinstance(value, (list, tuple, dict)):
        return None
    items = value.values() if isinstance(value, dict) else value
    for i, item in enumerate(items):
        if i >= 1000:
            break
        found = _server_object_in(item, depth - 1)
        if found is not None:
            return found
    return None


def _refuse_server_objects(variables: dict) -> None:
    """A saved argument of a module that is no module site (``position_ids`` or the rotary
    embeddings in a layer's ``.inputs``, its ``use_cache`` flag) is a placeholder here: after
    the block the caller would hold ``<Tensor on the server>`` where nnsight gives the
    tensor. Refused before sending."""
    for name, value in variables.items():
        found = _server_object_in(value)
        if isinstance(found, NotSent):
            found._refuse()
        if found is not None:
            raise trace_error(f"keeping {found!r} (in `{name}`): an argument of a module "
                              "that is no module site",
                              "save the values that are module sites -- a module's .output, "
                              "the tensor of its .input -- or compute the argument yourself "
                              "(e.g. torch.arange(seq) for position_ids)")


class _Delivery:
    """Sends a traced job and puts the values that come back where the block left proxies.

    Where the block can have left them: the caller's variables (nnsight pushed the saved ones
    there), what those hold (lists, dicts, a ``tracer.cache()``), the globals the block's code
    names. :func:`hookwire.rebind.rebind` looks there first and walks the heap only when it
    finds fewer references than the block left (counted when it was traced)."""

    def __init__(self, job, frame, code):
        self.job, self.frame = job, frame
        self.thread = threading.get_ident()
        pending = job.pending_ids()
        # The caller's variables that hold proxies (or pending tokens) after the block.
        local_vars = frame.f_locals
        _refuse_server_objects(local_vars)
        self.names = {name: id(v) for name, v in local_vars.items()
                      if isinstance(v, torch.Tensor) and id(v) in pending}
        # ... or tuples of them (`nnsight.save((a, b))`, `x.topk(k)`): rebuilt, they must be
        # pushed too (rebind can only replace them in the snapshot of a function's locals).
        marks = dict.fromkeys(pending)
        self.tuples = {name: v for name, v in local_vars.items()
                       if isinstance(v, tuple) and rebuilt(v, marks) is not v}
        glbls = frame.f_globals
        self.roots = [local_vars] + [glbls[n] for n in _code_names(code) if n in glbls]
        self.expected = job.user_refs()
        if local_vars is not glbls:   # a function's variables are also its fast locals,
            for i in self.names.values():   # which push_frame replaces, not rebind
                self.expected[i] = self.expected.get(i, 1) - 1
        self.values: dict[int, torch.Tensor] = {}   # id of what the block held -> value

    def run(self, backend: RemoteBackend, run: RemoteRun | None):
        job = self.job
        request = job.request()
        arrived = {}
        if request is not None:
            graph, tensors, extra = request
            # The values are put in place below, with what only this job knows (tokens
            # chosen at EOS, the caller's frame): the call itself rebinds nothing.
            call = RemoteCall(job.info.name, graph, tensors, tracers=job.tracers,
                              n_sites=job.progress_total(), progress=backend.progress,
                              submit_extra=extra, announce_values=False)
            arrived = call.send(get_connection(backend.url, backend.api_key), run=run).values
        olds, news = job.replacements(arrived)
        self.values = {id(o): n for o, n in zip(olds, news)}
        # Non-blocking: the caller's code ran on meanwhile and may hold more references than
        # were counted, so the whole heap is searched.
        rebind(olds, news, skip=(self.values, self.tuples), roots=tuple(self.roots),
               expected=self.expected if run is None else None, opaque=_MODELS)
        self.roots = None
        if run is not None:
            for old, new in zip(olds, news):
                run.emit(SavedValue(getattr(old, "_hw_name", "value"), new))
        for value in news:
            try:
                save(value)   # an enclosing session keeps what a trace saved
            except ValueError:
                pass          # no trace is running (a non-blocking result)
        self.job = None

    def push_frame(self) -> dict:
        """Put the values into the caller's variables (its fast locals need nnsight's push);
        returns them by name."""
        out = {name: self.values[i] for name, i in self.names.items() if i in self.values}
        for name, value in self.tuples.items():
            new = rebuilt(value, self.values)
            if new is not value:
                out[name] = new
        self.tuples = {}
        if out and self.frame is not None and threading.get_ident() == self.thread:
            push(self.frame, out)
            self.frame = None
        return out


__all__ = ["RemoteBackend"]
