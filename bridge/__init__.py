"""hookwire: run TransformerLens hooks, pyvene configs, HF module hooks and NNsight code
against a shared model on a server -- as data (a safe intervention graph), never as code.

This package (folder ``bridge/``) is the core shared by client and server: the graph IR,
op registry, validation, executor, protocol, frames, client and tracer. The fronts are
``hookwire.transformerlens``, ``hookwire.pyvene``, ``hookwire.hf`` and ``hookwire.nnsight``;
the server is ``hookwire.server``. The architecture: docs/design.md."""
__version__ = "0.1.0"

from hookwire.client import configure  # noqa: E402
from hookwire.random import rand_like, randn_like  # noqa: E402
from hookwire.runs import gather  # noqa: E402
from hookwire.errors import (ExecutionError, GraphValidationError, HookwireError,  # noqa: E402
                             LimitExceeded, ProtocolError, TraceError)

__all__ = ["configure", "gather", "randn_like", "rand_like", "HookwireError", "TraceError", "GraphValidationError", "LimitExceeded",
           "ProtocolError", "ExecutionError", "__version__"]
