"""The value a remote backward pass started from, handed back so that ``value.backward()``
still works in the user's code.

The server already ran the backward pass (the user's backward hooks ran there, traced, and
their results are in the user's objects). Locally, ``loss.backward()`` -- which TL's
``run_with_cache(incl_bwd=True)`` and most notebooks call -- must then be a no-op. It is,
but only for exactly the backward the server ran (d value / d value = 1): anything else
(``(2 * loss).backward()``, a loss combined with local tensors) would differ from a local
run, so it raises instead of being silently wrong.
"""
from __future__ import annotations

import torch

from hookwire.errors import HookwireError


class _BackwardRanOnServer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, anchor):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        if grad.numel() != 1 or not bool((grad == 1).all()):
            raise HookwireError(
                "this value's backward pass already ran on the server, from the value itself "
                "(gradient 1). A backward through it with another gradient (scaled, or combined "
                "with other tensors) cannot be replayed here: put that computation in "
                "metric=lambda output: ... so the server differentiates it")
        return None, None


def backward_ran_on_server(value: torch.Tensor) -> torch.Tensor:
    """``value`` with a grad_fn whose backward is the no-op described above."""
    anchor = torch.zeros((), requires_grad=True)
    return _BackwardRanOnServer.apply(value, anchor)


__all__ = ["backward_ran_on_server"]
