"""What a client accepts back from a server for one request: the values it asked for, each at
most as large as the request can make it.

A client must not trust its server (SECURITY.md): a lying server could otherwise hand a graph
that saves nothing a gigabyte value, or one value many times. Before a submit is sent, the
client works out the names it asked for -- the graph's saves, the forward's outputs it wants
back, a generation's tokens and per-step saves -- and, where it can, the size of each: the
graph's shapes are inferred on the meta device with the same validator the server runs
(``hookwire.validate``), from the model description the server gave. A ``result`` with any
other name, a second one with the same name, or one larger than its name's size is a
``ProtocolError`` before a byte of it is buffered.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch

from hookwire.errors import ProtocolError
from hookwire.generation import step_name, token_name
from hookwire.ir import Graph
from hookwire.validate import Limits, infer_shapes, validate_structure

# Inference on the client is bounded: a graph larger than this is checked by name and by
# the request's total only (inference costs ~15 us a node).
MAX_INFERRED_NODES = 5000
_UNBOUNDED = Limits(max_nodes=MAX_INFERRED_NODES, max_constant_bytes=1 << 62,
                    max_saved_bytes=1 << 62, max_value_bytes=1 << 62, max_flops=10 ** 30,
                    max_total_value_bytes=1 << 62, max_batch=1 << 40,
                    max_output_bytes=1 << 62, max_seq=1 << 40)
_cache: OrderedDict = OrderedDict()  # (graph json, tensor shapes) -> save sizes


class ExpectedResults:
    """name -> the most bytes its value can have (None: bounded by the request's total)."""

    def __init__(self, sizes: dict[str, int | None]):
        self.sizes = sizes
        self.seen: set[str] = set()

    def admit(self, name: str, nbytes: int) -> None:
        if name not in self.sizes:
            raise ProtocolError(f"server sent a result {name[:80]!r} this request did not ask "
                                "for")
        if name in self.seen:
            raise ProtocolError(f"server sent the result {name[:80]!r} twice")
        bound = self.sizes[name]
        if bound is not None and nbytes > bound:
            raise ProtocolError(f"server announced {nbytes} bytes for {name[:80]!r}; this "
                                f"request can make at most {bound}")
        self.seen.add(name)


def _site_tables(info):
    table = {(s.name, s.call): s for s in info.sites}
    order = {(s.name, s.call): i for i, s in enumerate(info.sites)}
    by_name: dict[str, list] = {}
    for s in info.sites:
        by_name.setdefault(s.name, []).append(s)
    for alias, canonical in info.hook_aliases.items():
        for s in by_name.get(canonical, ()):
            table[(alias, s.call)] = s
            order[(alias, s.call)] = order[(s.name, s.call)]
    return table, order


def _save_sizes(graph_json: str, graph: dict, tensors: dict, info, outputs) -> dict:
    """save name -> bytes, by meta inference (empty if the graph cannot be inferred here:
    the server then refuses it, or it is too large to infer on the client)."""
    shapes = tuple((tid, str(t.dtype), tuple(t.shape)) for tid, t in tensors.items()
                   if isinstance(t, torch.Tensor))
    key = (graph_json, shapes, info.name)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    sizes: dict = {}
    nodes = graph.get("nodes", [])
    if isinstance(nodes, list) and len(nodes) <= MAX_INFERRED_NODES:
        try:
            g = Graph.model_validate(graph)
            ids = tensors.get(g.inputs.get("input_ids", ""))
            if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
                raise ValueError("input_ids is not a [batch, seq] tensor")
            table, order = _site_tables(info)
            vg = validate_structure(g, table, order, _UNBOUNDED)
            consts = {tid: tensors[tid] for tid in g.constants}
            infer_shapes(vg, ids.shape[0], ids.shape[1], consts, _UNBOUNDED, outputs=outputs)
            for name, nid in g.saves.items():
                value = vg.shapes[nid]
                assert isinstance(value, torch.Tensor)  # infer_shapes refuses any other save
                sizes[name] = value.numel() * value.element_size()
        except Exception:  # the server's validator will say what is wrong
            sizes = {}
    _cache[key] = sizes
    while len(_cache) > 256:
        _cache.popitem(last=False)
    return sizes


def expected_results(graph: dict, graph_json: str, tensors: dict, info=None,
                     generate: dict | None = None) -> ExpectedResults:
    """What the server may send back for this submit (``info``: the model's
    ``RemoteModelInfo`` when the client has it; without, only names are checked)."""
    names: dict[str, int | None] = {}
    forward = graph.get("forward") or {}
    return_type = forward.get("return_type", "logits")
    ids = tensors.get((graph.get("inputs") or {}).get("input_ids", ""))
    batch: int | None = None  # known when input_ids is a [batch, seq] tensor
    seq = 0
    if isinstance(ids, torch.Tensor) and ids.dim() == 2:
        batch, seq = ids.shape
    outputs: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
    if info is not None and batch is not None:
        dtype = info.sites[-1].dtype if info.sites else torch.float32
        vocab = info.config.get("vocab_size")
        loss_shape: tuple[int, ...] = (batch, seq - 1) if forward.get("loss_per_token") else ()
        outputs = {"logits": ((batch, seq, vocab or 1), dtype), "loss": (loss_shape, dtype)}
    if forward.get("send_output", True) and generate is None:
        for kind in {"logits": ("logits",), "loss": ("loss",),
                     "both": ("logits", "loss")}.get(return_type, ()):
            bound = None
            if outputs is not None and (kind == "loss" or info.config.get("vocab_size")):
                shape, dtype = outputs[kind]
                bound = math.prod(shape) * dtype.itemsize
            names[f"__{kind}__"] = bound
    if generate is not None:
        steps = [graph] + list(generate.get("steps") or [])
        for k in range(int(generate.get("max_new_tokens", 0))):
            names[token_name(k)] = None if batch is None else batch * 8
        for k, step in enumerate(steps):
            for name in (step.get("saves") or {}):
                names[step_name(k, name)] = None
        return ExpectedResults(names)
    sizes = _save_sizes(graph_json, graph, tensors, info, outputs) \
        if info is not None and batch is not None else {}
    for name in graph.get("saves") or {}:
        names[name] = sizes.get(name)
    return ExpectedResults(names)


__all__ = ["ExpectedResults", "expected_results"]
