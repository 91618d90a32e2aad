"""The server's outgoing protocol messages, in one place: engines say what happened, these
functions write it in the protocol's words.

Every text message the server sends a client (``hello_ok``, ``accepted``, ``progress``,
``result``, ``done``, ``error``) is written here from the models in :mod:`hookwire.protocol`,
and every binary frame that carries a result's bytes comes from :func:`value_frames`. The
callers -- the session (:mod:`hookwire.server.session`), the worker and its token loop
(:mod:`~hookwire.server.worker`, :mod:`~hookwire.server.generation`), the weights transfer
(:mod:`~hookwire.server.weights`) and the Ray engine's two sides -- decide only *what* to send
and *when*: memory checks, resident copies, snapshots and aliasing stay with them.

The functions are pure (text or bytes out, nothing sent, nothing logged), so a change of
wording in the protocol is a change to this file only. The one exception that is not the
protocol's own words is ``model_info``: a model's description is built once when the model is
prepared (:mod:`hookwire.server.manifest`) and sent as that cached text.
"""
from __future__ import annotations

from typing import Iterator

import torch

from hookwire import __version__
from hookwire.errors import HookwireError
from hookwire.frames import CHUNK_BYTES, TensorHeader, encode_chunks, header_for
from hookwire.protocol import (PROTOCOL_VERSION, Accepted, Done, Error, HelloOk, Progress,
                               Result, dump)


def hello_ok(models: list[str]) -> str:
    """The answer to a ``hello`` the server accepts: its protocol, version and models."""
    return dump(HelloOk(protocol=PROTOCOL_VERSION, server_version=__version__,
                        models=list(models)))


def accepted(request_id: str, queue_position: int) -> str:
    """The engine queued the request, ``queue_position`` requests ahead of it."""
    return dump(Accepted(request_id=request_id, queue_position=queue_position))


def progress(request_id: str, stage: str, *, site: int | None = None, of: int | None = None,
             queue_position: int | None = None) -> str:
    """A request's progress (sent only when its submit asked for it): ``started``; ``site``
    ``site`` of ``of`` (a hook site reached, or a generated token); ``backward``."""
    return dump(Progress(request_id=request_id, stage=stage, queue_position=queue_position,
                         site=site, of=of))


def error(request_id: str | None, exc: BaseException) -> str:
    """The ``error`` that ends a request (``request_id`` None: a connection-level error).

    A typed error keeps its code, message and the details that are plain JSON scalars;
    anything else is a bug of ours and goes out as ``internal_error`` with its type and
    text."""
    if isinstance(exc, HookwireError):
        return dump(Error(request_id=request_id, code=exc.code, message=exc.message,
                          details={k: v for k, v in exc.details.items()
                                   if isinstance(v, (str, int, float, bool)) or v is None}))
    return dump(Error(request_id=request_id, code="internal_error",
                      message=f"{type(exc).__name__}: {exc}"))


def tensor_id(request_id: str, name: str) -> str:
    """The id a saved value's frames carry (the same name in one request, the same id)."""
    return f"t{abs(hash((request_id, name))) % (1 << 40)}"


def tensor_header(tid: str, value: torch.Tensor) -> TensorHeader:
    """The header that describes ``value`` on the wire (id, dtype, shape). Raises
    ``FrameError`` for a dtype the protocol cannot carry: an engine builds it before it
    keeps anything of the value."""
    return header_for(tid, value)


def result_header(request_id: str, name: str, header: TensorHeader,
                  resident: str | None = None) -> str:
    """The ``result`` message announcing a value under ``name`` (``header``: from
    :func:`tensor_header`); its bytes follow as :func:`value_frames` with the header's
    ``tid``. ``resident``: the id under which the server keeps the value for this user, if
    it does."""
    return dump(Result(request_id=request_id, name=name, tensor=header, resident=resident))


def alias_result(request_id: str, name: str, tid: str, value: torch.Tensor,
                 alias_of: str) -> str:
    """A ``result`` whose value is the very tensor this request already sent as
    ``alias_of``: the header only (shape and dtype, no bytes follow); the client makes it a
    view of the earlier value, as the two alias locally."""
    like = torch.empty(value.shape, dtype=value.dtype, device="meta")
    return dump(Result(request_id=request_id, name=name, tensor=header_for(tid, like),
                       alias_of=alias_of))


def value_frames(request_id: str, tid: str, value: torch.Tensor) -> Iterator[bytes]:
    """The binary frames carrying ``value``'s bytes (built one at a time, as they are
    taken), after its :func:`result_header`. An empty tensor has none: its header says it
    all."""
    if value.numel():
        yield from encode_chunks(request_id, tid, value, CHUNK_BYTES)


def done(request_id: str, bytes_sent: int, bytes_received: int = 0,
         timings: dict[str, float] | None = None) -> str:
    """The ``done`` that ends a request: tensor bytes sent and received, and its timings
    (seconds, plus counts such as ``batch_size`` and ``tokens``)."""
    return dump(Done(request_id=request_id, timings=timings or {}, bytes_sent=bytes_sent,
                     bytes_received=bytes_received))


__all__ = ["hello_ok", "accepted", "progress", "error", "tensor_id", "tensor_header",
           "result_header", "alias_result", "value_frames", "done"]
