"""Seeded randomness that gives the same numbers locally and remotely.

``hookwire.randn_like(act, seed=0)`` draws from a fresh CPU generator seeded with ``seed``
(then moves to the activation's device), so a local run and a remote run of the same hook
produce identical noise. Plain ``torch.randn_like(act)`` in a remote hook also works: it is
traced with a seed drawn from the caller's torch RNG (so ``torch.manual_seed`` makes the run
reproducible), but its draws differ from a local ``randn_like``'s.
"""
from __future__ import annotations

import torch


def _draw(kind: str, like: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    dtype = dtype or like.dtype
    fn = torch.randn if kind == "randn" else torch.rand
    return fn(tuple(like.shape), generator=gen, dtype=dtype).to(like.device)


def seeded_randn_like(x: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    return _draw("randn", x, seed, dtype)


def seeded_rand_like(x: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    return _draw("rand", x, seed, dtype)


def randn_like(x: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    """Normal noise shaped like ``x`` from ``seed``: identical locally and remotely."""
    from hookwire.trace import Proxy

    if isinstance(x, Proxy):
        return x._hw_tracer.random("randn_like", x, seed, dtype)
    return seeded_randn_like(x, seed, dtype)


def rand_like(x: torch.Tensor, seed: int, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) noise shaped like ``x`` from ``seed``: identical locally and remotely."""
    from hookwire.trace import Proxy

    if isinstance(x, Proxy):
        return x._hw_tracer.random("rand_like", x, seed, dtype)
    return seeded_rand_like(x, seed, dtype)
