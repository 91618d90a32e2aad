"""hookwire.transformerlens: importing it makes ``run_with_hooks(..., remote=True)`` and
``run_with_cache(..., remote=True)`` work on TL ``TransformerBridge`` and
``HookedRootModule`` models.

TL's own methods still do all the TL work (resolving names and aliases, filters, caching
keys, ``hooks()`` contexts, ``reset_hooks_end``, ``clear_contexts``); only the model's
forward is routed to the server, where the hooks run as a traced graph."""
from __future__ import annotations

import functools
import threading

from hookwire.errors import HookwireError
from hookwire.runs import RemoteRun
from hookwire.transformerlens.remote_run import (RemoteTarget, forward_goes_remote,
                                                 remote_forward)
from hookwire.transformerlens.stand_in import RemoteModel

_REMOTE_METHODS = ("run_with_hooks", "run_with_cache")


def _patch(cls, method_name: str) -> None:
    original = getattr(cls, method_name, None)
    if original is None or getattr(original, "_hookwire_patched", False):
        return

    @functools.wraps(original)
    def method(self, *args, remote=None, remote_model=None, progress=None, blocking=True,
               **kwargs):
        stand_in = getattr(self, "_hookwire_remote", None)
        if remote is None:
            remote = stand_in is not None
        if not remote:
            if stand_in is not None:
                raise HookwireError("a RemoteModel has no weights to run locally; "
                                    "use remote=True (the default for it)")
            return original(self, *args, **kwargs)
        base = stand_in or {}
        target = RemoteTarget(url=remote if isinstance(remote, str) else base.get("url"),
                              api_key=base.get("api_key"),
                              model=remote_model or base.get("model"), progress=progress)
        if blocking:
            with forward_goes_remote(self, target):
                return original(self, *args, **kwargs)
        # Non-blocking: TL's method runs in the background; the caller waits only for the
        # tracing, so trace errors still surface here, then gets the RemoteRun handle.
        target.traced = threading.Event()

        def work(run):
            target.run = run
            with forward_goes_remote(self, target):
                return original(self, *args, **kwargs)
        run = RemoteRun(work).start()
        run.wait_until_traced(target.traced)
        return run

    method._hookwire_patched = True
    setattr(cls, method_name, method)


def install() -> None:
    from transformer_lens.model_bridge import TransformerBridge

    for name in _REMOTE_METHODS:
        _patch(TransformerBridge, name)
    try:
        from transformer_lens.hook_points import HookedRootModule
    except ImportError:  # pragma: no cover - very old TL
        return
    for name in _REMOTE_METHODS:
        _patch(HookedRootModule, name)


install()

__all__ = ["RemoteModel", "remote_forward", "install"]
