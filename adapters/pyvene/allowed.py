"""The closed allow-list of pyvene intervention types that can run remotely.

An allowed intervention's ``forward`` is pyvene's own tensor math, which we *trace* on proxies
(never run on the server): its parameters (rotations, masks, autoencoder weights, constant
sources, noise) become tensor constants of the graph. Only these exact classes qualify: a
subclass may override ``forward`` with arbitrary Python, and a function (pyvene wraps lambdas
in ``LambdaIntervention``) is code, which never crosses the wire.
"""
from __future__ import annotations

import pyvene as pv
import torch
from pyvene.models.modeling_utils import LambdaIntervention

from hookwire.errors import TraceError

ALLOWED: frozenset[type] = frozenset({
    pv.VanillaIntervention, pv.ZeroIntervention, pv.AdditionIntervention,
    pv.SubtractionIntervention, pv.CollectIntervention, pv.SkipIntervention,
    pv.NoiseIntervention, pv.RotatedSpaceIntervention, pv.LowRankRotatedSpaceIntervention,
    pv.BoundlessRotatedSpaceIntervention, pv.SigmoidMaskRotatedSpaceIntervention,
    pv.SigmoidMaskIntervention, pv.AutoencoderIntervention,
    pv.JumpReLUAutoencoderIntervention,
})


class UnsupportedIntervention(TraceError):
    """An intervention that cannot become a graph: a custom class or a Python function."""
    code = "unsupported_intervention"


def check_intervention(key: str, intervention) -> None:
    kind = type(intervention)
    if kind in ALLOWED:
        return
    if kind is LambdaIntervention or not isinstance(intervention, torch.nn.Module):
        what = "a Python function"
    else:
        what = f"the class {kind.__module__}.{kind.__qualname__} (not one of pyvene's built-ins)"
    names = ", ".join(sorted(c.__name__ for c in ALLOWED))
    raise UnsupportedIntervention(
        f"intervention {key!r} is {what}, which cannot run remotely: the server runs only "
        "graphs of whitelisted tensor ops, never code sent by a client, and only pyvene's "
        f"built-in interventions are translated to such graphs ({names}). Run it locally, "
        "or express it with one of those", key=key, intervention=kind.__qualname__)


__all__ = ["ALLOWED", "UnsupportedIntervention", "check_intervention"]
