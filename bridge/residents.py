"""Values that already live on the server, seen from the client.

Every tensor a server sends back stays resident there for a while, under an id it names
(``v…``). Uploads the client asks it to keep are stored under their content id (``h…``: a
hash of dtype, shape and bytes). When a later request needs such a tensor -- the clean cache
in a patching sweep, the same token ids again -- the client sends a reference (plus the view
geometry, for a slice) instead of the bytes. If the server has dropped it meanwhile, it says
``resident_missing`` and the client sends the bytes after all.

Only *unchanged* tensors are referred to: a downloaded value is matched by its storage and
its version counter, which every in-place edit (through any view) bumps.
"""
from __future__ import annotations

import hashlib
import threading
import weakref

import torch

from hookwire.frames import DTYPE_NAMES, tensor_bytes

MIN_REF_BYTES = 256  # below this a reference costs about as much as the bytes


def content_id(tensor: torch.Tensor) -> str:
    """``h`` + 128-bit BLAKE2b of dtype, shape and the bytes (row-major)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{DTYPE_NAMES[tensor.dtype]}|{tuple(tensor.shape)}|".encode())
    h.update(tensor_bytes(tensor))
    return "h" + h.hexdigest()


def contiguous_strides(shape) -> list[int]:
    strides, step = [], 1
    for d in reversed(list(shape)):
        strides.append(step)
        step *= max(int(d), 1)
    return strides[::-1]


class ClientResidents:
    """What one connection's server holds for us: downloaded values (by storage) and kept
    uploads (by content id)."""

    def __init__(self):
        self._lock = threading.Lock()
        # storage data_ptr -> (weakref to the downloaded tensor's storage, resident id,
        # version, nbytes, dtype)
        self._downloads: dict[int, tuple] = {}
        self.server_has: set[str] = set()  # content ids of uploads the server kept

    def register_download(self, tensor: torch.Tensor, resident_id: str) -> None:
        if tensor.numel() == 0 or tensor.device.type != "cpu":
            return
        # The storage, not the tensor object: the user may hold only views of it (a cache's
        # alias entries), and torch keeps one Python storage object per storage, alive as
        # long as any tensor uses it -- so its address cannot be reused while it is listed.
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()

        def forget(_dead: object) -> None:  # the storage died: its address may be reused
            self._forget_ptr(ptr)
        ref = weakref.ref(storage, forget)
        with self._lock:
            self._downloads[ptr] = (ref, resident_id, tensor._version, storage.nbytes(),
                                    tensor.dtype)

    def _forget_ptr(self, ptr: int) -> None:
        with self._lock:
            entry = self._downloads.get(ptr)
            if entry is not None and entry[0]() is None:
                del self._downloads[ptr]

    def forget(self, ids) -> None:
        ids = set(ids)
        with self._lock:
            self.server_has -= ids
            for ptr in [p for p, e in self._downloads.items() if e[1] in ids]:
                del self._downloads[ptr]

    def ref_for(self, tensor: torch.Tensor) -> dict | None:
        """A reference to ``tensor`` as a view of something the server holds, or None."""
        if tensor.device.type != "cpu" or tensor.dtype not in DTYPE_NAMES or \
                tensor.numel() * tensor.element_size() < MIN_REF_BYTES:
            return None
        storage = tensor.untyped_storage()
        with self._lock:
            entry = self._downloads.get(storage.data_ptr())
        if entry is not None:
            base = entry[0]()
            # Same allocation (the storage is alive, so its address cannot have been reused),
            # same element type, no in-place edit since it arrived.
            if base is not None and entry[4] == tensor.dtype and \
                    tensor._version == entry[2] and storage.nbytes() == entry[3]:
                return {"resident": entry[1], "dtype": DTYPE_NAMES[tensor.dtype],
                        "shape": list(tensor.shape), "stride": list(tensor.stride()),
                        "offset": tensor.storage_offset()}
        return None


__all__ = ["ClientResidents", "content_id", "contiguous_strides", "MIN_REF_BYTES"]
