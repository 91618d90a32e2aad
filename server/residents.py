"""Values the server keeps for a user between requests: results it sent (``v…`` ids) and
uploads the client asked it to keep (``h…`` content ids).

Bounded three times: a per-user byte quota (least recently used values go first), a time to
live, and a server-wide total (``Limits.max_resident_bytes_total``: without API keys every
connection is a user, so per-user quotas alone bound nothing) -- over it, the user holding
the most loses its least recently used values first, so one tenant filling the server evicts
its own values before anyone else's. A store belongs to one user -- one API key, or one
connection when the server runs without keys -- so ids are never resolved across users:
someone else's id is simply missing.

A reference to a resident value is a strided view of it. Its geometry is checked and its
*materialised* size counted when the submit arrives (:func:`check_refs`, off the event loop,
before anything is allocated); the copy is made only when the request runs
(:func:`materialize_refs`).
"""
from __future__ import annotations

import secrets
import threading
import time
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from hookwire.errors import ProtocolError, ResidentMissing
from hookwire.frames import DTYPE_NAMES, MAX_ELEMENTS, numel
from hookwire.residents import content_id


def new_result_id() -> str:
    return "v" + secrets.token_hex(12)


class DeviceBudget:
    """Bytes of resident values held in accelerator memory, across every user: capped
    server-wide, so users' kept values cannot pile up next to the model in GPU memory (past
    the cap they are kept in CPU memory, and moved to the activation's device when used)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._lock = threading.Lock()

    def reserve(self, size: int) -> bool:
        with self._lock:
            if self.bytes + size > self.max_bytes:
                return False
            self.bytes += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.bytes -= size


class ResidentStore:
    """One user's resident values, LRU under ``max_bytes``, each dropped ``ttl_s`` after its
    last use. In a :class:`Residents` pool the stores also share a server-wide total. Values
    on an accelerator stay there while ``device_budget`` (server-wide) allows; otherwise their
    CPU copy is kept."""

    def __init__(self, max_bytes: int, ttl_s: float, pool: "Residents | None" = None,
                 device_budget: DeviceBudget | None = None):
        self.max_bytes, self.ttl_s, self.pool = max_bytes, ttl_s, pool
        self.device_budget = device_budget or DeviceBudget(0)
        self._values: OrderedDict[str, tuple[torch.Tensor, int, float]] = OrderedDict()
        self.bytes = 0
        self.closed = False  # its user is gone (Residents.drop_user): it keeps nothing more
        # One lock for the whole pool: a put may evict from another user's store.
        self._lock = pool._lock if pool is not None else threading.RLock()

    def keep_upload(self, cid: str, tensor: torch.Tensor,
                    between: Callable[[], None] | None = None) -> bool:
        """Keep a copy of an upload under its content id. A copy: the request then runs on
        the upload and may write into it in place (its tokens site, an activation aliasing a
        constant), which must not change what the content id names -- the client's next
        call refers to it instead of sending the bytes."""
        if self.closed or tensor.numel() * tensor.element_size() > self.max_bytes:
            return False
        own = torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device)
        if between is None:
            own.copy_(tensor)
        else:
            _copy_in_chunks(own, tensor, between)
        return self.put(cid, own)

    def put(self, rid: str, tensor: torch.Tensor,
            cpu_copy: torch.Tensor | None = None) -> bool:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes or (self.pool is not None and size > self.pool.max_total):
            return False
        tensor = tensor.detach()
        if tensor.device.type != "cpu" and \
                not self.device_budget.reserve(size):
            tensor = cpu_copy.detach() if cpu_copy is not None else tensor.to("cpu")
        tensor = tensor.contiguous()
        with self._lock:
            if self.closed:
                # A request of a user already gone (a keyless connection closed while it
                # ran) saves a value: nobody could use it, or ever drop it again.
                return False
            self._drop(rid)
            self._values[rid] = (tensor, size, time.monotonic())
            self._count(size)
            self._expire()
            while self.bytes > self.max_bytes and self._values:
                self._drop(next(iter(self._values)))
            if self.pool is not None:
                self.pool.evict_over_total()
            return rid in self._values  # (values dropped but still held count: _drop)

    def _count(self, size: int) -> None:
        self.bytes += size
        if self.pool is not None:
            self.pool.total_bytes += size

    def get(self, rid: str) -> torch.Tensor | None:
        with self._lock:
            self._expire()
            entry = self._values.get(rid)
            if entry is None:
                return None
            self._values[rid] = (entry[0], entry[1], time.monotonic())
            self._values.move_to_end(rid)
            return entry[0]

    def __len__(self):
        return len(self._values)

    def _drop(self, rid: str) -> None:
        """Take ``rid`` out of the store. Its bytes stay counted (against this user's
        ``max_bytes`` and the server-wide total) until the tensor itself is gone: a request
        that referred to it and waits to run holds it (``check_refs``), and a user who
        evicted, replaced or let expire the values its queued requests refer to would
        otherwise hold any number of them uncounted (a queue of requests, each holding a
        value of up to its whole quota)."""
        entry = self._values.pop(rid, None)
        if entry is not None:
            tensor, size = entry[0], entry[1]
            # (CPython runs it as soon as the last reference goes: here, if none is held)
            weakref.finalize(tensor, self._uncount, size, tensor.device.type != "cpu")

    def _uncount(self, size: int, on_device: bool) -> None:
        with self._lock:
            self._count(-size)
            if on_device:
                self.device_budget.release(size)

    def drop_oldest(self) -> None:
        if self._values:
            self._drop(next(iter(self._values)))

    def clear(self) -> None:
        """Drop everything, and keep nothing more (the user is gone): device bytes go back to
        the budget."""
        with self._lock:
            self.closed = True
            while self._values:
                self.drop_oldest()

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._values:
            rid, (_, _, used) = next(iter(self._values.items()))
            if used >= cutoff:
                return
            self._drop(rid)


class Residents:
    """Every user's store, the server-wide total they share, and the server-wide budget of
    accelerator memory."""

    def __init__(self, max_bytes_per_user: int, ttl_s: float, max_total: int | None = None,
                 max_device_bytes: int = 0):
        self.max_bytes, self.ttl_s = max_bytes_per_user, ttl_s
        self.max_total = max_total if max_total is not None else float("inf")
        self.total_bytes = 0
        self.device_budget = DeviceBudget(max_device_bytes)
        self._stores: dict[str, ResidentStore] = {}
        self._lock = threading.RLock()

    def for_user(self, user: str) -> ResidentStore:
        with self._lock:
            store = self._stores.get(user)
            if store is None:
                store = self._stores[user] = ResidentStore(self.max_bytes, self.ttl_s, self,
                                                           self.device_budget)
            return store

    def drop_user(self, user: str) -> None:
        with self._lock:
            store = self._stores.pop(user, None)
            if store is not None:
                store.clear()

    def evict_over_total(self) -> None:
        """Over the server-wide total: the user holding most gives up its oldest values."""
        with self._lock:
            while self.total_bytes > self.max_total:
                # (among stores with values to drop: bytes still held by requests are not)
                largest = max((st for st in self._stores.values() if len(st)),
                              key=lambda st: st.bytes, default=None)
                if largest is None:
                    return
                largest.drop_oldest()


def check_refs(store: ResidentStore, refs, max_bytes: int) -> tuple[list, int]:
    """Check references against the resident values they view: ([(tid, base, ref)], bytes
    they will take once materialised). Nothing is allocated; missing ids are reported all at
    once (``ResidentMissing``)."""
    out, missing, total, seen = [], [], 0, set()
    for ref in refs:
        base = store.get(ref.resident)
        if base is None:
            missing.append(ref.resident)
            continue
        if DTYPE_NAMES.get(base.dtype) != ref.dtype:
            raise ProtocolError(f"reference {ref.tid!r}: resident value is "
                                f"{DTYPE_NAMES.get(base.dtype)}, not {ref.dtype}")
        if len(ref.shape) != len(ref.stride) or any(d < 0 for d in ref.shape) or \
                any(not 0 <= s <= MAX_ELEMENTS for s in ref.stride) or \
                ref.offset > MAX_ELEMENTS:
            raise ProtocolError(f"reference {ref.tid!r}: bad view geometry")
        n = numel(ref.shape)  # refuses sizes torch could not even represent (FrameError)
        if n:
            last = ref.offset + sum((d - 1) * s for d, s in zip(ref.shape, ref.stride))
            if last >= base.numel():
                raise ProtocolError(f"reference {ref.tid!r}: the view reaches element {last} "
                                    f"of a resident value with {base.numel()}")
        # What the copy will take, not what the view spans: a stride-0 view of one element
        # counts every element it expands to.
        total += n * base.element_size()
        if total > max_bytes:
            raise ProtocolError(f"referenced tensors would take more than {max_bytes} bytes "
                                "once materialised")
        if ref.tid in seen:
            raise ProtocolError(f"tensor id {ref.tid!r} referenced twice")
        seen.add(ref.tid)
        out.append((ref.tid, base, ref))
    if missing:
        raise ResidentMissing(f"{len(missing)} referenced value(s) are no longer held by the "
                              "server (expired, evicted, or not this user's)",
                              missing=",".join(missing))
    return out, total


COPY_CHUNK_BYTES = 4 << 20  # about a millisecond of copying between two calls of ``between``


def materialize_refs(checked, between: Callable[[], None] | None = None
                     ) -> dict[str, torch.Tensor]:
    """The checked references as tensors: copies of the views (a request can never write into
    what the store holds). Runs when the request runs, not when it is queued. ``between`` is
    called after each ``COPY_CHUNK_BYTES`` copied (the worker gives way and checks the
    request's deadline there)."""
    out = {}
    for tid, base, ref in checked:
        view = base.as_strided(ref.shape, ref.stride, ref.offset)
        if between is None:
            out[tid] = view.clone()
        else:
            out[tid] = torch.empty(view.shape, dtype=view.dtype, device=view.device)
            _copy_in_chunks(out[tid], view, between)
    return out


def _copy_in_chunks(dst: torch.Tensor, src: torch.Tensor, between) -> None:
    """dst.copy_(src) a slab of leading-dim rows of at most ``COPY_CHUNK_BYTES`` at a time
    (a row larger than that is split the same way along its own leading dim)."""
    row = dst[0].numel() * dst.element_size() if dst.dim() and len(dst) else 0
    if dst.dim() == 0 or dst.numel() * dst.element_size() <= COPY_CHUNK_BYTES:
        dst.copy_(src)
        between()
    elif row > COPY_CHUNK_BYTES:
        for i in range(len(dst)):
            _copy_in_chunks(dst[i], src[i], between)
    else:
        step = COPY_CHUNK_BYTES // max(row, 1)
        for i in range(0, len(dst), step):
            dst[i:i + step].copy_(src[i:i + step])
            between()


def resolve_refs(store: ResidentStore, refs, max_bytes: int) -> dict[str, torch.Tensor]:
    """check_refs + materialize_refs at once."""
    return materialize_refs(check_refs(store, refs, max_bytes)[0])


def keep_uploads(store: ResidentStore, keep: dict[str, str], tensors: dict,
                 between: Callable[[], None] | None = None) -> None:
    """Store uploads the client asked to keep, under their content id -- after checking the
    id really is the hash of what arrived (a wrong one is refused, never stored). The store
    keeps a copy of its own (:meth:`ResidentStore.keep_upload`); ``between``: as for
    :func:`materialize_refs`, called between chunks of that copy."""
    for tid, cid in keep.items():
        tensor = tensors.get(tid)
        if tensor is None:
            raise ProtocolError(f"asked to keep tensor {tid!r}, which was not uploaded")
        if content_id(tensor) != cid:
            raise ProtocolError(f"tensor {tid!r} does not match its content id")
        store.keep_upload(cid, tensor, between)


__all__ = ["DeviceBudget", "ResidentStore", "Residents", "check_refs", "materialize_refs",
           "resolve_refs", "keep_uploads", "new_result_id"]
