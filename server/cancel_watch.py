"""Stopping a forward that nobody waits for any more, between two blocks of the model.

A request's graph is checked for cancellation, a closed connection and its wall-time limit
at each of its own sites. A forward with no sites (``model(tokens)`` with no hooks) or few
of them would otherwise run to the end after the client pressed Ctrl-C. So while a forward
runs, a pre-hook on every block of the model asks ``should_stop()`` and raises what it
returns: the forward ends at the next block boundary -- or sooner, at the points inside a
block given as ``also_after`` (a hook after each of those modules asks too).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from hookwire.module_sites import current_owner


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's blocks: a TL bridge's ``blocks``, else the longest ``ModuleList`` in it
    (``transformer.h``, ``model.layers``...)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
        return list(blocks)
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


@contextlib.contextmanager
def stop_between_blocks(model: torch.nn.Module,
                        should_stop: Callable[[], BaseException | None],
                        also_after: Iterable[torch.nn.Module] = ()):
    owner = current_owner()

    def check(module, args, output=None):
        if current_owner() != owner:  # another thread's forward, or one nested in this one
            return
        exc = should_stop()
        if exc is not None:
            raise exc

    handles = [block.register_forward_pre_hook(check) for block in block_modules(model)]
    handles += [module.register_forward_hook(check) for module in also_after]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["stop_between_blocks", "block_modules"]
