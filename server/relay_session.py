"""What the front reads in one request's answer as a Ray replica streams it, without I/O.

The Ray engine's relay (``server/ray_engine.py``) only moves items: from the replica's
stream to the client's connection. What those items *mean* to the front is decided here:
protocol JSON and tensor frames go on to the client; a result the replica kept resident is
assembled from the frames the front relays anyway and kept in the user's store at the front
(kept values cross once); the replica's own notes (its id; "keep this upload") are taken,
never forwarded; the request's ``done`` or ``error`` ends it. Whether anything besides
progress reached the client decides whether a lost replica's request may be sent again.

The items are produced by our own replicas (``server/ray_replica.py``), not by a client;
the relay still checks each result frame against its announced header
(:class:`~hookwire.frames.TensorAssembler`).
"""
from __future__ import annotations

import json
from typing import Union

from hookwire.frames import TensorAssembler, TensorHeader, decode_frame

FINAL_TYPES = ("done", "error")


def answer_type(item: str) -> str | None:
    """The ``type`` of one protocol JSON message of an answer."""
    return json.loads(item).get("type")


def is_final(item) -> bool:
    """Whether ``item`` (JSON text, a frame, or a note) ends its request."""
    return isinstance(item, str) and answer_type(item) in FINAL_TYPES


class RelaySession:
    """One request's answer, as the front relays it from a replica.

    :meth:`receive` takes each streamed item and returns it if it goes on to the client
    (None for a note); afterwards ``finished`` says whether the item ended the request and
    ``relayed`` whether anything besides progress was forwarded. ``store`` is the user's
    resident store at the front; ``uploads`` the request's uploaded tensors (tid -> tensor),
    for "keep this upload" notes; ``replica`` is the replica's note (id, pid, model) once
    seen."""

    def __init__(self, store, uploads: dict):
        self.store, self.uploads = store, uploads
        self.relayed = False
        self.finished = False
        self.replica: dict | None = None
        self._kept: dict[str, tuple[str, TensorAssembler]] = {}  # tid -> (resident, asm)

    def receive(self, item: Union[str, bytes, dict]):
        if isinstance(item, dict):
            self._on_note(item)
            return None
        if isinstance(item, bytes):
            self._on_frame(item)
            self.relayed = True
            return item
        msg = json.loads(item)
        kind = msg.get("type")
        if kind == "result" and msg.get("resident"):
            header = TensorHeader.model_validate(msg["tensor"])
            self._kept[header.tid] = (msg["resident"],
                                      TensorAssembler([header], header.nbytes()))
            self._maybe_keep(header.tid)
        if kind != "progress":
            self.relayed = True
        self.finished |= kind in FINAL_TYPES
        return item

    def _on_note(self, note: dict) -> None:
        if "replica" in note:
            self.replica = note
        elif "keep_upload" in note:
            tensor = self.uploads.get(note["keep_upload"])
            if tensor is not None:
                self.store.put(note["as"], tensor)

    def _on_frame(self, frame: bytes) -> None:
        head, payload = decode_frame(frame)
        if head["tid"] in self._kept:
            self._kept[head["tid"]][1].add(head, payload)
            self._maybe_keep(head["tid"])

    def _maybe_keep(self, tid: str) -> None:
        resident, asm = self._kept[tid]
        if asm.complete:
            del self._kept[tid]
            self.store.put(resident, asm.tensors()[tid])


__all__ = ["RelaySession", "is_final", "answer_type", "FINAL_TYPES"]
