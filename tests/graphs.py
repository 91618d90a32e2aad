"""Wire graphs for tests, built one way everywhere.

A graph on the wire is plain JSON (``hookwire.ir.wire.Graph``): sites the forward fires, nodes
that read and write them, saves, the forward's options. Tests that speak the protocol
directly (or validate graphs in-process) build them here instead of writing the dict out::

    graph("tiny-gpt2", sites=["blocks.0.hook_resid_post"],
          nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 2.0),
                 node(2, "site.write", 0, ref(1), mode="replace")],
          saves={"resid": 1})

``read_graph`` is the most common one: read sites, save each, return the logits.
"""
from __future__ import annotations

from hookwire.ir import Graph
from hookwire.validate import Limits, validate_structure

FULL = {"slice": [None, None, None]}  # ``:`` as an index argument


def ref(node_id: int) -> dict:
    """An argument that is node ``node_id``'s value."""
    return {"ref": node_id}


def const(tid: str) -> dict:
    """An argument that is the uploaded constant ``tid``."""
    return {"const": tid}


def node(node_id: int, op: str, *args, **kwargs) -> dict:
    """One node: ``op`` applied to ``args`` (and ``kwargs``, if any)."""
    out = {"id": node_id, "op": op, "args": list(args)}
    if kwargs:
        out["kwargs"] = kwargs
    return out


def graph(model: str = "tiny-gpt2", nodes=(), sites=(), saves=None, constants=(),
          return_type="logits", inputs=None, **extra) -> dict:
    """A wire graph. ``sites``: names, or (name, call) pairs; ``extra``: further top-level
    fields (``backward``, ``version``...)."""
    return {"model": model,
            "inputs": inputs if inputs is not None else {"input_ids": "input_ids"},
            "constants": list(constants),
            "sites": [{"name": s} if isinstance(s, str) else {"name": s[0], "call": s[1]}
                      for s in sites],
            "nodes": list(nodes), "saves": dict(saves or {}),
            "forward": {"return_type": return_type}, **extra}


def read_graph(model: str = "tiny-gpt2", sites=(), names=None, return_type="logits") -> dict:
    """Read every one of ``sites`` and save it (as ``names[k]``, else ``name#call`` /
    ``name``); the forward returns ``return_type``."""
    keys = list(names) if names is not None else [
        s if isinstance(s, str) else f"{s[0]}#{s[1]}" for s in sites]
    return graph(model, nodes=[node(k, "site.read", k) for k in range(len(sites))],
                 sites=sites, saves={key: k for k, key in enumerate(keys)},
                 return_type=return_type)


def validated_constant_graph(nodes, constants=("c0",), limits: Limits = Limits()):
    """Nodes over constants only (no model, no sites), structurally validated: what shape
    inference and the cost models are tested on."""
    g = Graph.model_validate({"model": "m", "inputs": {"input_ids": "i"},
                              "constants": list(constants), "nodes": list(nodes)})
    return validate_structure(g, {}, {}, limits)


__all__ = ["FULL", "ref", "const", "node", "graph", "read_graph", "validated_constant_graph"]


def write_graph(model: str, sites, mode: str) -> dict:
    """Overwrite each of ``sites`` ((name, call, dtype name) triples) with a different value
    of its own shape, dtype and range: integer sites (token and position ids) get their ids
    reversed, float sites ``-3 * act + 1``; ``mode``: "replace" or "inplace"."""
    nodes = []
    for k, (_, _, dtype) in enumerate(sites):
        base = 10 * k
        nodes.append(node(base, "site.read", k))
        if dtype.startswith("int"):
            nodes.append(node(base + 1, "flip", ref(base), -1))
        else:
            nodes += [node(base + 2, "mul", ref(base), -3.0),
                      node(base + 1, "add", ref(base + 2), 1.0)]
        nodes.append(node(base + 3, "site.write", k, ref(base + 1), mode=mode))
    return graph(model, nodes=nodes, sites=[(name, call) for name, call, _ in sites])
