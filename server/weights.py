"""Answering a ``weights`` request: some of a hosted model's parameters, by the names its
bridge's ``named_parameters()`` gives (what a client's weightless stand-in of the same model
calls them too), so analysis code that reads weights (``model.W_U``,
``cache.accumulated_resid(apply_ln=True)``) can run on the stand-in.

Checked before anything is copied: every name must be a parameter of the model (looked up in
a table, never resolved as an attribute path), and the total must fit
``Limits.max_weight_bytes``. One transfer per connection at a time.

A transfer is a task on the event loop that holds no thread while it waits: it copies and
frames a parameter a part at a time (``PART_BYTES``) in a thread of the server's weights
pool, hands the frames to the connection's outbox (where they count in the user's memory
budget until sent), and waits -- on the loop, no thread held -- while more than
``SEND_WINDOW_BYTES`` of them wait to be sent. Before, a transfer ran whole in a thread of
the loop's shared executor and slept there while its client did not read: a tenant's few
connections that asked for weights and stopped reading held every one of that executor's
threads (six on two cores) until ``send_timeout_s`` dropped them, and every other user's
weights (and TL hook-switch probes) waited as long (SECURITY.md, *weights transfers to
clients that do not read*). And a parameter on an accelerator was copied to the host whole,
outside every budget; now a part at a time.
"""
from __future__ import annotations

import asyncio
import logging

import torch

from hookwire.errors import HookwireError, LimitExceeded, ProtocolError, QueueFull
from hookwire.frames import CHUNK_BYTES, encode_chunks
from hookwire.server import replies

log = logging.getLogger("hookwire.server")


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
    for _, param in wanted:  # a dtype the wire cannot carry: a FrameError before anything goes
        replies.tensor_header("w", param.detach())
    total = sum(p.numel() * p.element_size() for _, p in wanted)
    if total > limits.max_weight_bytes:
        raise LimitExceeded(f"the parameters asked for make {total} bytes; this server's "
                            f"max_weight_bytes is {limits.max_weight_bytes} per request (ask "
                            "in several parts)", rule="max_weight_bytes")
    return wanted


SEND_WINDOW_BYTES = 32 << 20  # frames of one transfer waiting to be sent, at most
PART_BYTES = 4 * CHUNK_BYTES  # copied and framed at once, in a thread of the weights pool


def begin_transfer(state) -> None:
    if getattr(state, "weights_in_flight", False):
        raise QueueFull("a weights transfer is already running on this connection; wait "
                        "for it to finish", rule="weights_in_flight")
    state.weights_in_flight = True


def _part_frames(request_id: str, tid: str, flat: torch.Tensor, first: int,
                 count: int) -> list[bytes]:
    """The frames of elements [first, first + count) of ``flat`` (copied to the host part
    by part, never whole). Runs in a thread of the weights pool."""
    part = flat[first:first + count]
    return list(encode_chunks(request_id, tid, part, CHUNK_BYTES,
                              at=first * flat.element_size()))


async def send_weights(state, request_id: str, wanted: list, pool) -> None:
    """Stream the parameters to ``state``'s client (a task on the loop; the copying runs in
    ``pool``, a part at a time, and waiting for a slow client holds no thread)."""
    loop = asyncio.get_running_loop()
    try:
        sent = 0
        for k, (name, param) in enumerate(wanted):
            if state.closed:
                return
            tid = f"w{k}"
            state.send_threadsafe(replies.result_header(
                request_id, name, replies.tensor_header(tid, param.detach())))
            # (a parameter is contiguous in practice; one that is not is made so on its device)
            flat = param.detach().contiguous().reshape(-1)
            step = max(1, PART_BYTES // flat.element_size())
            for first in range(0, flat.numel(), step):
                if not await state.outbox_below(SEND_WINDOW_BYTES):
                    return  # the connection ended
                frames = await loop.run_in_executor(pool, _part_frames, request_id, tid,
                                                    flat, first, step)
                for frame in frames:
                    sent += len(frame)
                    state.send_threadsafe(frame)
        state.send_threadsafe(replies.done(request_id, sent))
    except Exception as exc:  # (a dtype the wire cannot carry, say): the request ends with it
        if not isinstance(exc, HookwireError):
            log.exception("weights transfer %s failed", request_id)
        state.send_threadsafe(replies.error(request_id, exc))
    finally:
        state.weights_in_flight = False


__all__ = ["check_weights_request", "send_weights", "begin_transfer", "parameter_table",
           "SEND_WINDOW_BYTES", "PART_BYTES"]
