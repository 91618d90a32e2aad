"""Tensors on the wire: a small JSON header and the raw bytes, never a serialized Python object.

One binary websocket message is one *chunk frame*::

    u32 little-endian header length | header JSON | payload bytes

The header names the tensor (``rid`` request id, ``tid`` tensor id) and the byte ``offset`` of
the payload inside the tensor. What the tensor is (dtype, shape, total bytes) was declared
beforehand in a control message (:class:`TensorHeader`); the assembler checks every chunk
against that declaration, so a lying header cannot write outside its buffer.
"""
from __future__ import annotations

import json
import math
import struct
import sys
from typing import Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from hookwire.errors import FrameError

FRAME_VERSION = 1
# 1 MiB: large tensors stream in pieces (docs/design.md, "Protocol and frames").
CHUNK_BYTES = 1 << 20
MAX_HEADER_BYTES = 4096
MAX_DIMS = 8
# No dimension, and no product of dimensions, may exceed this: torch unpacks sizes and computes
# strides in int64, so a zero-element shape like (0, 2**70) would otherwise fail *inside*
# torch (an untyped error) instead of being refused here. 2**48 elements is far past any
# byte limit a server sets.
MAX_ELEMENTS = 1 << 48

# The only dtypes that travel. Names are looked up here, never resolved with getattr.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZES = {name: dtype.itemsize for name, dtype in DTYPES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("hookwire frames assume a little-endian host")


class TensorHeader(BaseModel):
    """Declares one tensor before its bytes arrive."""
    model_config = ConfigDict(extra="forbid")
    tid: str = Field(max_length=64)
    dtype: str
    shape: list[int] = Field(max_length=MAX_DIMS)

    def nbytes(self) -> int:
        return numel(self.shape) * itemsize(self.dtype)


def itemsize(dtype_name: str) -> int:
    if dtype_name not in DTYPES:
        raise FrameError(f"dtype {dtype_name!r} is not allowed; allowed: {', '.join(DTYPES)}")
    return ITEMSIZES[dtype_name]


def numel(shape) -> int:
    if len(shape) > MAX_DIMS:
        raise FrameError(f"tensor has {len(shape)} dims; at most {MAX_DIMS} allowed")
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise FrameError(f"bad dimension {str(d)[:32]!r} in shape")
    if math.prod(max(d, 1) for d in shape) > MAX_ELEMENTS:
        raise FrameError(f"shape {str(shape)[:120]} exceeds {MAX_ELEMENTS} elements "
                         "(counting zero-size dimensions as 1)")
    return math.prod(shape)


def header_for(tid: str, tensor: torch.Tensor) -> TensorHeader:
    if tensor.dtype not in DTYPE_NAMES:
        raise FrameError(f"dtype {tensor.dtype} cannot be sent; allowed: {', '.join(DTYPES)}")
    return TensorHeader(tid=tid, dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    t = t.reshape(-1)
    if t.stride(0) != 1:
        # e.g. logits[:, -1, k] with batch 1: "contiguous" (size-1 dims don't count), yet
        # its stride is the row length, and a byte view needs stride 1.
        t = t.clone(memory_format=torch.contiguous_format)
    return t.view(torch.uint8).numpy().data  # the array's own memoryview: no copy


def encode_chunks(rid: str, tid: str, tensor: torch.Tensor,
                  chunk_bytes: int = CHUNK_BYTES, at: int = 0) -> Iterator[bytes]:
    """Yield the binary frames carrying ``tensor`` (at least one, even when empty). Each
    frame is built with a single copy of its payload. ``at``: where ``tensor``'s bytes
    start in the tensor ``tid`` (a sender may send a large tensor a part at a time)."""
    data = tensor_bytes(tensor)
    total = len(data)
    offset = 0
    while True:
        piece = data[offset:offset + chunk_bytes]
        head = json.dumps({"v": FRAME_VERSION, "rid": rid, "tid": tid, "offset": at + offset},
                          separators=(",", ":")).encode()
        # join allocates once and copies once (a bytearray(n) would zero-fill first)
        yield b"".join((struct.pack("<I", len(head)), head, piece))
        offset += len(piece)
        if offset >= total:
            return


def decode_frame(message: bytes) -> tuple[dict, memoryview]:
    """Split one binary message into (header dict, payload view), checking the framing."""
    view = memoryview(message)
    if len(view) < 4:
        raise FrameError("binary frame shorter than its length prefix")
    (hlen,) = struct.unpack_from("<I", view, 0)
    if hlen > MAX_HEADER_BYTES or 4 + hlen > len(view):
        raise FrameError(f"frame header length {hlen} is out of bounds")
    try:
        head = json.loads(bytes(view[4:4 + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"frame header is not JSON: {exc}") from None
    if not isinstance(head, dict) or head.get("v") != FRAME_VERSION:
        raise FrameError(f"frame header version must be {FRAME_VERSION}")
    for key, typ in (("rid", str), ("tid", str), ("offset", int)):
        if not isinstance(head.get(key), typ) or isinstance(head.get(key), bool):
            raise FrameError(f"frame header field {key!r} missing or of the wrong type")
    return head, view[4 + hlen:]


class TensorAssembler:
    """Collects the chunks of the tensors one request declared, with bounds checks."""

    def __init__(self, headers: list[TensorHeader], max_total_bytes: int):
        self.headers = {h.tid: h for h in headers}
        if len(self.headers) != len(headers):
            raise FrameError("two tensors declared with the same id")
        total = 0
        self.buffers: dict[str, np.ndarray] = {}  # uint8, one per declared tensor
        self.received: dict[str, int] = {}
        for h in headers:
            n = h.nbytes()
            total += n
            if total > max_total_bytes:
                raise FrameError(f"declared tensors total {total} bytes; limit {max_total_bytes}")
        for h in headers:
            # np.empty: no zero-fill; every byte is written before use (checked by `complete`)
            try:
                self.buffers[h.tid] = np.empty(h.nbytes(), dtype=np.uint8)
            except MemoryError:  # within the limit, but more than this machine can hold
                raise FrameError(f"tensor {h.tid!r} of {h.nbytes()} bytes does not fit in "
                                 "memory here") from None
            self.received[h.tid] = 0

    @property
    def complete(self) -> bool:
        return all(self.received[t] == len(self.buffers[t]) for t in self.buffers)

    def add(self, head: dict, payload: memoryview) -> None:
        tid, offset = head["tid"], head["offset"]
        if tid not in self.buffers:
            raise FrameError(f"frame for undeclared tensor {tid!r}")
        buf = self.buffers[tid]
        if offset != self.received[tid] or offset + len(payload) > len(buf):
            raise FrameError(f"frame for tensor {tid!r} at offset {offset} (+{len(payload)}) "
                             f"does not continue its {len(buf)} bytes")
        buf[offset:offset + len(payload)] = np.frombuffer(payload, dtype=np.uint8)
        self.received[tid] = offset + len(payload)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {tid: bytes_to_tensor(self.headers[tid], self.buffers[tid]) for tid in self.buffers}


def bytes_to_tensor(header: TensorHeader, buf) -> torch.Tensor:
    dtype = DTYPES[header.dtype]
    if len(buf) != header.nbytes():
        raise FrameError(f"tensor {header.tid!r} has {len(buf)} bytes, expected {header.nbytes()}")
    if len(buf) == 0:
        return torch.empty(header.shape, dtype=dtype)
    if not isinstance(buf, np.ndarray):
        buf = np.frombuffer(bytearray(buf), dtype=np.uint8)
    return torch.from_numpy(buf).view(dtype).reshape(header.shape)
