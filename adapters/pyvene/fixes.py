"""Where pyvene 0.1.8 is wrong, the remote run does the correct thing instead.

Per-example subspaces on a (batch, units, dim) representation. pyvene's swap helper indexes
``base[..., pad_idx, sel]`` with ``pad_idx = arange(base.shape[-2])`` -- the *units* axis,
not the batch -- so with equal-length, different subspaces per example (say ``[[0, 1],
[5, 6]]``) every example swaps the union of all examples' dimensions (or, with as many units
as examples, example i's dims land on unit i). That hits the localist interventions, which
keep the units axis: Vanilla, Addition, Subtraction, Zero, and JumpReLUAutoencoder's latent
swap (``keep_last_dim``); Collect and the rotations flatten the units first and are right. Example i should swap (or add, subtract, zero) exactly its own dimensions, at
every unit -- which is what
pyvene computes when each example runs alone, and what the tests check against.

Also: pyvene sets ``use_fast`` on the model the first time a call's unit locations are
broadcast (an int or a flat list) and never resets it, so a later call with per-example
locations would scatter every example at the first example's positions. The remote model
decides ``use_fast`` per call (``model.py``). A model built with ``use_fast=True`` asks for
pyvene's fast path on purpose -- the first example's locations and subspaces stand for the
whole batch -- and gets exactly that, per-example subspaces included.
"""
from __future__ import annotations

import pyvene as pv
import torch

_MODES = {pv.VanillaIntervention: "interchange", pv.AdditionIntervention: "add",
          pv.SubtractionIntervention: "subtract", pv.ZeroIntervention: "zero",
          pv.JumpReLUAutoencoderIntervention: "latent"}


def needs_fix(intervention, selected, subspaces) -> bool:
    """True for per-example subspaces that differ, have equal lengths, on a 3-d value --
    unless the intervention was built with ``use_fast=True`` (``IntervenableModel(...,
    use_fast=True)``): then pyvene takes the first example's subspace for the whole batch by
    design ("only the first one will be considered"), and so does the remote run."""
    if type(intervention) not in _MODES or subspaces is None or selected.dim() != 3 or \
            getattr(intervention, "use_fast", False):
        return False
    rows = [list(s) for s in subspaces]
    return len(rows) > 1 and len({len(r) for r in rows}) == 1 and \
        any(r != rows[0] for r in rows)


def _dims(intervention, subspaces) -> torch.Tensor:
    """(batch, k) feature indices, partitions expanded as pyvene expands them."""
    partition = intervention.subspace_partition
    rows = []
    for s in subspaces:
        rows.append([i for part in s for i in partition[part]] if partition else list(s))
    return torch.tensor(rows, dtype=torch.int64)


def _mask(dims: torch.Tensor, like) -> torch.Tensor:
    """(batch, 1, dim) 0/1 weights selecting each example's dims. Weights, not torch.where:
    exact (x * 1 == x, x * 0 == 0) and traced as plain arithmetic."""
    b, d = like.shape[0], like.shape[-1]
    mask = torch.zeros(b, 1, d, dtype=like.dtype)
    mask[torch.arange(b)[:, None], 0, dims] = 1.0
    return mask


def per_example_swap(intervention, base, source, subspaces):
    """The intervention on each example's own subspace (base: batch, units, dim)."""
    mode = _MODES[type(intervention)]
    dims = _dims(intervention, subspaces)
    if mode == "latent":  # swap the examples' own latents, then decode (pyvene's math)
        base_latent, source_latent = intervention.encode(base), intervention.encode(source)
        mask = _mask(dims, base_latent)
        return intervention.decode(base_latent * (1.0 - mask) + source_latent * mask)
    mask = _mask(dims, base)
    if mode == "zero":
        return base * (1.0 - mask)
    if intervention.source_representation is not None:
        source = intervention.source_representation
    if source.shape != base.shape:
        source = source.expand(base.shape)  # pyvene broadcasts a (d,) source the same way
    if mode == "interchange":
        return base * (1.0 - mask) + source * mask
    sign = 1.0 if mode == "add" else -1.0
    return base + sign * mask * source

__all__ = ["needs_fix", "per_example_swap"]
