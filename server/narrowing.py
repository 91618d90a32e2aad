"""A narrowing write narrows everything the forward carries per row, not just the site.

``site.write(mode="narrow")`` replaces a module site's value by its first k batch rows, and the
rest of the forward runs on those rows (pyvene's source rows leave the batch after the last
layer that reads them). But the module that runs the layer loop -- the *caller* of the
narrowed module, e.g. ``GPT2Model`` for ``transformer.h.3`` -- built some per-row values for
the whole batch before the loop and hands the same objects to every later layer: the
attention mask above all (eager attention's additive ``(B, 1, S, S)``, SDPA's boolean mask
when rows are padded, Gemma 2's sliding-window and full masks, flash attention's ``(B, S)``,
flex attention's ``BlockMask``), and per-row position ids or embeddings. A layer after the
narrowing would get a k-row hidden state and a B-row mask ("size of tensor a (k) must match
... (B)"), or, where shapes broadcast, silently mix rows.

So for the rest of the forward, every argument the caller passes to its modules (the layers,
the final norm; and the narrowed module's own other arguments, for an input site) that still
has the full batch along dim 0 is narrowed to its first k rows too -- the same narrowing the
write applied to the site. This is independent of the family and of the attention
implementation, since it acts where the layer loop hands its arguments over. Only tensors of
two or more dims count (a 1-d tensor of length B, e.g. ``cache_position`` when the sequence
length equals the batch, is not per row), and each one is sliced once, so modules that compare
arguments by identity still see one object. Only the caller's direct callees are touched:
inside a layer, tensors are computed from the already narrowed rows.
"""
from __future__ import annotations

import contextlib

import torch

from hookwire.ir.special import SITE_WRITE
from hookwire.module_sites import parse_module_site, site_element

_CONTAINERS = (torch.nn.ModuleList, torch.nn.ModuleDict)


def _caller_path(model: torch.nn.Module, path: str) -> str:
    """The path of the module whose forward calls ``path``: its nearest ancestor that has a
    forward of its own (ModuleList/ModuleDict only hold modules)."""
    parts = path.split(".")
    while parts:
        parts.pop()
        candidate = ".".join(parts)
        if not isinstance(model.get_submodule(candidate), _CONTAINERS):
            return candidate
    return ""


def _is_block_mask(value) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError:  # a torch without flex attention has no such masks either
        return False
    return isinstance(value, BlockMask)


class _State:
    def __init__(self, full_batch: int):
        self.full_batch = full_batch
        self.rows: int | None = None             # k, once the narrowing write happened
        self.slices: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def narrow(self, value):
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2 and value.shape[0] == self.full_batch:
                held = self.slices.get(id(value))
                if held is None or held[0] is not value:
                    held = (value, value[:self.rows])
                    self.slices[id(value)] = held
                return held[1]
            return value
        if _is_block_mask(value) and value.shape[0] == self.full_batch:
            return value[:self.rows]  # flex attention's mask: its mask_mod indexes rows < k
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return tuple(self.narrow(v) for v in value)
        if isinstance(value, list):
            return [self.narrow(v) for v in value]
        return value

    @property
    def active(self) -> bool:
        return self.rows is not None and self.rows != self.full_batch


def _rows_of(value) -> int | None:
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() else None


@contextlib.contextmanager
def narrowed_arguments(model: torch.nn.Module, site: tuple[str, int] | None, full_batch: int):
    """For the forward run inside: after the narrowing write at module site ``site`` (name,
    call), narrow the full-batch arguments the caller passes on (see the module docstring).
    Enter it *after* the graph's own site hooks are attached, so these hooks see the narrowed
    value. ``site=None``: nothing to do."""
    if site is None:
        yield
        return
    name, call = site
    path, kind = parse_module_site(name)
    element = site_element(name)
    narrowed = model.get_submodule(path)
    caller = _caller_path(model, path)
    state = _State(full_batch)
    seen = [0]

    def pre_hook(module, args, kwargs):
        if module is narrowed and kind == "input":
            if seen[0] == call:
                value = args[0] if args else next(
                    (v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
                state.rows = _rows_of(value)
            seen[0] += 1
        if not state.active:
            return None
        return state.narrow(tuple(args)), {k: state.narrow(v) for k, v in kwargs.items()}

    def post_hook(module, args, output):
        if seen[0] == call:
            value = output[element] if isinstance(output, tuple) and len(output) > element \
                else (output if element == 0 else None)
            state.rows = _rows_of(value)
        seen[0] += 1

    handles = []
    try:
        for module_path, module in model.named_modules():
            if not module_path or isinstance(module, _CONTAINERS):
                continue
            if module is narrowed or _caller_path(model, module_path) == caller:
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if kind == "output":
            handles.append(narrowed.register_forward_hook(post_hook))
        yield
    finally:
        for h in handles:
            h.remove()


def narrowing_site(vg) -> tuple[str, int] | None:
    """(site name, call) of a validated graph's narrowing write, if it has one."""
    for dn in vg.nodes:
        if dn.op == SITE_WRITE and dn.mode == "narrow":
            info = vg.site_infos[dn.site]
            return info.name, info.call
    return None


__all__ = ["narrowed_arguments", "narrowing_site"]
