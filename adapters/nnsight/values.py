"""What a trace block is handed where the server has no module site to read.

* :class:`NotSent` -- a value the server computes but no graph can address (a module that
  returns a ``ModelOutput``, such as ``model.transformer``): any use raises, naming what to
  read instead.
* :class:`PendingTokens` -- token ids a generation chooses on the server (``tracer.result``,
  ``model.generator.output``, ``model.generator.streamer.output``): known only once the run
  is over. They can be saved (and hold the real ids after the block); computing with them
  inside the block raises.
"""
from __future__ import annotations

import torch

from hookwire.errors import TraceError
from hookwire.trace import METADATA_CALLS, trace_error


class NotSent:
    """Stands in for a value of the server's forward that is no module site."""

    def __init__(self, what: str, advice: str):
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_advice", advice)

    def _refuse(self, *_, **__):
        raise trace_error(f"{self._what} (not a tensor the server can send)", self._advice)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._refuse()

    save = __getitem__ = __iter__ = __len__ = __call__ = _refuse

    def __repr__(self):
        return f"<{self._what} on the server>"


class PendingTokens(torch.Tensor):
    """Token ids the server will choose: shape and dtype now, the values after the run."""

    @staticmethod
    def __new__(cls, shape, what: str):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=torch.int64,
                                                device="cpu")
        t._hw_what = what
        return t

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in METADATA_CALLS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        what = next((a._hw_what for a in args if isinstance(a, PendingTokens)), "tokens")
        raise trace_error(f"computing with {what} inside the trace block",
                          "the server chooses the tokens while it runs the block's graphs, "
                          "so they exist only after the run: .save() them and use them after "
                          "the `with` block")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise TraceError("generated tokens are not known while tracing")

    def __repr__(self):
        return f"<{self._hw_what}: {tuple(self.shape)} int64, chosen on the server>"


__all__ = ["NotSent", "PendingTokens"]
