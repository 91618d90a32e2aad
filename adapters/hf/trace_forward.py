"""Trace the torch hooks of one forward pass over HF module sites into a graph.

Hooks are called in the server's firing order with what torch would hand them, built from
the server's manifest: a forward hook gets ``(module, args, output)`` and a pre-hook
``(module, args)``, where tensors are proxies of module sites (``hookwire.module_sites``):
``output`` is the module's tensor, or its whole tuple -- tensor elements as proxies of the
``output.<i>`` sites, ``None`` as ``None``, server-side objects (a KV cache) as a
:class:`ServerObject` placeholder --, ``args`` the positional arguments, the first tensor a
proxy of the ``input`` site. ``module`` is the weightless stand-in's submodule.

What a hook returns replaces what it was given, as with torch: its tensors become writes of
their sites ("replace"), tensors edited in place are written back in place.
"""
from __future__ import annotations

import functools
import inspect
from collections import defaultdict
from dataclasses import dataclass, field

import torch

from hookwire.errors import HookwireError, SiteNotServed, TraceError
from hookwire.hf.hooks import HookKey, module_of
from hookwire.module_sites import ServerObject, module_site
from hookwire.remote_call import Destinations
from hookwire.trace import Proxy, Tracer, trace_error, tracing


@dataclass
class Traced:
    """One forward's trace: its tracer and where the values it saves go (the proxies the
    user's code still holds)."""
    tracer: Tracer
    destinations: Destinations = field(default_factory=Destinations)


def _placeholder(type_name: str):
    return None if type_name == "NoneType" else ServerObject(type_name)


class _ForwardTrace:
    def __init__(self, info, stand_in, batch: int, seq: int, layouts: dict, tracer: Tracer):
        self.info, self.stand_in, self.batch, self.seq = info, stand_in, batch, seq
        self.layouts, self.tracer = layouts, tracer
        self.calls: dict[str, list[int]] = defaultdict(list)
        for name, call in info.site_index:
            self.calls[name].append(call)
        self.args_after: dict[tuple[str, int], tuple] = {}

    def _read(self, name: str, call: int):
        site = self.info.sites[self.info.site_index[(name, call)]]
        proxy = self.tracer.read_site(name, call, site.concrete_shape(self.batch, self.seq),
                                      site.dtype,
                                      strides=site.concrete_strides(self.batch, self.seq))
        return proxy, len(self.tracer.sites) - 1

    def _input_layout(self, path: str):
        return self.layouts.get(module_site(path, "input"), ["Tensor"])

    def events(self, hooks: list[tuple[HookKey, object]]):
        """(site index, path, kind, call, [fn]) in firing order."""
        wanted: dict[tuple[str, str, int], list] = defaultdict(list)
        for key, fn in hooks:
            module_of(self.stand_in, key)  # a clear error for a path the model lacks
            name = module_site(key.path, key.kind)
            reason = self.info.unserved_reason(name)
            if reason is not None:
                raise SiteNotServed(f"hook {key.label!r} cannot run remotely: {reason}. Hook "
                                    "a neighbouring module instead, or run this model "
                                    "locally", site=name)
            calls = self.calls.get(name, [])
            if key.call is not None:
                if key.call not in calls:
                    raise HookwireError(f"hook {key.label!r}: the module runs {len(calls)} "
                                        "time(s) in a forward")
                calls = [key.call]
            elif not calls:
                raise HookwireError(f"hook {key.label!r}: the module does not run with a "
                                    "tensor in this model's forward")
            for call in calls:
                wanted[(key.path, key.kind, call)].append(fn)
                if key.kind == "output":  # the forward hook's args come from the input site
                    wanted.setdefault((key.path, "input", call), [])
        order = []
        for (path, kind, call), fns in wanted.items():
            name = module_site(path, kind)
            index = self.info.site_index.get((name, call))
            if index is None:  # an input hook on a module called with keywords only
                index = self.info.site_index[(module_site(path, "output"), call)] - 0.5
            order.append((index, path, kind, call, fns))
        return sorted(order, key=lambda e: e[0])

    # ---- the two kinds of event -----------------------------------------------------------
    def pre(self, path: str, call: int, fns: list):
        module = self.stand_in.get_submodule(path)
        layout = self._input_layout(path)
        read, index = (None, None)
        if layout and layout[0] == "Tensor":
            read, index = self._read(module_site(path, "input"), call)
        given = tuple(read if i == 0 and read is not None else _placeholder(t)
                      for i, t in enumerate(layout))
        args = given
        for fn in fns:
            self.tracer.context = (_label(fn), f"{path}:input")
            _check_takes(fn, ("module", "args"), "register_forward_pre_hook")
            result = fn(module, args)
            if result is not None:
                args = result if isinstance(result, tuple) else (result,)
        self.tracer.context = None
        self._write_back(path, "input", given, args, [(0, index)] if read is not None else [])
        self.args_after[(path, call)] = args

    def post(self, path: str, call: int, fns: list):
        module = self.stand_in.get_submodule(path)
        layout = self.layouts.get(module_site(path, "output"))
        args = self.args_after.pop((path, call), None)
        if args is None:
            args = tuple(_placeholder(t) if t != "Tensor" else ServerObject("Tensor")
                         for t in self._input_layout(path))
        if layout is None:  # a single tensor
            read, index = self._read(module_site(path, "output"), call)
            given, sites = read, [(None, index)]
        else:
            items: list = [None] * len(layout)
            sites = []
            for i in range(len(layout) - 1, 0, -1):  # element sites fire before element 0
                if layout[i] == "Tensor":
                    items[i], index = self._read(module_site(path, "output", i), call)
                    sites.append((i, index))
                else:
                    items[i] = _placeholder(layout[i])
            items[0], index = self._read(module_site(path, "output"), call)
            sites.append((0, index))
            # As torch hands it over: a tuple, or a list where the module returns one.
            given = items if module_site(path, "output") in self.info.list_outputs \
                else tuple(items)
        # What the hooks were handed, as it was (a list may be edited in place by them).
        before = list(given) if isinstance(given, list) else given
        output = given
        inputs = [(a, a._hw_version) for a in args if isinstance(a, Proxy)]
        for fn in fns:
            self.tracer.context = (_label(fn), path)
            _check_takes(fn, ("module", "args", "output"), "register_forward_hook")
            result = fn(module, args, output)
            if any(a._hw_version != v for a, v in inputs):
                # Locally the module's input is often a tensor the model uses again (a
                # block's residual stream, under its norm): the edit reaches that use.
                raise trace_error(
                    f"an in-place edit of {path!r}'s input in a forward hook (after the "
                    "module ran: locally it changes the tensor the input came from, which "
                    "the model may use again)", "edit the input in a forward pre-hook on "
                    "the module, or edit its output here")
            if result is not None:
                output = result
        self.tracer.context = None
        self._write_back(path, "output", before, output, sites)

    def _write_back(self, path, kind, given, final, sites):
        """Writes for what the hooks changed: ``sites`` lists (element or None, site index)."""
        where = f"{path}:{kind}"
        if isinstance(given, (tuple, list)):
            if not isinstance(final, (tuple, list)) or len(final) != len(given):
                raise TraceError(f"hooks on {where!r} returned {_describe(final)}; torch "
                                 f"hands them a tuple of {len(given)}: return one like it "
                                 "(only tensors may change), or None")
            for i, (old, new) in enumerate(zip(given, final)):
                if not isinstance(old, Proxy) and new is not old:
                    raise TraceError(f"hooks on {where!r} replaced element {i} "
                                     f"({old!r}): only tensor elements can change remotely")
        for element, index in sites:
            old = given if element is None else given[element]
            new = final if element is None else final[element]
            if old._hw_version > 0:
                self.tracer.write_site(index, old, "inplace")
            if new is not old:
                _check_like(new, old, where)
                self.tracer.write_site(index, new, "replace")


def _label(fn) -> str:
    """The hook's name for errors. Never ``repr``: a partial's repr prints its bound values,
    and a value a hook stored there may be one this trace is making (reading it refuses)."""
    if isinstance(fn, functools.partial):
        return f"partial({_label(fn.func)})"
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def _describe(value) -> str:
    if isinstance(value, tuple):
        return f"a tuple of {len(value)}"
    return f"a {type(value).__name__}"


def _check_like(new, old, where):
    if not isinstance(new, torch.Tensor):
        raise TraceError(f"hooks on {where!r} put a {type(new).__name__} where the model has "
                         "a tensor; return a tensor of the same shape, or None")
    if tuple(new.shape) != tuple(old.shape) or new.dtype != old.dtype:
        raise TraceError(f"hooks on {where!r} returned a tensor of shape {tuple(new.shape)} "
                         f"{new.dtype}; the model's is {tuple(old.shape)} {old.dtype}")


def trace_forward(info, stand_in, batch: int, seq: int, hooks: list[tuple[HookKey, object]],
                  *, cached: bool = False) -> Traced:
    """Trace ``hooks`` for one forward of ``batch x seq`` new tokens (``cached``: a forward
    with a KV cache, as in generation). Proxies the hooks let escape are saved."""
    layouts = dict(info.module_layouts)
    if cached:
        layouts.update(info.step_module_layouts)
    tracer = Tracer()
    ft = _ForwardTrace(info, stand_in, batch, seq, layouts, tracer)
    with tracing(tracer), torch.no_grad():
        for _, path, kind, call, fns in ft.events(hooks):
            (ft.pre if kind == "input" else ft.post)(path, call, fns)
    ft = None  # our own references to proxies must be gone before counting the user's
    return Traced(tracer, Destinations.keep_escaped(tracer))


def _check_takes(fn, params: tuple, registered_with: str) -> None:
    """A hook is called as torch calls one registered with ``registered_with``: one that
    takes other arguments (a ``with_kwargs=True`` hook's ``kwargs``) is refused here, naming
    it, rather than failing with a bare ``TypeError`` from the call."""
    try:
        inspect.signature(fn).bind(*params)
    except TypeError:
        raise trace_error(
            f"a hook that cannot be called as ({', '.join(params)})",
            f"hooks are called as torch's {registered_with} calls them, with "
            f"({', '.join(params)}); hooks taking kwargs (with_kwargs=True) are not "
            "supported: read and return the positional args only") from None
    except ValueError:  # no signature to read (a builtin): the call itself will tell
        pass


__all__ = ["trace_forward", "Traced", "ServerObject"]
