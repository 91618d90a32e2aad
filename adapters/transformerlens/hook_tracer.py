"""The one TL hook tracer: call every hook TL registered on a model's hook points, in the
server's firing order, on proxies of the server's sites.

Two kinds of TL model put hooks on hook points, and they differ only in *names and
layouts*: a TL 4 ``TransformerBridge`` names its hook points as the server's sites and hands
hooks the site's value as it is; a TL 2.x ``HookedTransformer`` has legacy names
(``blocks.0.hook_resid_pre``) that map onto the server's TL 4 sites, some of which it sees in
another layout (heads split out). A :class:`Dialect` says which: which hook points sit at a
site, how a hook sees the site's value and how what it returns maps back, where a forward with
``stop_at_layer`` stops. :class:`BridgeDialect` is TL 4's;
:class:`hookwire.transformerlens.legacy.LegacyDialect` TL 2.x's. The loop itself
(:func:`trace_hook_points`, :func:`trace_backward_hooks`) is written once, here.
"""
from __future__ import annotations

import contextlib
import functools
import weakref

import torch

try:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException
except ImportError:  # TL 2.x has no bridges; its forward returns early instead of raising
    class StopAtLayerException(Exception):
        pass

from hookwire.backward_done import gradient_unchanged
from hookwire.client import RemoteModelInfo
from hookwire.errors import HookwireError, SiteNotServed, TraceError
from hookwire.trace import Proxy, Tracer, tracing

_HOOK_POINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_hook_points(model) -> dict:
    """name -> HookPoint, computed once per model: TL 4 rebuilds ``hook_dict`` (with its
    aliases) on every access, which costs more than tracing a typical hook."""
    points = _HOOK_POINTS.get(model)
    if points is None:
        points = {name: hp for name, hp in model.hook_dict.items()
                  if hasattr(hp, "_forward_hooks")}
        _HOOK_POINTS[model] = points
    return points


def hooked(hp) -> bool:
    return bool(hp._forward_hooks or hp._backward_hooks)


class Dialect:
    """How one kind of TL model's hook points meet the server's sites (see the module
    docstring). One instance per call (it may keep what :meth:`plan` found).

    ``stops_before_hooks``: a forward with ``stop_at_layer`` returns the stop site's value
    before that site's hooks run (TL 2.x) rather than after them (TL 4, which raises from
    the hook point)."""
    stops_before_hooks = False
    legacy = False

    def __init__(self, model):
        self.model = model

    def check_model(self, info: RemoteModelInfo) -> None:
        """Refuse a local model whose hooks would mean something else on the server's."""

    def plan(self, info: RemoteModelInfo, batch: int, seq: int) -> None:
        """Before tracing: find the hooked points, refuse what cannot run remotely."""

    def points(self, site) -> list[tuple[str, object]]:
        """(hook name, hook point) of the points at ``site`` (one call of a site)."""
        raise NotImplementedError

    def finish(self, info: RemoteModelInfo) -> None:
        """After a forward traced to its end: refuse hooks that never fired."""

    def stop_site(self, info: RemoteModelInfo, stop_at_layer) -> str | None:
        """The site where a forward with ``stop_at_layer`` stops (None: none stops it)."""
        raise NotImplementedError

    def to_view(self, name: str, x):
        """What a hook on ``name`` sees of the site's value ``x``."""
        return x

    def check_view(self, name: str, view) -> None:
        """Refuse a view a local model of this kind would not hand its hooks."""

    def returned(self, out, view, hp):
        """What the hooks returned, before it is checked to be like ``view``."""
        return out

    def from_view(self, name: str, out, x):
        """The site's new value from what the hooks on ``name`` returned (``out``, checked
        to be like the view of ``x``)."""
        return out

    def label(self, hp, key, fn) -> str:
        """The user's forward hook, as a readable name for errors."""
        raise NotImplementedError

    def backward_label(self, hp, key, fn) -> str:
        return self.label(hp, key, fn)


class BridgeDialect(Dialect):
    """TL 4 ``TransformerBridge``: hook point names are the server's site names, and hooks
    see each site's value as the bridge hands it over (its conversions applied)."""

    def check_model(self, info: RemoteModelInfo) -> None:
        from hookwire.transformerlens.checks import check_bridge_compatible
        check_bridge_compatible(self.model, info)

    def plan(self, info: RemoteModelInfo, batch: int, seq: int) -> None:
        self.hook_dict = cached_hook_points(self.model)
        # Only the hooked points are visited: a call hooks a handful of a model's points,
        # and walking every site's point cost more than tracing the hooks themselves.
        self.by_site = {name: [(name, hp)] for name, hp in self.hook_dict.items()
                        if hooked(hp)}
        hooked_points = {name: points[0][1] for name, points in self.by_site.items()}
        self.hooked = {id(hp) for hp in hooked_points.values()}
        self.covered: set[int] = set()
        check_served(hooked_points, info)
        stamp_token_shape(hooked_points, batch, seq)  # (only a hooked point's is used)

    def points(self, site) -> list[tuple[str, object]]:
        points = self.by_site.get(site.name)
        if points is None:
            return []
        self.covered.add(id(points[0][1]))
        return points

    def finish(self, info: RemoteModelInfo) -> None:
        missing = self.hooked - self.covered
        if not missing:
            return
        # Hook points the server knows but that never fire in a forward (e.g. a fused qkv
        # input on GPT-2) are no-ops, as they are locally. Unknown ones are an error.
        names = [n for n, hp in self.hook_dict.items()
                 if id(hp) in missing and n not in info.hook_names]
        if names:
            raise HookwireError(f"hooks on {names[:5]} cannot run remotely: the server's "
                                "model has no such hook point (is it the same architecture?)")

    def stop_site(self, info: RemoteModelInfo, stop_at_layer) -> str | None:
        """The input hook of block ``stop_at_layer`` (TL raises there, after the hook ran)."""
        if stop_at_layer is None:
            return None
        n_layers = self.model.cfg.n_layers
        k = n_layers + stop_at_layer if stop_at_layer < 0 else stop_at_layer
        if not 0 <= k < n_layers:
            return None
        return served_stop_site(info, f"blocks.{k}.hook_in", stop_at_layer)

    def returned(self, out, view, hp):
        return token_layout(out, view, hp)

    def label(self, hp, key, fn) -> str:
        """The user's hook function (TL wraps it in ``full_hook``)."""
        return hook_label(hp, key)

    def backward_label(self, hp, key, fn) -> str:
        for handle in getattr(hp, "bwd_hooks", []):
            if handle.user_hook is not None:
                user = handle.user_hook
                return getattr(getattr(user, "func", user), "__qualname__", None) or repr(user)
        return "backward hook"


def trace_hook_points(model, info: RemoteModelInfo, batch: int, seq: int,
                      tracer: Tracer, stop_at: str | None = None,
                      backward_sites: list | None = None, skip=None,
                      dialect: Dialect | None = None) -> bool:
    """Call every forward hook TL registered, in the server's firing order, on proxies.

    With ``stop_at`` (a site name), tracing ends at that site, as a TL forward with
    ``stop_at_layer`` ends there, and its value (after its hooks, or before them where the
    dialect ``stops_before_hooks``) is saved as ``__stop__``; returns True then. Sites with
    backward hooks are appended to ``backward_sites`` as ``(index, site, points)`` for
    :func:`trace_backward_hooks`. Sites for which ``skip(name)`` is true do not fire in this
    forward (``start_at_layer``). ``dialect``: TL 4's by default."""
    dialect = dialect if dialect is not None else BridgeDialect(model)
    dialect.plan(info, batch, seq)
    with tracing(tracer):
        for site in info.sites:
            points = dialect.points(site)
            if skip is not None and skip(site.name):
                continue
            stopping = stop_at is not None and site.name == stop_at and site.call == 0
            if stopping and dialect.stops_before_hooks:
                points = []
            if (points or stopping) and _trace_site(dialect, tracer, site, points, stopping,
                                                    batch, seq, backward_sites):
                return True  # later hook points never fire: the forward stops here
    dialect.finish(info)
    return False


def _trace_site(dialect: Dialect, tracer: Tracer, site, points: list, stopping: bool,
                batch: int, seq: int, backward_sites: list | None) -> bool:
    """One call of one site: its points' forward hooks on a proxy of its value (its writes
    recorded), its backward hooks noted. True when the forward stops here (``__stop__``)."""
    forward = [(n, hp) for n, hp in points if hp._forward_hooks]
    backward = [(n, hp) for n, hp in points if hp._backward_hooks]
    if not (forward or stopping):
        if backward and site.grad:  # its gradient is read, not its value
            index = tracer.add_site(site.name, site.call)
            if backward_sites is not None:
                backward_sites.append((index, site, backward))
        return False
    x = tracer.read_site(site.name, site.call, site.concrete_shape(batch, seq), site.dtype,
                         strides=site.concrete_strides(batch, seq))
    index = len(tracer.sites) - 1
    # Backward hooks fire only where a gradient arrives (as locally).
    if backward and backward_sites is not None and site.grad:
        backward_sites.append((index, site, backward))
    out, stopped_by_hook = x, None
    for name, hp in forward:
        out, stopped_by_hook = _run_point_hooks(dialect, name, hp, out, tracer)
        if stopped_by_hook is not None:
            break
    tracer.context = None
    if x._hw_version > 0:
        tracer.write_site(index, x, "inplace")
    if out is not x:
        tracer.write_site(index, out, "replace")
    if stopping or stopped_by_hook is not None:
        tracer.save("__stop__", out if stopped_by_hook is None else stopped_by_hook)
        return True
    return False


def _run_point_hooks(dialect: Dialect, name: str, hp, x, tracer: Tracer):
    """One hook point's forward hooks, as TL calls them, on the site's value ``x``.
    Returns (the site's value afterwards -- ``x`` unless a hook returned a tensor --, the
    layer output a hook stopped the forward with, or None)."""
    view = dialect.to_view(name, x)
    dialect.check_view(name, view)
    out = view
    for key, fn in list(hp._forward_hooks.items()):
        tracer.context = (dialect.label(hp, key, fn), name)
        try:
            if hp._forward_hooks_with_kwargs.get(key):
                result = fn(hp, (view,), {}, out)
            else:
                result = fn(hp, (view,), out)
        except StopAtLayerException as exc:
            # TL's run_with_cache(stop_at_layer=k) stops the forward from a hook.
            return (x if out is view else _checked(dialect, name, out, view, x, hp)), \
                exc.layer_output
        if result is not None:
            out = result
    if out is view:
        return x, None
    return _checked(dialect, name, out, view, x, hp), None


def _checked(dialect: Dialect, name: str, out, view, x, hp):
    """The site's new value from what a point's hooks returned, refused unless it is a
    tensor like the one they were given."""
    out = dialect.returned(out, view, hp)
    check_replacement(out, view, name)
    return dialect.from_view(name, out, x)


def trace_backward_hooks(backward_sites: list, batch: int, seq: int, tracer: Tracer,
                         dialect: Dialect) -> None:
    """Call every backward hook on the gradient of its site, latest site first (the order a
    backward pass reaches them), each seeing the gradient in its dialect's layout. Hooks
    that read gradients are supported; hooks that change them are refused (the server's
    backward pass does not run graph nodes mid-way)."""
    with tracing(tracer):
        for index, site, points in reversed(backward_sites):
            grad = None
            for name, hp in points:
                if hp._backward_pre_hooks:
                    raise HookwireError(f"backward pre-hooks on {name!r} cannot run remotely")
                if grad is None:
                    grad = tracer.read_grad(index, site.concrete_shape(batch, seq), site.dtype)
                view = dialect.to_view(name, grad)
                for key, fn in list(hp._backward_hooks.items()):
                    tracer.context = (dialect.backward_label(hp, key, fn), name)
                    # TL's backward wrapper takes (module, grad_input, grad_output); for a
                    # hook point both are the gradient of its output.
                    result = fn(hp, (view,), (view,))
                    if not (gradient_unchanged(result, view) or
                            gradient_unchanged(result, grad)) or \
                            grad._hw_version > 0 or view._hw_version > 0:
                        raise TraceError(
                            f"a backward hook on {name!r} changes the gradient; remote "
                            "backward hooks can read gradients (cache, attribute, reduce "
                            "them) but not replace them")
            tracer.context = None
            del grad


# ---- shared by the dialects -----------------------------------------------------------------

def hook_label(hp, key) -> str:
    """The user's hook function as a readable name (TL wraps it in ``full_hook``)."""
    for handle in getattr(hp, "fwd_hooks", []):
        if getattr(handle.hook, "id", None) == key and handle.user_hook is not None:
            fn = handle.user_hook
            if isinstance(fn, functools.partial):
                return f"partial({getattr(fn.func, '__qualname__', fn.func)!s})"
            return getattr(fn, "__qualname__", None) or repr(fn)
    return "hook"


def stamp_token_shape(hook_dict: dict, batch: int, seq: int) -> None:
    """Some TL hook conversions need the live (batch, seq) to show a hook the shape it sees
    locally: OPT's blocks flatten tokens to (batch*seq, d) around the MLP, and TL's block
    forward stamps (batch, seq) on those hook points' conversions so hooks get
    (batch, seq, d). Here the block's forward runs on the server, so the stamp is made
    before tracing, as the block would make it."""
    for hp in hook_dict.values():
        conversion = getattr(hp, "hook_conversion", None)
        if conversion is not None and hasattr(conversion, "batch_seq"):
            conversion.batch_seq = (batch, seq)


def check_served(hook_dict: dict, info: RemoteModelInfo) -> None:
    """Refuse, before anything is sent, hooks on hook points that fire in the server's forward
    but that it cannot run hooks on as they run locally (the manifest says why)."""
    for name, hp in hook_dict.items():
        if not hooked(hp):
            continue
        reason = info.unserved_reason(getattr(hp, "name", None) or name) or \
            info.unserved_reason(name)
        if reason is not None:
            raise SiteNotServed(f"a hook on {name!r} cannot run remotely: {reason}. Hook a "
                                "neighbouring site instead, or run this model locally",
                                site=name)


def token_layout(out, x, hp):
    """TL's OPT conversion reverts what a hook returns to the flattened (batch*seq, d) layout
    even at hook points whose activation is (batch, seq, d), and locally torch then carries
    the flattened tensor on (the values are the same). On the server the write keeps the
    site's own layout: the same elements, reshaped."""
    if getattr(hp, "hook_conversion", None) is None or not isinstance(out, torch.Tensor) or \
            out.dtype != x.dtype or out.dim() == x.dim():
        return out
    shape, got = tuple(x.shape), tuple(out.shape)
    flat = (shape[0] * shape[1],) + shape[2:] if len(shape) >= 2 else None
    if got == flat or (len(got) >= 2 and (got[0] * got[1],) + got[2:] == shape):
        return out.reshape(shape)
    return out


def check_replacement(out, x, name: str) -> None:
    """What hooks on ``name`` returned must be a tensor like the value they were given."""
    if not isinstance(out, torch.Tensor):
        raise TraceError(f"a hook on {name!r} returned a {type(out).__name__}; return a "
                         "tensor or None")
    if type(out) is Proxy and type(x) is Proxy and out._hw_key[1:3] == x._hw_key[1:3]:
        return  # same shape and dtype (read from the proxy's cached key: no torch dispatch)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise TraceError(f"a hook on {name!r} returned a tensor of shape "
                         f"{tuple(out.shape)} {out.dtype}; the activation is {tuple(x.shape)} "
                         f"{x.dtype}")


def served_stop_site(info: RemoteModelInfo, name: str, stop_at_layer) -> str:
    """``name``, if the server's model has that site (else a clear error)."""
    if (name, 0) not in info.site_index:
        raise HookwireError(f"stop_at_layer={stop_at_layer}: the server's model has no site "
                            f"{name!r}")
    return name


@contextlib.contextmanager
def hooks_parked(model):
    """The model's TL hooks taken off meanwhile (put back after): a model object hosted by a
    server in this very process must not fire the traced hooks on the server's forward."""
    parked = []
    for hp in cached_hook_points(model).values():
        for attr in ("_forward_hooks", "_backward_hooks"):
            hooks = getattr(hp, attr)
            if hooks:
                parked.append((hp, attr, hooks))
                setattr(hp, attr, type(hooks)())
    try:
        yield
    finally:
        for hp, attr, hooks in parked:
            setattr(hp, attr, hooks)


__all__ = ["trace_hook_points", "trace_backward_hooks", "Dialect", "BridgeDialect",
           "cached_hook_points", "hook_label", "check_served", "stamp_token_shape",
           "token_layout", "check_replacement", "served_stop_site", "hooks_parked",
           "StopAtLayerException"]
