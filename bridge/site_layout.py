"""How a site's activation lies in memory, so that a trace sees the strides the real tensor has.

Whether ``x.contiguous()`` is a copy or ``x`` itself, and whether ``x.view(-1)`` works at
all, depend on the activation's strides, not only its shape. Most sites hand their hooks a
contiguous tensor; some do not: Llama's ``attn.hook_rot_q``/``hook_rot_k`` are (batch,
heads, seq, d_head) laid out as (batch, seq, heads, d_head); GPT-2's ``hook_pos_embed`` is one
row broadcast over the batch (stride 0); DeepSeek's ``attn.hook_v`` and Qwen3.5's linear
attention ``hook_q/k/v`` are slices of a wider buffer (a gap after each row). A trace that
assumed a contiguous proxy made ``rot_k.contiguous()`` a copy where it is the tensor itself
locally (the edit after it was lost, logits off by 1e-3), and
``pos_embed.contiguous().view(-1)`` fail on the server where it works locally.

A :data:`Layout` gives each dim's stride as ``coef * B**b * S**s`` -- ``(coef, b, s)``, with
B the request's batch and S its sequence length, ``b`` in {0, 1} and ``s`` in {0, 1, 2} --
which covers permuted, broadcast (coef 0) and sliced layouts alike. The server fits it to its
two probes of the model (``server/manifest.py``) and describes it with each site that is not
contiguous; tracers build the site's proxy with :func:`strides_for` its request's size. A
site whose strides no such formula fits both probes of is described as contiguous, as
before.
"""
from __future__ import annotations

Layout = tuple[tuple[int, int, int], ...]

# The powers of B and S a stride may have, in the order a fit tries them.
_MONOMIALS = tuple((b, s) for s in range(3) for b in range(2))
MAX_COEF = 1 << 40


def strides_for(layout: Layout | None, batch: int, seq: int) -> tuple[int, ...] | None:
    """The strides a site's activation has for a request of ``batch`` x ``seq`` (None:
    contiguous)."""
    if layout is None:
        return None
    return tuple(coef * batch ** b * seq ** s for coef, b, s in layout)


def _fit(sizes, strides, probes) -> tuple[int, int, int] | None:
    """One dim's ``(coef, b, s)`` from its size and stride in each probe ``(batch, seq)``:
    the one monomial whose coefficient is the same whole number in every probe where the dim
    is stepped through (size > 1; a size-1 dim's stride says nothing)."""
    seen = [(st, b, s) for size, st, (b, s) in zip(sizes, strides, probes) if size > 1]
    if not seen:
        return (0, 0, 0)
    fits = set()
    for pb, ps in _MONOMIALS:
        coefs = {st // (b ** pb * s ** ps) if st % (b ** pb * s ** ps) == 0 else None
                 for st, b, s in seen}
        if len(coefs) == 1 and None not in coefs:
            coef = coefs.pop()
            fits.add((coef, pb, ps) if coef else (0, 0, 0))
    return fits.pop() if len(fits) == 1 else None


def layout_of(probes) -> Layout | None:
    """The layout of a site from its value in each probe, ``((batch, seq), shape, strides)``,
    or None: contiguous in every probe, or strides no layout fits (the site is then traced
    as contiguous)."""
    probes = [(tuple(size), tuple(shape), tuple(strides)) for size, shape, strides in probes]
    if not probes or len({len(shape) for _, shape, _ in probes} |
                         {len(strides) for _, _, strides in probes}) != 1:
        return None
    if all(_is_contiguous(shape, strides) for _, shape, strides in probes):
        return None
    sizes = [size for size, _, _ in probes]
    layout = []
    for dim in range(len(probes[0][1])):
        fit = _fit([shape[dim] for _, shape, _ in probes],
                   [strides[dim] for _, _, strides in probes], sizes)
        if fit is None or fit[0] > MAX_COEF:
            return None
        layout.append(fit)
    return tuple(layout)


def _is_contiguous(shape, strides) -> bool:
    """As torch decides it: no elements, or the row-major strides wherever a dim is stepped
    through (size > 1)."""
    if any(size == 0 for size in shape):
        return True
    step = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size > 1 and stride != step:
            return False
        step *= size
    return True


def check_layout(layout, rank: int) -> Layout | None:
    """A layout as described over the wire, checked against the site's rank: ``ValueError``
    unless it has one ``(coef, b, s)`` per dim, each in range."""
    if layout is None:
        return None
    out = tuple(tuple(int(v) for v in dim) for dim in layout)
    if len(out) != rank or any(len(dim) != 3 or not 0 <= dim[0] <= MAX_COEF or
                               dim[1] not in (0, 1) or dim[2] not in (0, 1, 2)
                               for dim in out):
        raise ValueError(f"layout {layout!r} is not one (coef, b, s) per dim of {rank}")
    return out  # type: ignore[return-value]


__all__ = ["Layout", "strides_for", "layout_of", "check_layout", "MAX_COEF"]
