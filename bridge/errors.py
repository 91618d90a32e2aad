"""Typed errors. Each has a stable ``code`` that travels in protocol ``error`` messages, so a
client re-raises the same type the server raised."""
from __future__ import annotations


class HookwireError(Exception):
    code = "hookwire_error"

    def __init__(self, message: str, **details):
        super().__init__(message)
        self.message = message
        self.details = details


class TraceError(HookwireError):
    """A hook did something that cannot become a graph (raised on the client, before sending)."""
    code = "trace_error"


class ProtocolError(HookwireError):
    """A message or frame that does not follow the wire protocol."""
    code = "protocol_error"


class FrameError(ProtocolError):
    code = "frame_error"


class GraphValidationError(HookwireError):
    """The server refused a graph before running it; names the node and the rule."""
    code = "graph_invalid"


class LimitExceeded(GraphValidationError):
    code = "limit_exceeded"


class UnknownModel(HookwireError):
    code = "unknown_model"


class UnsupportedModel(ProtocolError):
    """A model hookwire does not serve (its architecture, or a front it lacks: e.g. a base
    model without an LM head has no TransformerLens bridge); the message says why."""
    code = "unsupported_model"


class SiteNotServed(HookwireError):
    """A hook names a site that fires in the model's forward but that the server cannot run
    hooks on as they run locally (raised before anything is sent; the message says why)."""
    code = "site_not_served"


class ExecutionError(HookwireError):
    """An op failed while the model ran."""
    code = "execution_error"


class Cancelled(HookwireError):
    """The request was cancelled (by its client) before it finished."""
    code = "cancelled"


class QueueFull(LimitExceeded):
    """This user already has as many requests queued as the server allows."""
    code = "queue_full"


class DeadlineExceeded(HookwireError):
    """The request ran longer than the server's wall-time limit and was stopped."""
    code = "deadline_exceeded"


class TooManyConnections(HookwireError):
    """This user already holds as many connections as the server allows (HTTP 429)."""
    code = "too_many_connections"


class ResidentMissing(HookwireError):
    """A request referred to a value the server no longer holds (expired, evicted, or never
    this user's). The client re-sends the bytes; users rarely see this."""
    code = "resident_missing"


class AuthError(HookwireError):
    code = "auth_error"


class ServerUnavailable(HookwireError):
    code = "server_unavailable"


class ServerShuttingDown(ServerUnavailable):
    """The server stopped before running the request; retry against it once it is back."""
    code = "server_shutting_down"


class ReplicaLost(ServerUnavailable):
    """The model replica running the request stopped (a Ray engine server); the request may
    be sent again."""
    code = "replica_lost"


ERROR_TYPES = {cls.code: cls for cls in (
    HookwireError, TraceError, ProtocolError, FrameError, GraphValidationError, LimitExceeded,
    UnknownModel, UnsupportedModel, SiteNotServed, ExecutionError, Cancelled,
    ResidentMissing, AuthError, ServerUnavailable,
    QueueFull, DeadlineExceeded, TooManyConnections, ServerShuttingDown,
    ReplicaLost)}


def error_from_code(code: str, message: str, details: dict | None = None) -> HookwireError:
    cls = ERROR_TYPES.get(code, HookwireError)
    return cls(message, **(details or {}))
