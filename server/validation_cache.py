"""Validated graphs, reused when a request repeats one: a sweep sends the same graph again and
again with other constant values (the patched activation, the ablated head's zeros), and
validating it -- decoding every node, then running the graph on the meta device for shapes,
bytes and flops -- is a fixed cost of every call.

What validation computes depends only on: the graph itself (every field of it), each
constant's dtype, shape and strides (float constants become meta tensors) and the *values* of
the small integer and boolean constants that shape inference keeps real
(``hookwire.validate.kept_real``: a boolean mask's values decide the shape it selects),
the input's batch and sequence length, the forward's output shapes, the site tables of the
request's TL hook switches, and the worker's limits (fixed for the cache's life). The key is a
SHA-256 over all of these; an entry is a graph that *passed*: a failure is never cached, so a
request that would fail always runs the checks and fails with its own error. A hit is the
very ``ValidatedGraph`` validating this request would build again; it is only read afterwards
(the executor, batching and the worker never write to it). Which tenant made an entry
therefore changes nobody's result, only how soon validation ends.

Bounded: ``max_entries`` graphs (least recently used go first), graphs of at most
``max_nodes`` nodes, and at most ``max_real_bytes`` of real constant values hashed into a
key; beyond those a request is validated as if there were no cache.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from hookwire.validate import ValidatedGraph, kept_real

MAX_ENTRIES = 256
MAX_NODES = 1000
MAX_REAL_BYTES = 64 << 10


class ValidationCache:
    """Least-recently-used ``ValidatedGraph`` objects by :meth:`key` (one per worker)."""

    def __init__(self, max_entries: int = MAX_ENTRIES, max_nodes: int = MAX_NODES,
                 max_real_bytes: int = MAX_REAL_BYTES):
        self.max_entries, self.max_nodes = max_entries, max_nodes
        self.max_real_bytes = max_real_bytes
        self._entries: OrderedDict[bytes, tuple[ValidatedGraph, tuple]] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, graph, constants: dict[str, torch.Tensor], batch: int, seq: int,
            outputs: dict) -> bytes | None:
        """The digest of everything validation reads, or None: not cached (too large, or a
        graph that cannot even be serialized again, e.g. nested too deep: validation will
        refuse it with its own error)."""
        if self.max_entries <= 0 or len(graph.nodes) > self.max_nodes:
            return None
        h = hashlib.sha256()
        try:
            h.update(graph.model_dump_json().encode())
        except (ValueError, RecursionError):
            return None
        h.update(repr((int(batch), int(seq))).encode())
        h.update(repr(sorted((k, tuple(s), str(d)) for k, (s, d) in (outputs or {}).items()))
                 .encode())
        real = 0
        for tid in graph.constants:
            t = constants[tid]
            h.update(repr((tid, str(t.dtype), tuple(t.shape), tuple(t.stride()))).encode())
            if kept_real(t):  # shape inference uses its values: they are part of the key
                real += t.numel() * t.element_size()
                if real > self.max_real_bytes:
                    return None
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                         .numpy().tobytes())
            h.update(b"\x00")
        return h.digest()

    def get(self, key: bytes | None, tables: tuple) -> ValidatedGraph | None:
        """The graph validated under ``key`` against these very ``tables`` (site table and
        order of the request's TL hook switches), or None."""
        if key is None:
            return None
        found = self._entries.get(key)
        if found is None or found[1][0] is not tables[0] or found[1][1] is not tables[1]:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return found[0]

    def put(self, key: bytes | None, vg: ValidatedGraph, tables: tuple) -> None:
        if key is None or self.max_entries <= 0:
            return
        self._entries[key] = (vg, tables)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


__all__ = ["ValidationCache"]
