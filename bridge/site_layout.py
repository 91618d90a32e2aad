"""How a site's activation lies in memory, so that a trace sees the strides the real tensor has.

Whether ``x.contiguous()`` is a copy or ``x`` itself, and whether ``x.view(-1)`` works at
all, depend on the activation's strides, not only its shape. Most sites hand their hooks a
contiguous tensor; some do not: Llama's ``attn.hook_rot_q``/``hook_rot_k`` are (batch,
heads, seq, d_head) laid out as (batch, seq, heads, d_head); GPT-2's ``hook_pos_embed`` is one
row broadcast over the batch (stride 0). A trace that assumed a contiguous proxy made
``rot_k.contiguous()`` a copy where it is the tensor itself locally (the edit after it was
lost, logits off by 1e-3), and ``pos_embed.contiguous().view(-1)`` fail on the server where it
works locally.

A :data:`Layout` is ``(order, broadcast)``: the dims that are not broadcast, from the
outermost (largest stride) to the innermost, and the dims with stride 0. The server derives
it from its two probes of the model (``server/manifest.py``) and describes it with each site;
tracers build the site's proxy with :func:`strides_for` its request's shape. A site whose
strides fit no such layout (a slice of a larger buffer) is described as contiguous, as
before.
"""
from __future__ import annotations

Layout = tuple[tuple[int, ...], tuple[int, ...]]


def strides_for(shape, layout: Layout | None) -> tuple[int, ...] | None:
    """The strides a tensor of ``shape`` has under ``layout`` (None: contiguous)."""
    if layout is None:
        return None
    order, broadcast = layout
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(int(shape[dim]), 1)
    for dim in broadcast:
        strides[dim] = 0
    return tuple(strides)


def _fits(shape, strides, layout: Layout) -> bool:
    # Dims of size 1 are never stepped through: their strides do not matter.
    expected = strides_for(shape, layout)
    return expected is not None and all(
        size == 1 or s == e for size, s, e in zip(shape, strides, expected))


def layout_of(probes) -> Layout | None:
    """The layout every probe ``(shape, strides)`` of one site fits, or None: contiguous, or
    no permutation-with-broadcast describes them (the site is then traced as contiguous)."""
    probes = [(tuple(shape), tuple(strides)) for shape, strides in probes]
    if not probes or any(len(shape) != len(strides) for shape, strides in probes):
        return None
    shape, strides = probes[0]
    broadcast = tuple(d for d, (size, s) in enumerate(zip(shape, strides))
                      if s == 0 and size > 1)
    rest = [d for d in range(len(shape)) if d not in broadcast]
    order = _order(shape, strides, rest)
    layout: Layout = (order, broadcast)
    if not all(_fits(sh, st, layout) for sh, st in probes):
        return None
    if order == tuple(range(len(shape))) and not broadcast:
        return None
    return layout


def _order(shape, strides, rest) -> tuple[int, ...]:
    """The dims of size > 1 by stride, outermost first, with each size-1 dim kept right after
    the dim before it (where a contiguous layout has it: its stride says nothing)."""
    order = sorted((d for d in rest if shape[d] > 1), key=lambda d: -strides[d])
    for d in (d for d in rest if shape[d] == 1):
        before = [o for o in order if o < d]
        at = order.index(before[-1]) + 1 if before else 0
        order.insert(at, d)
    return tuple(order)


def check_layout(layout, rank: int) -> Layout | None:
    """A layout as described over the wire, checked against the site's rank: ``ValueError``
    unless its dims are each named once (order and broadcast together)."""
    if layout is None:
        return None
    order, broadcast = (tuple(int(d) for d in part) for part in layout)
    if sorted(order + broadcast) != list(range(rank)):
        raise ValueError(f"layout {layout!r} does not name each of {rank} dims once")
    return order, broadcast


__all__ = ["Layout", "strides_for", "layout_of", "check_layout"]
