"""Seeded randomness drawn on the server, identical locally and remotely.

``hookwire.randn_like(act, seed=0)`` draws from a fresh CPU generator seeded with ``seed``
(then moves to the activation's device), so a local run and a remote run of the same hook
produce identical noise, and nothing is uploaded: the noise is made where it is used.

Plain ``torch.randn_like(act)`` (and ``rand_like``, ``randint_like``, in-place fills such as
``act.normal_()``, ``F.dropout`` in training mode) in a remote hook is drawn on the caller's
machine while tracing, from the caller's generator, exactly as a local CPU run draws it
(``hookwire.trace``), and sent as a constant: the remote result equals the local one and the
caller's RNG state moves as it would locally -- at the price of uploading the noise, which
``hookwire.randn_like`` avoids for large activations.
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
