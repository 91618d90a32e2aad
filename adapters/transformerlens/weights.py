"""Weights for a weightless stand-in (``RemoteModel``), on request.

The stand-in has meta tensors for weights: its forwards run on the server, but analysis code
also reads weights locally -- ``model.W_U``, ``model.OV``, ``cache.accumulated_resid(
apply_ln=True)`` (which runs ``ln_final``). Two things here:

* :func:`fetch_weights` copies named parameters from the server into the stand-in (bounded:
  ``max_bytes`` on this side, ``Limits.max_weight_bytes`` per request on the server's);
* :func:`guard_weightless` makes every read of a weight that is still missing fail with a
  :class:`WeightsNotFetched` error that names the weight and says how to fetch it, instead
  of torch's raw meta-device errors (or a meta tensor silently flowing on).
"""
from __future__ import annotations

import functools
import re

import torch

from hookwire.client import get_connection
from hookwire.errors import HookwireError, LimitExceeded

DEFAULT_MAX_BYTES = 1 << 30
_WEIGHT_PROPERTY = re.compile(r"^(W_|b_)|^(OV|QK)$")


class WeightsNotFetched(HookwireError):
    """A weightless stand-in's weight was read before it was fetched from the server."""
    code = "weights_not_fetched"


def _stand_in(model) -> dict:
    remote = getattr(model, "_hookwire_remote", None)
    if remote is None:
        raise HookwireError("fetch_weights is for weightless stand-ins "
                            "(hookwire.transformerlens.RemoteModel); this model has weights")
    return remote


def _resolve(model, names) -> list[str]:
    """Parameter names (as ``model.named_parameters()`` gives them) for ``names``: parameter
    names, or module paths of the model (``"unembed"``, ``"blocks.0.attn"``, ``"ln_final"``)
    meaning every parameter under that module. None: every parameter."""
    params = dict(model.named_parameters())
    if names is None:
        return list(params)
    if isinstance(names, str):
        names = [names]
    by_id = {id(p): n for n, p in params.items()}
    out = []
    for name in names:
        if name in params:
            out.append(name)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise HookwireError(f"{name!r} is neither a parameter nor a module of the model "
                                "(see model.named_parameters() / model.named_modules())"
                                ) from None
        found = [by_id[id(p)] for p in module.parameters() if id(p) in by_id]
        if not found:
            raise HookwireError(f"module {name!r} has no parameters")
        out.extend(found)
    return list(dict.fromkeys(out))


def fetch_weights(model, names=None, max_bytes: int = DEFAULT_MAX_BYTES) -> list[str]:
    """Copy parameters of the server's model into the weightless stand-in ``model``.

    ``names``: parameter names or module paths (``"unembed"`` for ``model.W_U``,
    ``"ln_final"`` for ``accumulated_resid(apply_ln=True)``, ``"blocks.3.attn"``...); None
    fetches everything. Parameters already here are skipped. Refused before anything is sent
    if they add up to more than ``max_bytes``. Returns the names fetched."""
    remote = _stand_in(model)
    params = dict(model.named_parameters())
    wanted = [n for n in _resolve(model, names) if params[n].is_meta]
    total = sum(params[n].numel() * params[n].element_size() for n in wanted)
    if total > max_bytes:
        raise LimitExceeded(f"fetching {len(wanted)} parameters means {total} bytes; "
                            f"max_bytes={max_bytes} (raise it, or fetch fewer modules)",
                            rule="max_bytes")
    if not wanted:
        return []
    conn = get_connection(remote["url"], remote["api_key"])
    values = {}
    server_limit = None
    # In parts the server accepts (it refuses more than its max_weight_bytes at once).
    for part in _parts(wanted, params, server_limit):
        values.update(conn.fetch_weights(remote["model"], part).values)
    _install(model, {n: values[n] for n in wanted})
    return wanted


def _parts(names, params, limit):
    part, size = [], 0
    chunk = limit or (1 << 30)
    for name in names:
        nbytes = params[name].numel() * params[name].element_size()
        if part and size + nbytes > chunk:
            yield part
            part, size = [], 0
        part.append(name)
        size += nbytes
    if part:
        yield part


def _install(model, values: dict) -> None:
    """Put the fetched tensors in place of the meta parameters, wherever each meta parameter
    object is held (tied weights stay tied)."""
    params = dict(model.named_parameters())
    replacement = {}
    for name, value in values.items():
        old = params[name]
        if tuple(value.shape) != tuple(old.shape) or value.dtype != old.dtype:
            raise HookwireError(f"the server sent {name!r} as {tuple(value.shape)} "
                                f"{value.dtype}; the stand-in has {tuple(old.shape)} "
                                f"{old.dtype}")
        replacement[id(old)] = torch.nn.Parameter(value, requires_grad=old.requires_grad)
    for module in model.modules():
        for key, param in list(module._parameters.items()):
            if param is not None and id(param) in replacement:
                module._parameters[key] = replacement[id(param)]
    original = getattr(model, "original_model", None)  # not a registered submodule
    if isinstance(original, torch.nn.Module):
        for module in original.modules():
            for key, param in list(module._parameters.items()):
                if param is not None and id(param) in replacement:
                    module._parameters[key] = replacement[id(param)]


# ---- errors that say what to do ----------------------------------------------------------

def _advice(model_name: str, what: str, module: str | None, fetchable: bool = True) -> str:
    if not fetchable:  # a TL 2.x stand-in: its parameters are not named as the server's
        return (f"{what} of the weightless stand-in {model_name!r} has no values here (its "
                "weights stay on the server). Read weights from a local HookedTransformer "
                "with the server's weights (from_pretrained_no_processing) and run that one "
                f"with remote=True, remote_model={model_name!r}")
    which = f"[{module!r}]" if module else "[...]"
    return (f"{what} of the weightless stand-in {model_name!r} has no values here (its "
            f"weights stay on the server). Fetch them first with "
            f"hookwire.transformerlens.fetch_weights(model, {which}) (bounded by max_bytes), "
            "or read weights from a local model with weights and run it with remote=True")


def _module_of(model, attr: str) -> str | None:
    if attr in ("W_U", "b_U"):
        return "unembed"
    if attr in ("W_E",):
        return "embed"
    if attr in ("W_pos",):
        return "pos_embed"
    return "blocks"


class MissingWeight(torch.Tensor):
    """A weight the stand-in does not have: its shape and dtype can be read; computing with
    it raises :class:`WeightsNotFetched`."""

    @staticmethod
    def __new__(cls, meta: torch.Tensor, message: str):
        t = torch.Tensor._make_wrapper_subclass(cls, meta.shape, strides=meta.stride(),
                                                dtype=meta.dtype, device="meta")
        t._hw_message = message
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        from hookwire.trace import METADATA_CALLS

        if func in METADATA_CALLS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        message = next((a._hw_message for a in args if isinstance(a, MissingWeight)),
                       "a weight of a weightless stand-in has no values here")
        raise WeightsNotFetched(message)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise WeightsNotFetched("a weight of a weightless stand-in has no values here")

    def __repr__(self):
        return f"MissingWeight(shape={tuple(self.shape)}, dtype={self.dtype})"


@functools.lru_cache(maxsize=None)
def _guarded_class(cls, fetchable: bool = True):
    """``cls`` with its weight properties (``W_U``, ``b_in``, ``OV``...) returning a
    :class:`MissingWeight` (or raising) where the weights are still on the meta device."""
    overrides = {}
    for attr in dir(cls):
        prop = getattr(cls, attr, None)
        if not isinstance(prop, property) or not _WEIGHT_PROPERTY.match(attr):
            continue

        def fget(self, _prop=prop, _attr=attr):
            # The stand-in itself (``model.W_U``), or one of its components
            # (``model.blocks[0].attn.W_O``: guarded with its path, the module to fetch).
            remote = getattr(self, "_hookwire_remote", None)
            if remote is not None:
                name, what, module = remote["model"], f"model.{_attr}", _module_of(self, _attr)
            else:
                name, path = self._hookwire_weights_of
                what, module = f"model.{path}.{_attr}", path
            try:
                value = _prop.fget(self)
            except (NotImplementedError, RuntimeError) as exc:
                if "meta" not in str(exc):
                    raise
                raise WeightsNotFetched(_advice(name, what, module, fetchable)) from None
            if isinstance(value, torch.Tensor) and value.is_meta:
                return MissingWeight(value, _advice(name, what, module, fetchable))
            return value
        overrides[attr] = property(fget, prop.fset, prop.fdel, prop.__doc__)
    return type(cls.__name__, (cls,), {**overrides, "__module__": cls.__module__,
                                        "__qualname__": cls.__qualname__})


def guard_weightless(model, name: str, fetchable: bool = True) -> None:
    """Make reads of missing weights on the stand-in ``model`` fail with advice: its weight
    properties, and any module of it run on real tensors while its own weights are meta
    (e.g. ``ln_final`` inside ``accumulated_resid(apply_ln=True)``)."""
    model.__class__ = _guarded_class(type(model), fetchable)
    paths = {id(m): p for p, m in model.named_modules()}
    shortest: dict = {}  # a TL component is registered under several paths: its TL one
    for path, module in model.named_modules(remove_duplicate=False):
        if path and (id(module) not in shortest or
                     len(path) < len(shortest[id(module)][0])):
            shortest[id(module)] = (path, module)
    for path, module in shortest.values():
        # Components' own weight properties (an attention's W_O, OV) too: TL's message for
        # them says to load real weights, not how to fetch them.
        if any(_WEIGHT_PROPERTY.match(a) and isinstance(getattr(type(module), a, None),
                                                                  property)
                        for a in dir(type(module))):
            module._hookwire_weights_of = (name, path)
            module.__class__ = _guarded_class(type(module), fetchable)

    def check(module, args, kwargs):
        # Under it: a TL component's weights live in its wrapped original module, which it
        # may read without calling (NormalizationBridge multiplies by ``.weight``).
        if not any(p.is_meta for p in module.parameters()):
            return None
        real = [a for a in list(args) + list(kwargs.values())
                if isinstance(a, torch.Tensor) and not a.is_meta
                and type(a).__name__ != "Proxy"]
        if real:
            raise WeightsNotFetched(_advice(name, f"module {paths.get(id(module), '?')!r}",
                                            _owner_path(paths, module, model), fetchable))
        return None

    from transformer_lens.hook_points import HookPoint

    for module in model.modules():
        # Not the model itself: its forward always runs on the server.
        if module is not model and not isinstance(module, HookPoint) and \
                next(module.parameters(), None) is not None:
            module.register_forward_pre_hook(check, with_kwargs=True)


def _owner_path(paths: dict, module, model) -> str | None:
    """The shortest TL component path above ``module`` (what fetch_weights takes)."""
    path = paths.get(id(module))
    if path is None:
        return None
    parts = path.split("._original_component")[0]
    return parts or None


__all__ = ["fetch_weights", "guard_weightless", "WeightsNotFetched", "MissingWeight"]
