"""The messages between the front and a model process (server/process_engine.py,
server/process_replica.py), without I/O policy.

A message is a small JSON header and raw bytes: ``>IQ`` (header length, body length), the
header, the body. Both ends are processes of our own server, but nothing here pickles
anything or turns a name into code: what the body carries is sliced by the sizes the header
states, tensors are rebuilt from their validated headers (server/job_payload.py), and the
submit is parsed again, with the same validating parser, in the model process.

- front -> model process: ``run`` (a job payload; the body is its tensors' bytes, or they
  follow in ``data`` messages when large), ``cancel``, ``hook_mode_info``;
- model process -> front: ``info`` (first, once its model is loaded), ``items`` (what the
  worker sends for one request: protocol JSON, tensor frames -- the body -- and notes),
  ``end`` (that request's stream is over), ``answer`` (to ``hook_mode_info``), ``failed``
  (the model process could not start).
"""
from __future__ import annotations

import json
import socket
import struct

PREFIX = struct.Struct(">IQ")
MAX_HEADER_BYTES = 64 << 20  # a header is JSON of one request's graph (bounded by the front)
CHUNK_BYTES = 1 << 20  # the most raw bytes one message carries when they can be split


class LinkClosed(ConnectionError):
    """The other end is gone (it exited, or closed its socket)."""


def pack(header: dict, body_parts=()) -> list:
    """The parts of one message, to write in order (``body_parts``: bytes-like)."""
    head = json.dumps(header, separators=(",", ":")).encode()
    size = sum(len(part) for part in body_parts)
    return [PREFIX.pack(len(head), size), head, *body_parts]


def _unpack_header(raw: bytes) -> dict:
    header = json.loads(raw)
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ValueError("a link message's header must be an object with an 'op'")
    return header


async def read_message(reader) -> tuple[dict, bytes]:
    """The next message from an asyncio stream (``LinkClosed`` at its end)."""
    import asyncio

    try:
        head_len, body_len = PREFIX.unpack(await reader.readexactly(PREFIX.size))
        if head_len > MAX_HEADER_BYTES:
            raise ValueError(f"a link header of {head_len} bytes")
        header = _unpack_header(await reader.readexactly(head_len))
        body = await reader.readexactly(body_len) if body_len else b""
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        raise LinkClosed(str(exc)) from None
    return header, body


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise LinkClosed("the other end closed the link")
        got += k
    return bytes(buf)


def read_message_blocking(sock: socket.socket) -> tuple[dict, bytes]:
    """The next message from a blocking socket, reading exactly its bytes (nothing after it,
    so an asyncio stream can take over the socket afterwards)."""
    head_len, body_len = PREFIX.unpack(_recv_exactly(sock, PREFIX.size))
    if head_len > MAX_HEADER_BYTES:
        raise ValueError(f"a link header of {head_len} bytes")
    header = _unpack_header(_recv_exactly(sock, head_len))
    return header, _recv_exactly(sock, body_len) if body_len else b""


# ---- what the messages carry ----------------------------------------------------------------
def run_messages(sid: int, payload: dict) -> list:
    """A job payload (server/job_payload.py) as messages: a ``run`` message with the tensors'
    bytes as its body, or -- when they pass ``CHUNK_BYTES`` -- a ``run`` message that says
    so (``chunked``) followed by ``data`` messages of at most ``CHUNK_BYTES`` each. Smaller
    messages (another request, a cancel) may travel between those: one tenant's large upload
    does not hold the link for everyone else's requests."""
    tensors = payload["tensors"]
    submit = payload["submit"]
    submit = submit.encode() if isinstance(submit, str) else submit
    sizes = [len(item["data"]) for item in tensors]
    # The submit travels in the body too: as a JSON string in the header it would be
    # escaped here and unescaped there, a pass over a large graph on each side.
    header = {"op": "run", "sid": sid, "submit_size": len(submit), "user": payload["user"],
              "received_bytes": payload["received_bytes"],
              "mates_possible": bool(payload.get("mates_possible", True)),
              "tensors": [item["header"] for item in tensors], "sizes": sizes,
              "refs": payload.get("refs", [])}
    bodies = [submit] + [item["data"] for item in tensors]
    if len(submit) + sum(sizes) <= CHUNK_BYTES:
        return [pack(header, bodies)]
    messages = [pack({**header, "chunked": True})]
    for part in bodies:
        data = memoryview(part)
        for at in range(0, len(data), CHUNK_BYTES):
            messages.append(pack({"op": "data", "sid": sid}, [data[at:at + CHUNK_BYTES]]))
    return messages


class RunAssembly:
    """A chunked ``run`` message's body as its ``data`` messages arrive."""

    def __init__(self, header: dict):
        sizes = [header["submit_size"], *header["sizes"]]
        if not all(isinstance(n, int) and n >= 0 for n in sizes):
            raise ValueError("a run message's sizes must be non-negative")
        self.header, self.body, self.got = header, bytearray(sum(sizes)), 0

    def add(self, data: bytes) -> bool:
        """Take one ``data`` message's body; True once the body is complete."""
        if self.got + len(data) > len(self.body):
            raise ValueError("a run's data passes its declared sizes")
        self.body[self.got:self.got + len(data)] = data
        self.got += len(data)
        return self.got == len(self.body)


def payload_of_run(header: dict, body) -> dict:
    """The job payload a ``run`` message carries (sizes checked against the body)."""
    sizes, heads, submit_size = header["sizes"], header["tensors"], header["submit_size"]
    if len(sizes) != len(heads) or submit_size + sum(sizes) != len(body) or \
            min([submit_size, *sizes]) < 0:
        raise ValueError("a run message's sizes do not match its body")
    view = memoryview(body)
    submit, tensors, at = bytes(view[:submit_size]), [], submit_size
    for head, size in zip(heads, sizes):
        tensors.append({"header": head, "data": view[at:at + size]})
        at += size
    return {"submit": submit, "user": header["user"],
            "received_bytes": header["received_bytes"], "refs": header.get("refs", []),
            "mates_possible": bool(header.get("mates_possible", True)), "tensors": tensors}


def items_messages(sid: int, items: list) -> list:
    """One request's items (JSON text, binary frames, note dicts) as ``items`` messages,
    in order, each with at most about ``CHUNK_BYTES`` of frames: the front reads a message
    at once, so a large result reaches it in pieces, between others' answers."""
    messages, kinds, frames, size = [], [], [], 0
    for item in items:
        if isinstance(item, str):
            kinds.append(["t", item])
        elif isinstance(item, dict):
            kinds.append(["n", item])
        else:
            if frames and size + len(item) > CHUNK_BYTES:
                messages.append(pack({"op": "items", "sid": sid, "items": kinds}, frames))
                kinds, frames, size = [], [], 0
            kinds.append(["f", len(item)])
            frames.append(item)
            size += len(item)
    if kinds or not messages:
        messages.append(pack({"op": "items", "sid": sid, "items": kinds}, frames))
    return messages


def items_of(header: dict, body: bytes) -> list:
    """The items an ``items`` message carries, in order."""
    items, at = [], 0
    for kind, value in header["items"]:
        if kind == "t" and isinstance(value, str):
            items.append(value)
        elif kind == "n" and isinstance(value, dict):
            items.append(value)
        elif kind == "f" and isinstance(value, int) and 0 <= value <= len(body) - at:
            items.append(bytes(body[at:at + value]))
            at += value
        else:
            raise ValueError(f"an items message with an item of kind {kind!r}")
    if at != len(body):
        raise ValueError("an items message's frames do not fill its body")
    return items


__all__ = ["pack", "read_message", "read_message_blocking", "run_messages", "RunAssembly",
           "payload_of_run", "items_messages", "items_of", "LinkClosed", "PREFIX", "CHUNK_BYTES"]
