"""The tensors a request's graph names: what the client attached, and the served model's own
parameters (``"@<name>"`` constants, :mod:`hookwire.ir.wire`)."""
from __future__ import annotations

from hookwire.errors import GraphValidationError, ProtocolError
from hookwire.ir import is_parameter
from hookwire.validate import Limits


def graph_constants(job, graph, entry, limits: Limits, what: str = "the graph") -> dict:
    """The tensors a graph's ``constants`` name: attachments, and ``"@<name>"`` parameters of
    the served model (read only: hookwire.executor never lets one become an activation)."""
    constants, missing = {}, []
    for tid in graph.constants:
        if is_parameter(tid):
            if not limits.allow_parameter_reads:
                raise GraphValidationError(f"{what} reads the model's parameter {tid[1:]!r}; "
                                           "this server does not allow that",
                                           rule="parameter_reads")
            tensor = (entry.parameters or {}).get(tid[1:])
            if tensor is None:
                raise GraphValidationError(f"{what} names {tid[1:]!r}, which is no parameter "
                                           f"or buffer of {graph.model!r}",
                                           rule="unknown_parameter")
            constants[tid] = tensor
        elif tid in job.tensors:
            constants[tid] = job.tensors[tid]
        else:
            missing.append(tid)
    if missing:
        raise ProtocolError(f"{what}: constants declared but not attached: {missing[:5]}")
    return constants


__all__ = ["graph_constants"]
