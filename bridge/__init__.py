"""hookwire: run TransformerLens hooks, pyvene configs and HF module hooks against a shared
model on a server -- as data (a safe intervention graph), never as code."""
__version__ = "0.1.0"

from hookwire.client import configure  # noqa: E402
from hookwire.random import rand_like, randn_like  # noqa: E402
from hookwire.errors import (ExecutionError, GraphValidationError, HookwireError,  # noqa: E402
                             LimitExceeded, ProtocolError, TraceError)

__all__ = ["configure", "randn_like", "rand_like", "HookwireError", "TraceError", "GraphValidationError", "LimitExceeded",
           "ProtocolError", "ExecutionError", "__version__"]
