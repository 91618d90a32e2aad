"""Values the server keeps for a user between requests: results it sent (``v…`` ids) and
uploads the client asked it to keep (``h…`` content ids).

Bounded twice: a per-user byte quota (least recently used values go first) and a time to
live. A store belongs to one user -- one API key, or one connection when the server runs
without keys -- so ids are never resolved across users: someone else's id is simply missing.
"""
from __future__ import annotations

import math
import secrets
import threading
import time
from collections import OrderedDict

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
    last use. Values on an accelerator stay there while ``device_budget`` (server-wide)
    allows; otherwise their CPU copy is kept."""

    def __init__(self, max_bytes: int, ttl_s: float, device_budget: DeviceBudget | None = None):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self.device_budget = device_budget or DeviceBudget(0)
        self._values: OrderedDict[str, tuple[torch.Tensor, int, float]] = OrderedDict()
        self.bytes = 0
        self._lock = threading.Lock()

    def put(self, rid: str, tensor: torch.Tensor,
            cpu_copy: torch.Tensor | None = None) -> bool:
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return False
        tensor = tensor.detach()
        if tensor.device.type != "cpu" and \
                not self.device_budget.reserve(size):
            tensor = cpu_copy.detach() if cpu_copy is not None else tensor.to("cpu")
        tensor = tensor.contiguous()
        with self._lock:
            self._drop(rid)
            self._values[rid] = (tensor, size, time.monotonic())
            self.bytes += size
            self._expire()
            while self.bytes > self.max_bytes:
                self._drop(next(iter(self._values)))
        return True

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
        entry = self._values.pop(rid, None)
        if entry is not None:
            self.bytes -= entry[1]
            if entry[0].device.type != "cpu":
                self.device_budget.release(entry[1])

    def clear(self) -> None:
        """Drop everything (the user is gone): device bytes go back to the budget."""
        with self._lock:
            for rid in list(self._values):
                self._drop(rid)

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.ttl_s
        while self._values:
            rid, (_, _, used) = next(iter(self._values.items()))
            if used >= cutoff:
                return
            self._drop(rid)


class Residents:
    """Every user's store, and the server-wide budget of accelerator memory they share."""

    def __init__(self, max_bytes_per_user: int, ttl_s: float, max_device_bytes: int = 0):
        self.max_bytes, self.ttl_s = max_bytes_per_user, ttl_s
        self.device_budget = DeviceBudget(max_device_bytes)
        self._stores: dict[str, ResidentStore] = {}
        self._lock = threading.Lock()

    def for_user(self, user: str) -> ResidentStore:
        with self._lock:
            store = self._stores.get(user)
            if store is None:
                store = self._stores[user] = ResidentStore(self.max_bytes, self.ttl_s,
                                                           self.device_budget)
            return store

    def drop_user(self, user: str) -> None:
        with self._lock:
            store = self._stores.pop(user, None)
        if store is not None:
            store.clear()


def resolve_refs(store: ResidentStore, refs, max_bytes: int) -> dict[str, torch.Tensor]:
    """Attached tensors given as references -> tensors (copies of views of resident values:
    a request can never write into what the store holds). Every reference is checked against
    the resident's dtype and extent; missing ones are reported all at once."""
    out, missing, total = {}, [], 0
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
        total += n * base.element_size()
        if total > max_bytes:
            raise ProtocolError(f"referenced tensors total more than {max_bytes} bytes")
        if ref.tid in out:
            raise ProtocolError(f"tensor id {ref.tid!r} referenced twice")
        out[ref.tid] = base.as_strided(ref.shape, ref.stride, ref.offset).clone()
    if missing:
        raise ResidentMissing(f"{len(missing)} referenced value(s) are no longer held by the "
                              "server (expired, evicted, or not this user's)",
                              missing=",".join(missing))
    return out


def keep_uploads(store: ResidentStore, keep: dict[str, str], tensors: dict) -> None:
    """Store uploads the client asked to keep, under their content id -- after checking the
    id really is the hash of what arrived (a wrong one is refused, never stored)."""
    for tid, cid in keep.items():
        tensor = tensors.get(tid)
        if tensor is None:
            raise ProtocolError(f"asked to keep tensor {tid!r}, which was not uploaded")
        if content_id(tensor) != cid:
            raise ProtocolError(f"tensor {tid!r} does not match its content id")
        store.put(cid, tensor)


__all__ = ["DeviceBudget", "ResidentStore", "Residents", "resolve_refs", "keep_uploads", "new_result_id"]
