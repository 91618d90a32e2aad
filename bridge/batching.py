"""Several requests' graphs in one forward pass.

Each request owns a contiguous block of rows of the batch and, when requests of different
lengths are right-padded together, its first ``seq`` positions (causal attention: padding
after a request's last token cannot change anything at or before it, so its positions equal
its solo run). At every site each request's interleaver sees a *view* of its own rows and
positions, so ``act[:, -1]`` is its own last token, an in-place edit lands in its own rows,
and a replacement is copied back into its own block only.

A request whose op fails mid-forward is dropped from the rest of the pass (its error goes to
its own callback); its batch mates go on. The forward stops early once no request needs a
later site or the output.

Only *batch-major* sites (:func:`is_batch_major`: one dim is the batch) can be split into
rows. A site that holds one tensor for the whole batch (GPT-2's position ids, Llama's rotary
tables: no batch dim at all) is *shared*: each member reads its own positions of it, and a
write would reach every member, so the server runs a request that writes such a site alone.
Any other layout (a flattened batch x position dim, dims the manifest names otherwise) cannot
be split here at all: a request that touches it runs alone (:func:`site_batching`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hookwire.errors import ExecutionError
from hookwire.executor import Interleaver, StopForward
from hookwire.module_sites import attach


def is_batch_major(shape) -> bool:
    """True for a site's symbolic shape with exactly one batch dim ("B") and otherwise only
    positions ("S") and fixed sizes: a member's rows of it are its own."""
    return sum(d == "B" for d in shape) == 1 and \
        all(d in ("B", "S") or _fixed(d) for d in shape)


def is_batch_shared(shape) -> bool:
    """True for a site with no batch dim at all (positions and fixed sizes only): one value
    the whole batch shares, e.g. position ids (1, S) or rotary tables (1, S, d)."""
    return all(d == "S" or _fixed(d) for d in shape)


def _fixed(d) -> bool:
    return isinstance(d, int) and not isinstance(d, bool)


def site_batching(shape, writes: bool) -> bool:
    """May a request that reads (``writes=False``) or writes this site share a forward?
    Reads of batch-major and batch-shared sites may; writes only into batch-major ones."""
    if is_batch_major(shape):
        return True
    return not writes and is_batch_shared(shape)


@dataclass
class BatchMember:
    """One request's share of a batched forward: its interleaver, its block of ``rows`` and
    its own ``seq`` positions, whether its logits are wanted, and where its error goes. A
    member whose op fails is deactivated (``fail``); the others go on."""
    interleaver: Interleaver
    rows: slice
    seq: int
    need_output: bool
    on_error: Callable[[BaseException], None]
    error: BaseException | None = None
    _index: dict = field(default_factory=dict)

    def __post_init__(self):
        self._index = {(info.name, info.call): i
                       for i, info in enumerate(self.interleaver.vg.site_infos)}

    @property
    def active(self) -> bool:
        return self.error is None

    @property
    def wants_more(self) -> bool:
        return self.active and (self.need_output or not self.interleaver.finished_sites)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.on_error(exc)

    def own_part(self, info, full_seq: int):
        """Index of this member's rows (dims named B) and positions (dims named S)."""
        if self.seq == full_seq:
            positions = slice(None)
        else:
            positions = slice(0, self.seq)
        return tuple(self.rows if d == "B" else positions if d == "S" else slice(None)
                     for d in info.shape)


def run_batch(members: list[BatchMember], site_modules: dict, forward: Callable[[], object],
              full_seq: int):
    """One forward for all members; returns its output (None if stopped early)."""
    names = dict.fromkeys(info.name for m in members for info in m.interleaver.vg.site_infos)
    for m in members:
        try:
            m.interleaver.start()
        except Exception as exc:
            m.fail(exc)
    handles = []
    try:
        for name in names:
            handles.append(attach(site_modules[name], name,
                                  _batch_hook(name, members, full_seq)))
        try:
            return forward()
        except StopForward:
            return None
    finally:
        for h in handles:
            h.remove()


def _broadcast(t) -> bool:
    """True if elements of ``t`` share memory along a dim (stride 0, e.g. ``expand``)."""
    return any(st == 0 and sz > 1 for sz, st in zip(t.shape, t.stride()))


def _own_copy_for_inplace(output, name: str, call: int, members, full_seq: int):
    """An activation broadcast over the batch (GPT-2's position embeddings, one row
    expanded to every row) has no memory of each member's own: a member's in-place write
    into "its" row would land in every row. Members that write in place then get rows of a
    copy (which the forward goes on with); a member whose own rows are themselves broadcast
    gets the error torch raises for the same write when it runs alone."""
    writers = [m for m in members if m.active and m._index.get((name, call)) in
               m.interleaver.inplace_sites]
    if not writers or not isinstance(output, torch.Tensor) or not _broadcast(output):
        return None
    for m in writers:
        info = m.interleaver.vg.site_infos[m._index[(name, call)]]
        if _broadcast(output[m.own_part(info, full_seq)]):
            m.fail(ExecutionError(f"in-place write into site {info.name!r} failed: its value "
                                  "is one tensor broadcast over the batch (torch refuses "
                                  "the write, as it does locally)"))
    return output.clone()


class LayoutNotShared(Exception):
    """A member replaced a site with a tensor the batch cannot go on with as its solo
    forward would: the batched forward stops, and its members run again without each other
    (server/worker.py ``_run_again``: a writer alone)."""


def _check_layout(value, own, output, members) -> None:
    """Raise :class:`LayoutNotShared` for a replacement whose memory layout the batch's copy
    loses: elements sharing memory (``x[:, :1].expand_as(x)``), gaps or a dim order other
    than the activation's (``output``: a permuted one, e.g. Llama's q/k, is kept), unless it
    is the member's own view of the site (``own``: ``return x``). Run alone, the forward goes
    on with that very tensor, and the model's ``view`` of it (GPT-2's Conv1D:
    ``x.view(-1, d)``) or a later in-place write fails; copied into the batch's rows, both
    succeeded, and a value came back where solo an error did."""
    if not isinstance(value, torch.Tensor) or value.is_contiguous() or \
            sum(m.active for m in members) < 2:
        return
    if value.shape == own.shape and value.stride() == own.stride() and \
            value.storage_offset() == own.storage_offset() and \
            value.untyped_storage().data_ptr() == own.untyped_storage().data_ptr():
        return  # its own rows of the site (``return x``): solo, the activation itself
    if value.dim() == output.dim() and _dense_in_order_of(value, output):
        return  # laid out as the activation is (solo, the same layout goes on)
    raise LayoutNotShared(f"a replacement of shape {tuple(value.shape)} with strides "
                          f"{tuple(value.stride())} cannot go on in a shared forward")


def _dense_in_order_of(value: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``value`` is dense (no gaps, no shared elements) with its dims in the memory
    order of ``like``'s (size-1 dims do not count)."""
    strides = like.stride()
    order = sorted(range(like.dim()), key=lambda d: -strides[d])  # outermost first
    expect, step = [0] * value.dim(), 1
    for d in reversed(order):
        expect[d] = step
        step *= value.shape[d]
    return all(size == 1 or st == ex for size, st, ex in
               zip(value.shape, value.stride(), expect))


def _batch_hook(name: str, members: list[BatchMember], full_seq: int):
    counter = [0]

    def hook(module, args, output):
        call = counter[0]
        counter[0] += 1
        replacements, replaced = [], set()
        original = output
        new = _own_copy_for_inplace(output, name, call, members, full_seq)
        if new is not None:
            output = new
        for m in members:
            index = m._index.get((name, call)) if m.active else None
            if index is None:
                continue
            info = m.interleaver.vg.site_infos[index]
            part = m.own_part(info, full_seq)
            try:
                result = m.interleaver.at_site(index, output[part])
            except Exception as exc:
                m.fail(exc)
                continue
            if result is not None:
                _check_layout(result, output[part], output, members)
                replacements.append((m, part, result))
                replaced.add(id(m))
        if replacements:
            # Applied after every member's in-place edits, so none is lost in the copy --
            # always a fresh one: what a replacing member read of ``output`` (which may be
            # the copy made for in-place writers above) stays as it read it, as solo, where
            # its replacement is a tensor of its own.
            new = output.clone()
            for m, part, value in replacements:
                new[part] = value
                if isinstance(value, torch.Tensor):  # solo, the forward goes on with it
                    m.interleaver.copied(value, new[part])
        if new is not None and isinstance(original, torch.Tensor):
            # The forward goes on with a copy: a member that replaced nothing here would, run
            # alone, go on with `original`, and what it kept of it would show its later
            # in-place edits -- which now land in the copy (hookwire.held_saves). (Where
            # in-place writers got a copy of their own first, what members read here views
            # that copy: it follows the forward's tensor too.)
            for m in members:
                if m.active and id(m) not in replaced:
                    m.interleaver.moved(original, new)
                    if output is not original and output is not new:
                        m.interleaver.moved(output, new)
        if not any(m.wants_more for m in members):
            raise StopForward
        return new
    return hook


__all__ = ["BatchMember", "LayoutNotShared", "run_batch"]
