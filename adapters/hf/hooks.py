"""Which hook goes where: the keys of ``hooks={...}`` and ``modules=[...]``.

A key names a module of the HF model by its dotted path, as ``model.named_modules()`` spells
it, with an optional kind and call index::

    "transformer.h.1.mlp"            forward hook   fn(module, args, output) -> output | None
    "transformer.h.1.mlp:output"     the same
    "transformer.h.1.mlp:input"      forward pre-hook   fn(module, args) -> args | None
    "transformer.h.1.mlp@1"          only the module's second call in a forward (a module
                                     that runs several times); without "@k": every call,
                                     as a hook registered with torch fires on every call

A value is one function or a list of them (run in order, as hooks registered in that order).
The same parsing serves the remote model and the local one, so both accept the same keys.
"""
from __future__ import annotations

from dataclasses import dataclass

from hookwire.errors import HookwireError

KINDS = ("output", "input")


@dataclass(frozen=True)
class HookKey:
    path: str
    kind: str               # "output" (forward hook) or "input" (pre-hook)
    call: int | None        # None: every call

    @property
    def label(self) -> str:
        call = "" if self.call is None else f"@{self.call}"
        return f"{self.path}:{self.kind}{call}"


def parse_key(key: str) -> HookKey:
    if not isinstance(key, str) or not key:
        raise HookwireError(f"a hook key is a module path string, not {key!r}")
    rest, at, call = key.partition("@")
    if at and not call.isdigit():
        raise HookwireError(f"hook key {key!r}: the call index after '@' must be a number")
    path, colon, kind = rest.rpartition(":")
    if not colon:
        path, kind = rest, "output"
    if kind not in KINDS:
        raise HookwireError(f"hook key {key!r}: the kind after ':' is 'output' or 'input'")
    return HookKey(path, kind, int(call) if at else None)


def module_of(model, key: HookKey):
    """The submodule a key names (the root model itself has no path and is not hookable)."""
    try:
        module = model.get_submodule(key.path) if key.path else None
    except AttributeError:
        module = None
    if module is None:
        raise HookwireError(f"{type(model).__name__} has no module {key.path!r} (paths are "
                            "what model.named_modules() lists, e.g. 'transformer.h.0.mlp')")
    return module


def hook_list(hooks: dict | None) -> list[tuple[HookKey, object]]:
    """``{key: fn | [fn, ...]}`` -> [(HookKey, fn)] in the order given."""
    out = []
    for key, fns in (hooks or {}).items():
        parsed = parse_key(key)
        for fn in fns if isinstance(fns, (list, tuple)) else [fns]:
            if not callable(fn):
                raise HookwireError(f"the hook for {key!r} is not callable")
            out.append((parsed, fn))
    return out


__all__ = ["HookKey", "parse_key", "module_of", "hook_list"]
