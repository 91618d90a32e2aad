"""Training interventions against a remote model: gradients of the client's own parameters.

A trainable intervention's parameters (a rotation, a mask, boundaries) live on the client.
When a call is traced with autograd on, every tensor derived from them enters the graph as a
constant that still ``requires_grad`` locally. The call then becomes one autograd op,
:class:`_ServerCall`, whose inputs are those constants and whose outputs are the returned
logits (and collected activations):

- forward: the graph runs on the server as usual;
- backward: the client sends ``dL/d(outputs)`` as constants; the server re-runs the same
  forward with autograd on and differentiates ``sum(output * dL/doutput)`` with respect to
  the constants (``const.grad``), never the weights. The client's autograd carries those
  gradients on through whatever made the constants (pyvene's orthogonal parametrization).

Re-running the forward (as activation checkpointing does) keeps the server stateless between
the two requests: nothing is held for a backward that may never come. The issue suggested a
split protocol (activations to the client, intervention applied locally, the rest of the
forward on the server); running the intervention on the server instead needs one round trip
per direction, and the same graph serves inference and training.
"""
from __future__ import annotations

import copy

import torch

from hookwire.ir.special import CONST_GRAD


class _ServerCall(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: "DifferentiableCall", *leaves):
        ctx.call = call
        return tuple(call.run_forward())

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        return (None, *ctx.call.run_backward(grads))


class DifferentiableCall:
    """One traced call whose ``outputs`` (save names) are differentiable with respect to
    ``leaves``: (constant id, the client's tensor that requires grad)."""

    def __init__(self, graph: dict, tensors: dict, outputs: list[str],
                 leaves: list[tuple[str, torch.Tensor]], request):
        self.graph, self.tensors, self.outputs = graph, tensors, outputs
        self.leaves = leaves
        self.request = request  # (graph, tensors) -> {save name: tensor}

    def apply(self) -> dict[str, torch.Tensor]:
        values = _ServerCall.apply(self, *(t for _, t in self.leaves))
        return dict(zip(self.outputs, values))

    def run_forward(self) -> list[torch.Tensor]:
        values = self.request(self.graph, self.tensors)
        return [values[name] for name in self.outputs]

    def run_backward(self, grads) -> list[torch.Tensor]:
        graph, tensors = backward_graph(self.graph, self.tensors, self.outputs, grads,
                                        [tid for tid, _ in self.leaves])
        if graph is None:  # no output had a gradient
            return [torch.zeros_like(t) for _, t in self.leaves]
        values = self.request(graph, tensors)
        return [values[f"__grad_{tid}"].to(device=t.device, dtype=t.dtype)
                for tid, t in self.leaves]


def _crop_positions(grad: torch.Tensor):
    """(start, stop) along dim 1 outside which ``grad`` is zero: a loss on the last token's
    logits then sends one position of ``dL/dlogits``, not the whole (batch, seq, vocab)."""
    if grad.dim() < 2:
        return None
    live = grad.detach().reshape(grad.shape[0], grad.shape[1], -1).ne(0).any(2).any(0)
    idx = live.nonzero().flatten()
    if idx.numel() == 0:
        return 0, 0
    return int(idx[0]), int(idx[-1]) + 1


def backward_graph(graph: dict, tensors: dict, outputs: list[str], grads,
                   leaf_ids: list[str]):
    """The graph that re-runs ``graph`` and reads d(sum_k <output_k, grad_k>)/d(leaf)."""
    g = copy.deepcopy(graph)
    tensors = dict(tensors)
    nodes = g["nodes"]
    next_id = [max((n["id"] for n in nodes), default=-1) + 1]

    def emit(op, *args):
        nodes.append({"id": next_id[0], "op": op, "args": list(args)})
        next_id[0] += 1
        return next_id[0] - 1

    total = None
    for k, (name, grad) in enumerate(zip(outputs, grads)):
        if grad is None:
            continue
        ref = {"ref": graph["saves"][name]}
        span = _crop_positions(grad)
        if span == (0, 0):
            continue  # an all-zero gradient adds nothing
        if span is not None and span != (0, grad.shape[1]):
            ref = {"ref": emit("narrow", ref, 1, span[0], span[1] - span[0])}
            grad = grad.narrow(1, span[0], span[1] - span[0])
        tid = f"dout{k}"
        tensors[tid] = grad.detach().contiguous()
        g["constants"].append(tid)
        term = emit("sum", {"ref": emit("mul", ref, {"const": tid})})
        total = term if total is None else emit("add", {"ref": total}, {"ref": term})
    if total is None:
        return None, None
    g["backward"] = total
    g["saves"] = {f"__grad_{tid}": emit(CONST_GRAD, {"const": tid}) for tid in leaf_ids}
    # The forward's output is still read (the saved outputs are slices of it); only the
    # gradients come back.
    g["forward"] = dict(g["forward"], send_output=False)
    return g, tensors


__all__ = ["DifferentiableCall", "backward_graph"]
