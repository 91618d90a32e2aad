"""Remote outputs and autograd: the value a remote backward pass started from, handed back
so that ``value.backward()`` still works in the user's code; and an output whose gradient
stays on the server, whose ``.backward()`` says so.

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


def gradient_unchanged(result, grad) -> bool:
    """Whether a traced backward hook's return value leaves the gradient as it was: None, or
    the very gradient it was given (``return grad``, alone or in the 1-tuple torch passes).
    Remote backward hooks may read gradients, not replace them."""
    if isinstance(result, tuple) and len(result) == 1:
        result = result[0]
    return result is None or result is grad


class GradientNotAvailable(HookwireError, RuntimeError):
    """``.backward()`` through the output of a remote forward that ran no backward pass:
    the server kept no autograd graph, so there is nothing to differentiate here. (A
    ``RuntimeError`` too, as torch raises for a tensor without a grad_fn.)"""
    code = "gradient_not_available"


class _GradientStaysRemote(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, anchor):
        # The wire's tensor itself, marked as changed in place: no copy (logits can be
        # hundreds of MB), and the user may still edit it in place as a local output.
        ctx.mark_dirty(value)
        return value

    @staticmethod
    def backward(ctx, grad):
        raise GradientNotAvailable(
            "this tensor came from a remote forward, and the server ran no backward pass for "
            "it: its autograd graph (and the weights) are on the server. To differentiate "
            "remotely, say so in the call: backward hooks with return_type='loss', "
            "run_with_cache(..., incl_bwd=True), or metric=lambda output: <scalar> -- the "
            "server then runs the backward pass; or run the model locally")


class _BackwardOnDemand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, anchor, replay):
        ctx.mark_dirty(value)  # no copy, as in _GradientStaysRemote
        ctx.replay = replay
        return value

    @staticmethod
    def backward(ctx, grad):
        ctx.replay(grad)
        return None, None, None


def backward_on_demand(value, replay):
    """``value`` (a remote forward's output, computed with backward hooks attached) with a
    grad_fn whose backward calls ``replay(grad)``: the caller runs the forward again on the
    server, this time with a backward pass seeded with ``grad`` (d output = grad), so the
    backward hooks run as they would have in a local ``output....backward()``."""
    anchor = torch.zeros((), requires_grad=True)
    return _BackwardOnDemand.apply(value, anchor, replay)


def gradient_stays_remote(value):
    """``value`` (a remote forward's output) with ``requires_grad`` as a local output has,
    and a grad_fn whose backward raises :class:`GradientNotAvailable` instead of torch's
    "does not require grad". Non-float values and tuples' other members pass through."""
    if isinstance(value, tuple):
        return tuple(gradient_stays_remote(v) for v in value)
    if not isinstance(value, torch.Tensor) or not value.dtype.is_floating_point or \
            value.requires_grad:
        return value
    anchor = torch.zeros((), requires_grad=True)
    return _GradientStaysRemote.apply(value, anchor)


__all__ = ["backward_ran_on_server", "backward_on_demand", "gradient_stays_remote",
           "gradient_unchanged",
           "GradientNotAvailable"]
