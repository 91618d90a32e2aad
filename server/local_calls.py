"""Local forwards on a hosted object wait for the served ones.

The embedded server can host the caller's own TL bridge (``hookwire.server.start(models=
{"name": bridge})``), and the caller may keep using that object locally, on another thread,
while the server runs requests on it. TransformerLens keeps per-call state on the bridge's
modules: each block's ``ln1`` pre-hook stores the block's input on the attention module and
the attention reads it back. Two forwards running at once on one bridge can therefore read
each other's residual, so a local forward beside a served one could return another
request's rows.

The worker runs the model with ``model_lock`` held. Each block of the bridge gets a forward
pre-hook, placed first, that takes the same lock, and a forward hook that runs even when the
block raises (``always_call``) to give it back: a local forward started while a served one
runs waits at its first block (and a served batch waits for a local block to finish),
instead of racing it. The worker's own thread already holds the lock (an ``RLock``).
Per block, not per call of the whole object: a call of the object that the TL adapter
redirects to the server (``hooks(..., remote=True)``) runs no block here, so it holds
nothing while the server runs it.
"""
from __future__ import annotations

import threading

import torch


class LocalCallsWait:
    """Installed on one module (``install``: a block of a hosted bridge), removed when the
    server stops (``remove``): while installed, each call of the module holds ``lock``."""

    def __init__(self, module: torch.nn.Module, lock):
        self.module, self.lock = module, lock
        self._held = threading.local()  # how many calls on this thread hold the lock
        self._handles: list = []

    def install(self) -> "LocalCallsWait":
        # First among the pre-hooks, so no other hook runs before the lock is held; the
        # release runs even if the forward (or a later hook) raises.
        self._handles = [
            self.module.register_forward_pre_hook(self._take, prepend=True),
            self.module.register_forward_hook(self._give_back, always_call=True),
        ]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _take(self, module, args):
        self.lock.acquire()
        self._held.depth = getattr(self._held, "depth", 0) + 1

    def _give_back(self, module, args, output):
        # A pre-hook placed before ours that raised means ours never took the lock.
        if getattr(self._held, "depth", 0) > 0:
            self._held.depth -= 1
            self.lock.release()




def local_calls_wait(bridge, lock) -> list[LocalCallsWait]:
    """Install the wait on each block of a hosted TL bridge (none if it has no blocks)."""
    blocks = getattr(bridge, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList):
        return []
    return [LocalCallsWait(block, lock).install() for block in blocks]


__all__ = ["LocalCallsWait", "local_calls_wait"]
