"""hookwire.transformerlens: importing it makes ``run_with_hooks(..., remote=True)`` work on
TL ``TransformerBridge`` and ``HookedRootModule`` models."""
from __future__ import annotations

import functools

from hookwire.transformerlens.remote_run import run_remote
from hookwire.transformerlens.stand_in import RemoteModel


def _patch(cls) -> None:
    original = cls.run_with_hooks
    if getattr(original, "_hookwire_patched", False):
        return

    @functools.wraps(original)
    def run_with_hooks(self, input, *args, remote=None, remote_model=None, **kwargs):
        if remote is None:
            remote = getattr(self, "_hookwire_remote", None) is not None
        if not remote:
            return original(self, input, *args, **kwargs)
        return run_remote(self, input, *args, remote=remote, remote_model=remote_model,
                          **kwargs)

    run_with_hooks._hookwire_patched = True
    cls.run_with_hooks = run_with_hooks


def install() -> None:
    from transformer_lens.model_bridge import TransformerBridge

    _patch(TransformerBridge)
    try:
        from transformer_lens.hook_points import HookedRootModule
    except ImportError:  # pragma: no cover - very old TL
        return
    _patch(HookedRootModule)


install()

__all__ = ["RemoteModel", "run_remote", "install"]
