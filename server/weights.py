"""Answering a ``weights`` request: some of a hosted model's parameters, by the names its
bridge's ``named_parameters()`` gives (what a client's weightless stand-in of the same model
calls them too), so analysis code that reads weights (``model.W_U``,
``cache.accumulated_resid(apply_ln=True)``) can run on the stand-in.

Checked before anything is copied: every name must be a parameter of the model (looked up in
a table, never resolved as an attribute path), and the total must fit
``Limits.max_weight_bytes``. One transfer per connection at a time. The copying and framing
run in a thread of the executor, off the event loop.
"""
from __future__ import annotations

import time

from hookwire.errors import LimitExceeded, ProtocolError, QueueFull
from hookwire.server import replies


def parameter_table(entry) -> dict:
    """name -> parameter of the hosted bridge (computed once per model)."""
    table = getattr(entry, "_parameters_by_name", None)
    if table is None:
        table = dict(entry.hosted.model.named_parameters())  # the bridge's, or a base model's
        entry._parameters_by_name = table
    return table


def check_weights_request(entry, msg, limits) -> list:
    """[(name, parameter)] the request may have; raises a typed error otherwise."""
    table = parameter_table(entry)
    unknown = [n for n in msg.names if n not in table]
    if unknown:
        raise ProtocolError(f"{len(unknown)} names are not parameters of model "
                            f"{msg.model!r}, e.g. {unknown[:3]}")
    if limits.max_weight_bytes <= 0:
        raise LimitExceeded("this server does not send weights (max_weight_bytes=0)",
                            rule="max_weight_bytes")
    wanted = [(n, table[n]) for n in dict.fromkeys(msg.names)]
    total = sum(p.numel() * p.element_size() for _, p in wanted)
    if total > limits.max_weight_bytes:
        raise LimitExceeded(f"the parameters asked for make {total} bytes; this server's "
                            f"max_weight_bytes is {limits.max_weight_bytes} per request (ask "
                            "in several parts)", rule="max_weight_bytes")
    return wanted


SEND_WINDOW_BYTES = 32 << 20  # frames of one transfer waiting to be sent, at most


def begin_transfer(state) -> None:
    if getattr(state, "weights_in_flight", False):
        raise QueueFull("a weights transfer is already running on this connection; wait "
                        "for it to finish", rule="weights_in_flight")
    state.weights_in_flight = True


def send_weights(state, request_id: str, wanted: list) -> None:
    """Stream the parameters (runs in an executor thread)."""
    try:
        sent = 0
        for k, (name, param) in enumerate(wanted):
            if state.closed:
                return
            value = param.detach().to("cpu").contiguous()
            tid = f"w{k}"
            state.send_threadsafe(replies.result_header(request_id, name,
                                                        replies.tensor_header(tid, value)))
            for frame in replies.value_frames(request_id, tid, value):
                # At most a window of frames waits in the outbox: a client that reads
                # slowly holds the transfer, not the server's memory.
                while getattr(state, "queued_bytes", 0) > SEND_WINDOW_BYTES:
                    if state.closed:
                        return
                    time.sleep(0.002)
                sent += len(frame)
                state.send_threadsafe(frame)
        state.send_threadsafe(replies.done(request_id, sent))
    finally:
        state.weights_in_flight = False


__all__ = ["check_weights_request", "send_weights", "begin_transfer", "parameter_table"]
