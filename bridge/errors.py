"""Typed errors. Each has a stable ``code`` that travels in protocol ``error`` messages, so a
client re-raises the same type the server raised (:func:`error_from_code`; an unknown code
becomes a plain :class:`HookwireError`). Every error carries ``message`` and ``details``;
graph refusals put ``node``, ``op`` and ``rule`` in ``details`` (``rule`` is a stable name of
the check that failed, listed below; tests and clients may match on it).

The tree (``class`` -- ``code`` -- where it is raised; then its ``rule`` values)::

    HookwireError -- hookwire_error -- base; also an unknown code from a server
    +-- TraceError -- trace_error -- client, while tracing a hook (names file and line)
    +-- ProtocolError -- protocol_error -- either side: a malformed or unexpected message,
    |   |     a bad reference to a resident value, inputs of the wrong dtype/shape
    |   +-- FrameError -- frame_error -- a tensor header or binary chunk frame (frames.py)
    |   +-- UnsupportedModel -- unsupported_model -- at load (families.py, prepare.py), or a
    |         front the model lacks (TL hook points, generation); the message says why
    +-- GraphValidationError -- graph_invalid -- server, before anything runs (the client
    |   |     runs the same checks only to size results, expected_results.py); rules:
    |   |     graph.py    arg_depth arg_form arg_string
    |   |     validate.py unique_id unknown_op op_schema args ref_order const_ref constants
    |   |                 unknown_site site_order site_index site_read_once site_write_once
    |   |                 site_grad_once write_stage write_shape narrow_site narrow_order
    |   |                 output_kind output_read_once grad_without_backward no_grad_site
    |   |                 const_grad_once const_grad_parameter const_grad_dtype
    |   |                 backward_ref backward_stage backward_scalar tuple_get tuple_value
    |   |                 shape_inference save_ref save_value save_dtype
    |   |     server      return_type start_at_layer site_kinds narrow_site input_size
    |   |                 (worker.py); tl_flags (manifest.py: a switch combination TL
    |   |                 refuses); parameter_reads unknown_parameter (constants.py: "@"
    |   |                 constants); generate_model generate_inputs generate_forward
    |   |                 generate_steps site_kinds narrow_site (generation.py)
    |   +-- LimitExceeded -- limit_exceeded -- a Limits bound; rule = the bound:
    |       |     max_nodes input_size max_value_bytes max_transient_bytes
    |       |     max_total_value_bytes max_flops max_saved_bytes (validate.py, protocol.py);
    |       |     max_output_bytes max_forward_bytes (worker.py); max_seq max_positions
    |       |     max_new_tokens max_nodes (generation.py); max_pending_bytes_per_user
    |       |     max_pending_bytes_total (memory.py); max_weight_bytes (weights.py);
    |       |     max_bytes (client side: hookwire.transformerlens.fetch_weights)
    |       +-- QueueFull -- queue_full -- max_queued_per_user (scheduler.py,
    |             ray_engine.py); weights_in_flight (weights.py: one transfer at a time)
    +-- UnknownModel -- unknown_model -- the graph names a model the server does not host
    +-- SiteNotServed -- site_not_served -- client, before sending: a hook (TL, hf, nnsight)
    |     or pyvene component on a site the server's manifest lists as unserved, with why
    +-- ExecutionError -- execution_error -- an op failed mid-forward (only its request)
    |   |     rule: value_range (executor.py: an integer written into a site is out of
    |   |     its table's range)
    |   +-- hookwire.server.index_guard.IndexOutOfRange (also IndexError) -- rule:
    |         value_range (an embedding about to index outside its table)
    +-- Cancelled -- cancelled -- the client cancelled (``RemoteRun.cancel``, Ctrl-C)
    +-- DeadlineExceeded -- deadline_exceeded -- rule: max_request_seconds (worker.py,
    |     generation.py; checked before every node, at every site and block boundary)
    +-- TooManyConnections -- too_many_connections -- HTTP 429 in the handshake: this API
    |     key holds Limits.max_connections_per_user connections (a server holding
    |     Limits.max_connections answers 503: ServerUnavailable)
    +-- ResidentMissing -- resident_missing -- a reference to a value the server dropped;
    |     the client re-sends the bytes (residents.py)
    +-- AuthError -- auth_error -- the server refused the API key (HTTP 401)
    +-- ServerUnavailable -- server_unavailable -- client: no server configured, cannot
        |     connect, HTTP error in the handshake, the connection closed
        +-- ServerShuttingDown -- server_shutting_down -- queued when the server stopped
        +-- ReplicaLost -- replica_lost -- a Ray replica died after part of the answer was
              relayed (``details["cause"] == "out_of_memory"`` for Ray's memory monitor)

Adapter-level subclasses of :class:`HookwireError`, raised on the client only (they never
travel, so they are not in :data:`ERROR_TYPES`): ``hookwire.transformerlens`` --
``WeightsNotFetched`` (``weights_not_fetched``: a weightless stand-in's weight was read),
``NeedsScalar`` / ``NothingToDifferentiate`` (backward hooks with nothing to differentiate;
also ``ValueError``); ``hookwire.pyvene`` -- ``UnsupportedInput`` (``unsupported_input``),
``UnknownComponent`` (``unknown_component``), ``SavedModelError`` (``saved_model_error``),
``NotSupportedRemotely`` (``not_supported_remotely``, also ``AttributeError``) and, under
``TraceError``, ``UnsupportedIntervention`` (``unsupported_intervention``) and
``UnsupportedCall`` (``unsupported_call``).

A message larger than the server's ``Limits.max_message_bytes`` gets no error message: the
websocket closes with code 1009.
"""
from __future__ import annotations


class HookwireError(Exception):
    code = "hookwire_error"
    # The request an error refuses, where the server's intake knows it (set before raising
    # on, so the error reply names the request); None for a connection-level error.
    request_id: str | None = None

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
    """The model replica running the request stopped (a server on the Ray or the process
    engine); the request may be sent again."""
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
