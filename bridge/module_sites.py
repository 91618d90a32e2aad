"""HF module sites: graph sites that address a module of the hosted HF model by its path.

Naming scheme (what a graph's ``Site.name`` holds; ``Site.call`` picks the k-th call of a
module that runs more than once in one forward)::

    hf:<module path>:output    what the module returns (forward hook)
    hf:<module path>:output.<i>  element i >= 1 of a tuple the module returns
    hf:<module path>:input     its first input (forward *pre*-hook)

``<module path>`` is the module's dotted name in the plain HF model, exactly as
``model.named_modules()`` spells it (``transformer.h.1.mlp``, ``model.layers.0.mlp.act_fn``,
``lm_head``). The value at a site is always one tensor:

* a module returning a tuple (GPT-2 and Llama blocks, attention modules) exposes element 0
  (the hidden states, which is what pyvene and most HF hooks intervene on); writing the site
  replaces element 0 and keeps the rest of the tuple. The other tensor elements are sites
  ``output.<i>`` of their own, which fire just *before* element 0's (so a hook that sees the
  whole tuple, as torch hooks do, can compute element 0 from the others);
* an input site is the first positional argument, or the first tensor keyword argument when
  the module is called with keywords only (as pyvene reads it).

These sites live in the plain HF forward, TL hook points in the TL bridge's forward: one graph
uses one kind or the other. Servers list the module sites that fire with a tensor in their
manifest, after the TL hook points.
"""
from __future__ import annotations

import contextlib
import threading

import torch

PREFIX = "hf:"
KINDS = ("output", "input")


class ServerObject:
    """Stands in, on a client, for a value a module gets or returns on the server that is no
    module site (a KV cache, a tensor argument such as ``position_ids``): pass it on
    unchanged."""

    def __init__(self, type_name: str):
        self.type_name = type_name

    def __repr__(self):
        return f"<{self.type_name} on the server>"


def module_site(path: str, kind: str = "output", element: int = 0) -> str:
    if kind not in KINDS:
        raise ValueError(f"a module site is an 'output' or an 'input', not {kind!r}")
    if element:
        if kind != "output" or element < 0:
            raise ValueError("only outputs have elements (tuple positions >= 1)")
        return f"{PREFIX}{path}:output.{element}"
    return f"{PREFIX}{path}:{kind}"


def _split_kind(kind: str) -> tuple[str, int]:
    """'output' -> ('output', 0); 'output.2' -> ('output', 2); anything else: ValueError."""
    base, dot, element = kind.partition(".")
    if base not in KINDS or (dot and (base != "output" or not element.isdigit()
                                      or element.startswith("0"))):
        raise ValueError(f"a module site ends in ':output', ':output.<i>' or ':input', "
                         f"not {kind!r}")
    return base, int(element) if dot else 0


def is_module_site(name: str) -> bool:
    return name.startswith(PREFIX)


def parse_module_site(name: str) -> tuple[str, str]:
    """``hf:transformer.h.1:output`` -> ("transformer.h.1", "output")."""
    if not is_module_site(name):
        raise ValueError(f"{name!r} is not a module site (no {PREFIX!r} prefix)")
    path, _, kind = name[len(PREFIX):].rpartition(":")
    return path, _split_kind(kind)[0]


def site_element(name: str) -> int:
    """Which element of a tuple output a module site holds (0 for plain outputs, inputs)."""
    return _split_kind(name[len(PREFIX):].rpartition(":")[2])[1]


def _first_tensor_kwarg(kwargs: dict):
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            return key
    return None


def attach(module: torch.nn.Module, name: str, hook):
    """Register ``hook(module, args, value) -> replacement | None`` at a site.

    For TL hook points (plain names) this is ``register_forward_hook``. For module sites the
    hook sees one tensor (see the module docstring) and its replacement is put back where that
    tensor came from.

    The hook fires only in forwards run by the owner that attached it (``current_owner``: the
    thread, or a forward nested on it with ``owned_by``): a served model object may be used
    locally by another thread of the same process meanwhile (the embedded server hosts the
    caller's own object), and that forward must not run a request's graph; nor may a short
    request the server runs between two blocks of a long one."""
    hook = _on_this_thread_only(hook)
    if not is_module_site(name):
        return module.register_forward_hook(hook)
    _, kind = parse_module_site(name)
    element = site_element(name)
    if kind == "input":
        def pre_hook(mod, args, kwargs):
            key = None if args else _first_tensor_kwarg(kwargs)
            value = args[0] if args else kwargs.get(key) if key is not None else None
            result = hook(mod, args, value)
            if result is None:
                return None
            if args:
                return (result,) + tuple(args[1:]), kwargs
            return args, {**kwargs, key: result}
        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    if element:
        def element_hook(mod, args, output):
            if not isinstance(output, (tuple, list)) or len(output) <= element:
                return hook(mod, args, None)  # the interleaver reports "no tensor"
            result = hook(mod, args, output[element])
            if result is None:
                return None
            return _replaced(output, element, result)
        return module.register_forward_hook(element_hook)

    def post_hook(mod, args, output):
        if isinstance(output, (tuple, list)) and output:
            result = hook(mod, args, output[0])
            return None if result is None else _replaced(output, 0, result)
        return hook(mod, args, output)
    return module.register_forward_hook(post_hook)


_OWNERS = threading.local()  # per thread: the stack of forwards nested on it (owned_by)


def current_owner():
    """Who owns the forward running on this thread now: the innermost ``owned_by`` token,
    else the thread itself. Hooks attached for one owner fire only while it is current."""
    stack = getattr(_OWNERS, "stack", None)
    return stack[-1] if stack else ("thread", threading.get_ident())


@contextlib.contextmanager
def owned_by(token):
    """Run a forward nested inside another one on this thread (a server giving way to a
    short request between two blocks of a long one): hooks attached inside fire for it,
    and the hooks of the forward it interrupts stay silent until it returns."""
    stack = getattr(_OWNERS, "stack", None)
    if stack is None:
        stack = _OWNERS.stack = []
    stack.append(token)
    try:
        yield
    finally:
        stack.pop()


def _on_this_thread_only(hook):
    owner = current_owner()

    def guarded(mod, args, value):
        if current_owner() != owner:
            return None
        return hook(mod, args, value)
    return guarded


def _replaced(output, element: int, value):
    """``output`` (a tuple, or a list: GPT-1's blocks return one) with one element replaced."""
    items = list(output)
    items[element] = value
    return items if isinstance(output, list) else tuple(items)


def site_value(output):
    """The tensor a module site exposes for a module's return value (None if none)."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, torch.Tensor) else None


def element_values(output) -> list[tuple[int, torch.Tensor]]:
    """(element, tensor) for the tensor elements >= 1 of a tuple (or list) output, in the
    order their sites fire: last element first, element 0's site after all of them."""
    if not isinstance(output, (tuple, list)):
        return []
    return [(i, output[i]) for i in range(len(output) - 1, 0, -1)
            if isinstance(output[i], torch.Tensor)]


__all__ = ["PREFIX", "ServerObject", "module_site", "is_module_site", "parse_module_site",
           "site_element", "attach", "site_value", "element_values", "current_owner",
           "owned_by"]
