"""The model side of a remote nnsight trace: one forward of the served model, as handoffs.

Locally, nnsight runs the model and every module hands its values to the interleaver
(``interleaver.handle(location, value)``), which serves them to the trace block's workers and
takes back what they wrote. Here nothing runs: :class:`ForwardDriver` makes the same handoffs
in the server's firing order (:mod:`hookwire.nnsight.plan`), with proxies of the module
sites (:mod:`hookwire.module_sites`) where the model would have tensors, so the block's code
records graph nodes as it runs. What the workers hand back becomes site writes: a tensor
edited in place an ``inplace`` write, a tensor replaced (``.output = ...``, or nnsight's own
batch splicing) a ``replace`` write, a ``.skip(value)`` a ``replace`` of the module's output.

A value is only read from the server where some worker (or ``tracer.cache()``) waits for it;
every other handoff just counts, as nnsight counts the visits it serves nobody.
"""
from __future__ import annotations

import os

import torch
from nnsight.intervention.source import NO_SKIP

from hookwire.errors import SiteNotServed, TraceError
from hookwire.module_sites import ServerObject, module_site
from hookwire.nnsight.values import NotSent
from hookwire.trace import Proxy, library_dirs, trace_error


def _placeholder(type_name: str):
    return None if type_name == "NoneType" else ServerObject(type_name)


def output_class(model) -> type:
    """The class the model's forward returns (``CausalLMOutputWithPast`` & co)."""
    from transformers.modeling_outputs import CausalLMOutput

    returns = type(model).forward.__annotations__.get("return")
    return returns if isinstance(returns, type) else CausalLMOutput


class ForwardDriver:
    """Makes one forward's handoffs. ``logits``: how ``model.output.logits`` is read --
    ``"output"`` (the forward's own output, after it) or ``"lm_head"`` (the output module's
    final value: generation forwards return nothing else)."""

    def __init__(self, info, interleaver, tracer, events, batch: int, seq: int, *,
                 root: str, output_cls: type, lm_head: str, cached: bool = False,
                 logits: str = "output", last_only: str | None = None,
                 local_cache: bool = False):
        self.info, self.interleaver, self.tracer = info, interleaver, tracer
        self.events, self.batch, self.seq = events, batch, seq
        self.root, self.output_cls, self.lm_head, self.logits = root, output_cls, lm_head, logits
        self.layouts = dict(info.module_layouts)
        self.kw_layouts = dict(info.module_kwarg_layouts)
        if cached:
            self.layouts.update(info.step_module_layouts)
            self.kw_layouts.update(info.step_module_kwarg_layouts)
        elif local_cache:
            self._mark_cache_slots()
        self.final_logits = None   # lm_head's output as the forward goes on with it
        # HF's generate asks for the last position's logits only (logits_to_keep=1): locally
        # the output module then sees and returns that position alone. The server computes
        # every position; the block is served the last (a view), writes go back into it.
        self.last_only = last_only
        self._full: dict[int, tuple] = {}
        self._model_output = None

    def _mark_cache_slots(self) -> None:
        """A trace called as locally (``use_cache`` on, the config's default) hands each
        layer a KV cache object (an empty ``DynamicCache``); the server runs the forward
        without one, so its layout says None there. Those slots -- None without a cache, an
        object with one (the generation step's layout) -- become placeholders: saving one
        is refused, instead of None where nnsight gives the cache."""
        for site, step in self.info.step_module_layouts.items():
            plain = self.layouts.get(site)
            if plain is not None and len(plain) == len(step):
                self.layouts[site] = [s if p == "NoneType" and s not in ("NoneType", "Tensor")
                                      else p for p, s in zip(plain, step)]
        for site, step in self.info.step_module_kwarg_layouts.items():
            plain = self.kw_layouts.get(site)
            if plain is not None:
                self.kw_layouts[site] = {
                    k: step[k] if t == "NoneType" and step.get(k) not in (None, "NoneType",
                                                                          "Tensor") else t
                    for k, t in plain.items()}

    # ---- helpers ------------------------------------------------------------------------
    def wanted(self, location: str) -> bool:
        il = self.interleaver
        return location in il.parked or location in il.observers

    def _loc(self, path: str, what: str) -> str:
        return f"{self.root}.{path}.{what}" if path else f"{self.root}.{what}"

    def _read(self, index: int, path: str | None = None) -> tuple[Proxy, int]:
        site = self.info.sites[index]
        proxy = self.tracer.read_site(site.name, site.call,
                                      site.concrete_shape(self.batch, self.seq), site.dtype,
                                      requires_grad=site.grad,
                                      strides=site.concrete_strides(self.batch, self.seq))
        proxy._hw_site = len(self.tracer.sites) - 1   # for .grad (hookwire.nnsight.gradients)
        if path is not None and path == self.last_only:
            served = proxy[:, -1:]
            self._full[id(served)] = (served, proxy)
            return served, proxy._hw_site
        return proxy, proxy._hw_site

    def _write(self, index: int, served: Proxy, new, where: str):
        """Site writes for what the block did to ``served``: edited in place, replaced."""
        full = self._full.get(id(served), (None, None))[1]
        if full is None:
            if served._hw_version > 0:
                self.tracer.write_site(index, served, "inplace")
            if new is not served:
                _check_like(new, served, where)
                self.tracer.write_site(index, new, "replace")
            return
        if full._hw_version > 0:   # an edit of the view went into the whole value
            self.tracer.write_site(index, full, "inplace")
        if new is not served:
            _check_like(new, served, where)
            self.tracer.write_site(index, torch.cat([full[:, :-1], new], dim=1), "replace")

    def _handoff(self, location: str, value):
        out = self.interleaver.handle(location, value)
        for parked in self.interleaver.parked:
            if ".source." in parked:
                _refuse_source(self.interleaver, parked)
        return out

    # ---- one forward ----------------------------------------------------------------------
    def run(self, args: tuple, kwargs: dict):
        """The handoffs of the whole forward; returns the model's output object (or None
        when nothing waits for it)."""
        self._root_input(args, kwargs)
        skipping = None
        for ev in self.events:
            if skipping is not None:
                if ev.kind == "output" and (ev.path, ev.call) == skipping[0]:
                    self._skipped_output(ev, skipping[1])
                    skipping = None
                continue
            if ev.kind == "input":
                replacement = self._input(ev)
                if replacement is not NO_SKIP:
                    skipping = ((ev.path, ev.call), replacement)
            else:
                self._output(ev)
        self._refuse_unserved()
        return self._root_output()

    def _refuse_unserved(self):
        """A block still waiting on a module the server cannot serve (its manifest lists the
        site as unserved: shapes that follow the values, a convolution's padded length...)
        would otherwise end with nnsight's "not executed"; say which module and why."""
        prefix = self.root + "."
        for location in list(self.interleaver.parked):
            if not location.startswith(prefix):
                continue
            path, _, what = location[len(prefix):].rpartition(".")
            if what not in ("input", "output", "inputs"):
                continue
            self._refuse_site(path, what)

    def _refuse_site(self, path: str, what: str):
        """Raise :class:`SiteNotServed` if the server lists ``path``'s input/output as a site
        it cannot serve."""
        name = module_site(path, "input" if what.startswith("input") else "output")
        reason = self.info.unserved_reason(name)
        if reason is not None:
            raise SiteNotServed(f"{path}.{what}: the server cannot run hooks on module site "
                                f"{name!r} as they run locally: {reason}. Read a module "
                                "around it instead, or run this model locally")

    def output_object(self):
        """``model.output``: the model's output class holding the logits proxy."""
        if self._model_output is None:
            if self.logits == "output":
                vocab = self.info.sites[self.info.site_index[(
                    module_site(self.lm_head, "output"), 0)]]
                logits = self.tracer.read_output(
                    "logits", vocab.concrete_shape(self.batch, self.seq), vocab.dtype)
            elif self.final_logits is not None:
                logits = self.final_logits
            else:
                raise trace_error("`model.output` of a generation step whose output module "
                                  "was skipped or not read", "read the output module's "
                                  f"`.output` (model.{self.lm_head}.output) instead")
            # The KV cache the local forward returns stays on the server: a stand-in that
            # raises where it is used (it was None, silently unlike the local run).
            # (transformers 5 names the field `cache`, `past_key_values` an alias of it.)
            fields = getattr(self.output_cls, "__dataclass_fields__", {})
            extra = {name: NotSent(f"`model.output.{name}` (the KV cache)",
                                   "the cache stays on the server: read the modules' "
                                   ".output instead (or generate with model.generate)")
                     for name in ("cache", "past_key_values") if name in fields}
            self._model_output = self.output_cls(logits=logits, **extra)
        return self._model_output

    def _root_input(self, args, kwargs):
        location = self._loc("", "input")
        if self.wanted(location):
            given = (tuple(args), dict(kwargs))
            new = self._handoff(location, given)
            if new is not given and not _same(new, given):
                raise trace_error("replacing the model's own inputs (`model.input` / "
                                  "`model.inputs`)", "pass the inputs you want to trace() "
                                  "(or to tracer.invoke())")
        else:
            self._handoff(location, None)
        if self._handoff(self._loc("", "skip"), NO_SKIP) is not NO_SKIP:
            raise trace_error("skipping the whole model", "skip its modules instead")

    def _root_output(self):
        location = self._loc("", "output")
        if self.wanted(location):
            return self._handoff(location, self.output_object())
        self._handoff(location, None)
        # A single forward's output is also the trace's `tracer.result`; a generation step's
        # is not (the generated ids are).
        if self.logits == "output" and (self.wanted("result") or self._model_output is not None):
            return self.output_object()
        return None

    # ---- module handoffs ------------------------------------------------------------------
    def _input(self, ev):
        """The input handoff and the skip gate; returns the skip replacement or NO_SKIP."""
        location = self._loc(ev.path, "input")
        if not self.wanted(location):
            self._handoff(location, None)
        else:
            site = module_site(ev.path, "input")
            args = [_placeholder(t) for t in self.layouts.get(site, [])]
            kwargs = {k: _placeholder(t) for k, t in self.kw_layouts.get(site, {}).items()}
            proxy, index, slot = None, None, None
            if ev.site is not None:
                proxy, index = self._read(ev.site, ev.path)
                if args and self.layouts[site][0] == "Tensor":
                    slot = 0
                    args[0] = proxy
                else:
                    slot = next((k for k, t in self.kw_layouts.get(site, {}).items()
                                 if t == "Tensor"), None)
                    if slot is None:
                        raise TraceError(f"the server's manifest gives no argument for the "
                                         f"input of {ev.path!r}")
                    kwargs[slot] = proxy
            given = (tuple(args), kwargs)
            new = self._handoff(location, given)
            self._write_input(ev.path, given, new, proxy, index, slot)
        return self._handoff(self._loc(ev.path, "skip"), NO_SKIP)

    def _write_input(self, path, given, new, proxy, index, slot):
        where = f"{self.root}.{path}.input"
        if not (isinstance(new, tuple) and len(new) == 2 and isinstance(new[0], tuple)
                and isinstance(new[1], dict)) or len(new[0]) != len(given[0]) \
                or set(new[1]) != set(given[1]):
            raise trace_error(f"a new structure for {where}",
                              "only the tensor that is the module's first input can change "
                              "remotely; keep the other arguments as they are")
        old_items = list(enumerate(given[0])) + list(given[1].items())
        new_items = list(enumerate(new[0])) + [(k, new[1][k]) for k in given[1]]
        for (key, old), (_, value) in zip(old_items, new_items):
            if key == slot:
                continue
            if value is not old:
                raise trace_error(f"changing argument {key!r} of {where}", "only the module's "
                                  "first tensor input is a module site the server can write")
        if proxy is None:
            return
        value = new[0][slot] if isinstance(slot, int) else new[1][slot]
        self._write(index, proxy, value, where)

    def _output(self, ev):
        location = self._loc(ev.path, "output")
        force = self.logits == "lm_head" and ev.path == self.lm_head and (
            self.wanted(self._loc("", "output")))
        if not (self.wanted(location) or force):
            self._handoff(location, None)
            return
        if ev.site is None:
            self._refuse_site(ev.path, "output")
            self._handoff(location, NotSent(
                f"the output of {self.root}.{ev.path}",
                "read the module inside it that computes the tensor you want (e.g. its last "
                "submodule's .output)"))
            return
        given, sites = self._read_output(ev)
        final = self._handoff(location, given)
        self._write_output(f"{self.root}.{ev.path}.output", given, final, sites)
        if ev.path == self.lm_head:
            self.final_logits = final if not isinstance(final, tuple) else final[0]

    def _read_output(self, ev):
        layout = self.layouts.get(module_site(ev.path, "output"))
        if layout is None:
            proxy, index = self._read(ev.site, ev.path)
            return proxy, [(None, index)]
        items = [_placeholder(t) for t in layout]
        sites = []
        for element, site in ev.elements:
            items[element], index = self._read(site)
            sites.append((element, index))
        items[0], index = self._read(ev.site, ev.path)
        sites.append((0, index))
        return tuple(items), sites

    def _write_output(self, where, given, final, sites):
        if isinstance(given, tuple):
            if not isinstance(final, tuple) or len(final) != len(given):
                raise trace_error(f"{where} replaced by {_describe(final)}",
                                  f"the module returns a tuple of {len(given)}: assign one like "
                                  "it (only tensor elements can change)")
            for i, (old, new) in enumerate(zip(given, final)):
                if not isinstance(old, Proxy) and new is not old:
                    raise trace_error(f"replacing element {i} ({old!r}) of {where}",
                                      "only tensor elements are module sites the server can "
                                      "write")
        for element, index in sites:
            old = given if element is None else given[element]
            new = final if element is None else final[element]
            self._write(index, old, new, where)

    def _skipped_output(self, ev, replacement):
        """``.skip(value)``: the module's children never hand anything over; its output is
        the replacement (on the server, a write of its output sites)."""
        where = f"{self.root}.{ev.path}"
        final = self._handoff(self._loc(ev.path, "output"), replacement)
        if ev.site is None:
            raise trace_error(f"skipping {where}", "its output is no tensor the server can "
                              "replace; skip a module inside it")
        layout = self.layouts.get(module_site(ev.path, "output"))
        if layout is None:
            targets = [(ev.site, final)]
        else:
            if not isinstance(final, tuple) or len(final) != len(layout):
                raise trace_error(f"skipping {where} with {_describe(final)}",
                                  f"the module returns a tuple of {len(layout)} "
                                  f"({', '.join(layout)}): give one like it")
            targets = [(site, final[element]) for element, site in ev.elements] + \
                [(ev.site, final[0])]
        for site_index, value in targets:
            site = self.info.sites[site_index]
            if not isinstance(value, torch.Tensor):
                raise trace_error(f"skipping {where} with a {type(value).__name__} where the "
                                  "module returns a tensor", "give a tensor of its shape")
            want = site.concrete_shape(self.batch, self.seq)
            if tuple(value.shape) != tuple(want) or value.dtype != site.dtype:
                raise trace_error(f"skipping {where} with a tensor of shape "
                                  f"{tuple(value.shape)} {value.dtype}",
                                  f"the module's output is {tuple(want)} {site.dtype}")
            index = self.tracer.add_site(site.name, site.call)
            self.tracer.write_site(index, value, "replace")
        if ev.path == self.lm_head:
            self.final_logits = final if not isinstance(final, tuple) else final[0]


def _refuse_source(interleaver, location: str):
    """``.source`` (an operation inside a module's forward) never fires here: the server offers
    module sites only. Raised at the block's line that asked for it."""
    where = None
    for mediator in interleaver.mediators:
        pending = mediator.pending
        if pending is not None and pending.provider == location and mediator.worker:
            where = _user_line(mediator.worker.gr_frame)
    what = (f"`.source` ({location.rsplit('.', 1)[0]}): an operation inside a module's "
            "forward")
    advice = ("the server offers module inputs and outputs only: read the module (or "
              "submodule) whose input or output it is")
    if where is None:
        raise trace_error(what, advice)
    raise TraceError(f"at {where[0]}:{where[1]}: {what} cannot be traced for a remote run; "
                     f"{advice}", file=where[0], line=where[1])


def _user_line(frame):
    dirs = library_dirs()
    while frame is not None:
        name = os.path.abspath(frame.f_code.co_filename)
        if not name.startswith(dirs) and not name.startswith("<frozen"):
            return frame.f_code.co_filename, frame.f_lineno
        frame = frame.f_back
    return None


def _same(new, old) -> bool:
    """Whether ``new`` holds exactly the objects ``old`` holds (tuples, lists, dicts)."""
    if new is old:
        return True
    if isinstance(old, (tuple, list)):
        return isinstance(new, type(old)) and len(new) == len(old) and all(
            _same(n, o) for n, o in zip(new, old))
    if isinstance(old, dict):
        return isinstance(new, dict) and set(new) == set(old) and all(
            _same(new[k], old[k]) for k in old)
    return False


def _describe(value) -> str:
    return f"a tuple of {len(value)}" if isinstance(value, tuple) else \
        f"a {type(value).__name__}"


def _check_like(new, old, where):
    if not isinstance(new, torch.Tensor):
        raise trace_error(f"{where} set to a {type(new).__name__} where the model has a "
                          "tensor", "assign a tensor of the same shape")
    if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
        raise trace_error(f"{where} set to a tensor of shape {tuple(new.shape)} {new.dtype}",
                          f"the model's is {tuple(old.shape)} {old.dtype}")


__all__ = ["ForwardDriver", "output_class"]
