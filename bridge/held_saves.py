"""Saved values held back until no later in-place write of the graph can change them.

Locally a value a hook keeps (``cache[name] = x``, TL's ``run_with_cache``) *is* the
activation, and the model may hand that very tensor to a later site:
``blocks.0.hook_resid_post`` is ``blocks.1.hook_resid_pre`` in TL, a module's output is the
next module's input in HF. A later hook's in-place edit there (``x[:, 1] = 0``) shows in the
value kept earlier. The server used to send each saved value as it was at its own site.

So while a graph still has in-place writes to come, its saves are *held*: a snapshot is taken
at once (the value as it was), along with a weak reference to the tensor whose storage it
views (its ``_base``, or itself) and that tensor's version counter. When the last in-place
write has run, each held save is sent as it is *then* -- re-read from that tensor where it is
still alive (written since or not: unwritten it equals the snapshot, and read from the tensor,
two saves of one tensor still go as one value) -- and the snapshot otherwise. Weak references
only: holding a member's view of a batch would keep the whole batch's tensor alive, so a
tensor freed in the meantime (no later write can have reached it through a site) falls back
to the snapshot.

Within one site the graph already says what a value is: a save of the value as the site was
read, at a site the same graph then edits in place, means the value before the edit (the
interleaver keeps a copy for such reads too), so it stays the snapshot; a save of the very
value written in place is, locally, the activation itself, so it follows the activation.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(eq=False)  # entries are found by identity (they hold tensors)
class _Held:
    name: str
    stage: int
    snapshot: torch.Tensor
    nbytes: int
    root: "weakref.ref | None"  # the tensor whose storage the value views (None: fixed)
    root_id: int = 0  # id() of that tensor, the key HeldSaves finds the entry by
    version: int = 0
    size: tuple = ()
    stride: tuple = ()
    offset: int = 0

    def point_at(self, tensor: torch.Tensor) -> None:
        """Follow ``tensor`` (its storage, this geometry) from now on."""
        root = tensor._base if tensor._base is not None else tensor
        if root.dtype != tensor.dtype:  # a dtype view: no simple re-read
            self.root = None
            return
        self.root, self.root_id = weakref.ref(root), id(root)
        self.version = root._version
        self.size, self.stride = tuple(tensor.shape), tuple(tensor.stride())
        self.offset = tensor.storage_offset()

    def value(self) -> tuple[torch.Tensor, bool]:
        """(the value as it is now, whether it is the snapshot): re-read where its tensor is
        alive, else the snapshot."""
        root = self.root() if self.root is not None else None
        if root is None:
            return self.snapshot, True
        # Unwritten since, it equals the snapshot -- but read from the tensor itself, two
        # saves of one tensor (resid_post(i), resid_pre(i+1)) still go as one value and a
        # reference to it (worker.SentViews), as when nothing was held.
        return torch.as_strided(root, self.size, self.stride, self.offset), False


class HeldSaves:
    """The saves of one graph held until its last in-place site write has run (see the
    module docstring); ``last_write_stage`` is that site's stage, None when the graph edits
    nothing in place (then nothing is ever held). ``hold_bytes(n)`` is told the bytes of
    each snapshot before it is taken (it may refuse, raising) and ``hold_bytes(-n)`` as
    each is sent, or when the rest is dropped: the server counts them against the user's
    memory."""

    def __init__(self, last_write_stage: int | None,
                 hold_bytes: Callable[[int], None] | None = None):
        self.last_write_stage = last_write_stage
        self.hold_bytes = hold_bytes
        self.held: list[_Held] = []
        self.held_bytes = 0
        # Entries by the id of the tensor they follow, and by the stage they were saved at:
        # what a batch mate's replacement or a site's write looks up, in time proportional
        # to the entries it concerns (not to everything a co-tenant holds).
        self._by_root: dict[int, list[_Held]] = {}
        self._by_stage: dict[int, list[_Held]] = {}

    def _follow(self, entry: _Held, tensor: torch.Tensor | None) -> None:
        """Point ``entry`` at ``tensor`` (None: fixed to its snapshot), re-indexed; the
        caller has taken it out of its old bucket."""
        if tensor is None:
            entry.root = None
        else:
            entry.point_at(tensor)
        if entry.root is not None:
            self._by_root.setdefault(entry.root_id, []).append(entry)

    def _take(self, tensor: torch.Tensor, keep) -> list[_Held]:
        """The entries following ``tensor`` for which ``keep(entry)`` holds, out of the
        index (the others stay in it; those whose tensor died leave it: they never follow
        anything again)."""
        bucket = self._by_root.pop(id(tensor), [])
        taken, stay = [], []
        for entry in bucket:
            if entry.root is None or entry.root() is not tensor:
                continue
            (taken if keep(entry) else stay).append(entry)
        if stay:
            self._by_root[id(tensor)] = stay
        return taken

    def holds(self, stage: int) -> bool:
        """Whether a save made at ``stage`` waits (a later or this stage's write may still
        change it)."""
        return self.last_write_stage is not None and stage <= self.last_write_stage

    def hold(self, name: str, stage: int, value) -> None:
        if not isinstance(value, torch.Tensor):
            # Not a tensor: the sender refuses it, as it would unheld.
            self.held.append(_Held(name, stage, value, 0, None))
            return
        nbytes = value.numel() * value.element_size()
        if self.hold_bytes is not None:
            self.hold_bytes(nbytes)
        self.held_bytes += nbytes
        with torch.no_grad():
            entry = _Held(name, stage, value.detach().clone(), nbytes, None)
        self._follow(entry, value)
        self.held.append(entry)
        self._by_stage.setdefault(stage, []).append(entry)

    def written(self, stage: int, written_value, target: torch.Tensor) -> None:
        """The site of ``stage`` is about to be written in place (``target.copy_(
        written_value)``): saves of this stage stay as they were read, except a save of
        ``written_value`` itself, which is the activation from now on."""
        for entry in self._by_stage.pop(stage, ()):
            if entry.root is None:
                continue
            root = entry.root()
            bucket = self._by_root.get(entry.root_id, [])
            if entry in bucket:
                bucket.remove(entry)
            if root is written_value and written_value._base is None and \
                    entry.size == tuple(written_value.shape) and \
                    entry.stride == tuple(written_value.stride()) and \
                    entry.offset == written_value.storage_offset():
                self._follow(entry, target)
                entry.version = -1  # re-read after the write
            else:
                entry.root = None

    def moved(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """A batched forward goes on with ``new``, a copy of ``old`` (a batch mate replaced
        its rows): saves viewing ``old`` follow ``new``, as they would follow ``old`` in
        this graph's solo run (where nothing replaced it). ``old`` may itself be a view of
        a larger tensor (an output projection's result handed on as it is): what was kept
        of it is named in ``new``'s layout (:func:`same_part_in`); what was kept of the
        rest of that tensor stays on it."""
        if old.dtype != new.dtype or old.shape != new.shape:
            return
        if old._base is None and new._base is None and old.stride() == new.stride() and \
                old.storage_offset() == new.storage_offset():
            for entry in self._take(old, lambda entry: True):  # the same layout
                changed = old._version != entry.version
                entry.root, entry.root_id = weakref.ref(new), id(new)
                entry.version = -1 if changed else new._version  # -1: re-read
                self._by_root.setdefault(entry.root_id, []).append(entry)
            return
        root = old._base if old._base is not None else old
        places = {}

        def inside(entry):
            places[id(entry)] = same_part_in(old, new, entry.size, entry.stride,
                                              entry.offset)
            return places[id(entry)] is not None
        for entry in self._take(root, inside):
            changed = root._version != entry.version
            self._follow(entry, torch.as_strided(new, entry.size, *places[id(entry)]))
            if changed:
                entry.version = -1  # re-read

    def copied(self, value: torch.Tensor, into: torch.Tensor) -> None:
        """A batched forward copied this graph's replacement ``value`` into ``into`` (its
        rows of the batch the forward goes on with): a save of ``value``, or of a part of it
        (``y[:, 1:3]``), follows the same elements of ``into``, as solo it follows ``value``,
        which the forward goes on with there."""
        if value._base is not None or value.dtype != into.dtype or value.shape != into.shape:
            return
        for entry in self._take(value, lambda entry: True):
            changed = value._version != entry.version
            where = same_part_in(value, into, entry.size, entry.stride, entry.offset)
            if where is None:  # not a part this can name in ``into``: it stays as it was
                entry.root = None
                continue
            self._follow(entry, torch.as_strided(into, entry.size, *where))
            if changed:
                entry.version = -1  # re-read

    def release(self):
        """Yields (name, value now, whether that is a copy of its own) of every held save,
        in the order they were saved, giving back each one's bytes just before it is handed
        on (the sender then counts it as a result: counted once, never twice); holds no
        more."""
        held, self.held = self.held, []
        self._by_root, self._by_stage = {}, {}
        views = []  # re-read views live until all are sent: a later one may be the same
        try:
            for e in held:
                self._give_back(e.nbytes)
                if isinstance(e.snapshot, torch.Tensor):
                    value, own = e.value()
                    if not own:
                        views.append(value)
                    yield e.name, value, own
                else:
                    yield e.name, e.snapshot, False
        finally:  # (refused midway: an error's frames keep no view of the batch alive)
            held.clear()
            views.clear()

    def _give_back(self, nbytes: int) -> None:
        if nbytes and self.hold_bytes is not None:
            self.hold_bytes(-nbytes)
        self.held_bytes -= nbytes

    def clear(self) -> None:
        """The request is over (or goes again, ``_run_again``): drop what is held and give
        its bytes back (a retried graph holds its saves anew)."""
        self.held = []
        self._by_root, self._by_stage = {}, {}
        if self.held_bytes:
            self._give_back(self.held_bytes)


__all__ = ["HeldSaves"]


def same_part_in(value: torch.Tensor, into: torch.Tensor, size: tuple, stride: tuple,
                  offset: int) -> tuple[tuple, int] | None:
    """(strides, storage offset) that show in ``into`` the elements the view (``size``,
    ``stride``, ``offset``) shows of ``value``, a tensor of the same shape -- or None where
    ``into``'s layout cannot name that view (``value`` not contiguous, a view whose steps
    carry over from one of ``value``'s dimensions into the next).

    ``value`` is contiguous, so an element's storage offset (from ``value``'s own) is its
    row-major position, and so is each step of the view: written in the mixed radix of
    ``value``'s shape, a step is so many positions along each dimension. Where no step carries
    (each dimension's reach stays inside its extent, checked at the view's last element), the
    view's elements are exactly those at ``first + i * steps``, which in ``into`` are at the
    same multiples of its own strides."""
    if not value.is_contiguous():
        return None
    shape = tuple(value.shape)
    if into.is_contiguous() and tuple(into.shape) == shape:
        # The same row-major layout: every view of ``value`` -- one whose steps carry from a
        # dimension into the next too (``y.view(-1)[60:70]``) -- is the same view of
        # ``into``, shifted by the difference of their offsets.
        start = offset - value.storage_offset()
        if start < 0 or (all(size) and start + sum((n - 1) * st for n, st in zip(size, stride))
                         >= value.numel()):
            return None
        return tuple(stride), into.storage_offset() + start
    units = value.stride()

    def digits(n: int) -> list[int] | None:
        out = [(n // unit) % extent if extent > 1 else 0 for extent, unit in zip(shape, units)]
        return out if sum(d * u for d, u in zip(out, units)) == n else None

    first = digits(offset - value.storage_offset()) if offset >= value.storage_offset() \
        else None
    if first is None:
        return None
    reach = list(first)
    out_strides = []
    for n, step in zip(size, stride):
        if n == 1 or step == 0:  # no step taken (a broadcast repeats the element)
            out_strides.append(0)
            continue
        moves = digits(step)
        if moves is None:
            return None
        for d, m in enumerate(moves):
            reach[d] += (n - 1) * m
        out_strides.append(sum(m * into.stride(d) for d, m in enumerate(moves)))
    if any(r >= extent for r, extent in zip(reach, shape)):
        return None
    start = into.storage_offset() + sum(i * st for i, st in zip(first, into.stride()))
    return tuple(out_strides), start
