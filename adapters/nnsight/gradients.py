"""``with loss.backward():`` inside a remote trace: gradients of module values.

nnsight runs such a block by patching ``Tensor.grad`` for its duration: reading ``t.grad``
registers a hook on ``t`` (``t.register_hook``) and waits for autograd to call it; then it runs
the real ``loss.backward()``. Both calls reach the hookwire tracer when ``t`` and ``loss`` are
proxies, which hands them to a :class:`Backward` (``Tracer.on_register_hook`` /
``Tracer.on_backward``). It makes the graph differentiate ``loss`` on the server
(``Graph.backward``) and calls the hooks as autograd would, last site first, each with the
gradient at its site (a ``site.grad`` node), so the block's ``.grad`` reads record nodes
of the gradient stage. Gradients reach module values (a module's ``.output``/``.input``, and
the rows nnsight's batching hands an invoke); the server never differentiates with respect to
the weights. Editing a gradient (``t.grad = ...``) is refused: the server computes every
gradient in one ``torch.autograd.grad`` and has no way to replace one mid-backward yet.
"""
from __future__ import annotations

import torch
from nnsight.intervention.interleaver import Interleaver

from hookwire.ir.special import SITE_READ, SITE_WRITE
from hookwire.module_sites import parse_module_site
from hookwire.trace import Proxy, trace_error


class _Handle:
    def __init__(self, owner: "Backward", entry):
        self.owner, self.entry = owner, entry

    def remove(self):
        self.owner.drop(self.entry)
        # nnsight's hook holds this handle (to remove itself) and the entry holds the hook:
        # let go, or the cycle keeps the proxy alive as if user code held it.
        self.entry = None


def _inside_backward_block() -> bool:
    # nnsight replaces Tensor.grad by a property only while a `with t.backward():` block runs.
    return isinstance(torch.Tensor.__dict__.get("grad"), property)


class Backward:
    """The gradient half of one forward's graph (one backward pass, as the server runs)."""

    def __init__(self, tracer, info):
        self.tracer, self.info = tracer, info
        self.hooks: list = []          # [(graph site index, tensor, fn)]
        self.position: int | None = None   # the site the simulated backward has reached
        self.grads: dict[int, Proxy] = {}
        self.interleavers: dict[int, Interleaver] = {}   # the backward blocks' own
        self._direct: set | None = None   # sites whose values the graph feeds on (_fed_on)
        tracer.on_backward = self.backward
        tracer.on_register_hook = self.register_hook

    def drop(self, entry) -> None:
        # By identity: entries hold proxies, whose == would be traced.
        self.hooks[:] = [h for h in self.hooks if h is not entry]

    def close(self):
        """Forget every proxy (before the tracer counts what user code still holds)."""
        # A finished `with ...backward():` block leaves its worker and the worker's scope (a
        # copy of the trace block's variables) in a reference cycle until the next garbage
        # collection, which would count as references user code holds: release them with
        # nnsight's own end-of-run cleanup.
        for interleaver in self.interleavers.values():
            interleaver.cancel()
        self.interleavers.clear()
        self.hooks.clear()
        self.grads.clear()
        self.tracer.on_backward = self.tracer.on_register_hook = None

    # ---- Tensor.register_hook on a proxy --------------------------------------------------
    def register_hook(self, tensor: Proxy, fn):
        site = getattr(tensor, "_hw_site", None)
        base = tensor._hw_view.base if tensor._hw_view is not None else None
        if site is None and getattr(tensor, "_nnsight_batch", False) and base is not None:
            site = getattr(base, "_hw_site", None)   # an invoke's rows of a module value
        elif tensor._hw_view is not None:
            site = None
        if site is None:
            raise trace_error("`.grad` of a tensor computed in the trace block",
                              "remotely, gradients are read at module values: use the .grad "
                              "of a module's .output or .input (or a tuple element of it) "
                              "and compute with that")
        graph_site = self.tracer.sites[site]
        info = self.info.sites[self.info.site_index[(graph_site["name"], graph_site["call"])]]
        if not info.grad:
            raise trace_error(f"`.grad` of {graph_site['name']!r}, whose value does not "
                              "depend on the model's weights", "no gradient reaches it")
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                held = cell.cell_contents
            except ValueError:   # a cell not filled yet (the hook's own handle)
                continue
            if isinstance(held, Interleaver):
                self.interleavers[id(held)] = held
        entry = (site, tensor, fn)
        self.hooks.append(entry)
        return _Handle(self, entry)

    # ---- tensor.backward() on a proxy -----------------------------------------------------
    def backward(self, tensor: Proxy, args, kwargs):
        if not _inside_backward_block():
            raise trace_error("`loss.backward()` outside a `with loss.backward():` block",
                              "remotely the server differentiates only to hand gradients to a "
                              "`with loss.backward():` block (it never accumulates .grad on "
                              "the model's weights): read the gradients you want inside one")
        if any(v is not None and v is not False for v in list(args) + list(kwargs.values())):
            raise trace_error("backward() with arguments (gradient=, retain_graph=, ...)",
                              "differentiate a scalar: call .backward() on .sum() or .mean()")
        if self.tracer.backward is not None:
            raise trace_error("a second backward pass in one trace",
                              "the server runs one backward pass per forward: open a second "
                              "trace for the second")
        if tensor.numel() != 1 or not tensor.dtype.is_floating_point:
            raise trace_error(f"backward() of a {tuple(tensor.shape)} {tensor.dtype} tensor",
                              "grad can be implicitly created only for floating-point scalars")
        self.tracer.backward = self.tracer.current(tensor)
        # As autograd: every gradient hook fires once, last site first (hooks the block
        # registers while it runs are picked up as the walk reaches their site).
        self.position = len(self.tracer.sites)
        while True:
            due = [h for h in self.hooks if h[0] < self.position]
            if not due:
                break
            site = max(h[0] for h in due)
            self.position = site + 1
            entry = next(h for h in self.hooks if h[0] == site)
            self.drop(entry)
            self._fire(*entry)
        self.position = 0

    def _refuse_other_gradient(self, site: int) -> None:
        """nnsight's ``t.grad`` is the gradient at the tensor ``t`` itself (a hook on it); the
        server differentiates at the value the model goes on with after the site. The two
        differ where the block replaced the module value (``.output = f(t)``: locally the
        gradient flows back through ``f``), computed the differentiated value from ``t``
        itself (``loss = t.norm() + ...``; a loss of ``lm_head.output``), or wrote ``t`` (or
        a value computed from it) into a later module (``.skip(t)``, ``h[:] = t``,
        ``.output = out + t``): refused, instead of a gradient that silently lacks those
        paths."""
        sites, nodes = self.tracer.sites, self.tracer.nodes
        key = (sites[site]["name"], sites[site]["call"])

        def key_of(node):
            return sites[node["args"][0]]["name"], sites[node["args"][0]]["call"]
        path, kind = parse_module_site(key[0])
        if any(n["op"] == SITE_WRITE and n.get("kwargs", {}).get("mode") == "replace"
               and key_of(n) == key for n in nodes):
            raise trace_error(f"`.grad` of {path}.{kind}, which the block replaced "
                              "(`.output = ...`, `.skip`, or an invoke's own rows)",
                              "locally the gradient flows back through the replacement; the "
                              "server has the gradient at the new value only: read the .grad "
                              "of the module that feeds it, or edit the value in place "
                              "(`t[:] = ...`)")
        if self._direct is None:
            self._direct = _fed_on(nodes, key_of, self.tracer.backward)
        if key in self._direct:
            raise trace_error(f"`.grad` of {path}.{kind} where the differentiated value, or a "
                              "value written into another module, is computed from it "
                              "directly",
                              "the server has the gradient through the model's own use of "
                              "the value only: compute the value from later modules (e.g. "
                              "model.output.logits instead of lm_head.output), or differentiate "
                              "with respect to an earlier module's value")

    def _fire(self, site: int, tensor: Proxy, fn):
        self._refuse_other_gradient(site)
        grad = self.grads.get(site)
        if grad is None:
            graph_site = self.tracer.sites[site]
            info = self.info.sites[self.info.site_index[(graph_site["name"],
                                                          graph_site["call"])]]
            shape = tensor._hw_view.base.shape if tensor._hw_view is not None else tensor.shape
            grad = self.grads[site] = self.tracer.read_grad(site, tuple(shape), info.dtype)
        given = grad
        if tensor._hw_view is not None:   # nnsight's rows of an invoke: the same rows of it
            node = tensor._hw_view.redo(self.tracer.current(grad))
            given = Proxy(self.tracer, node, torch.empty(tuple(tensor.shape), dtype=grad.dtype,
                                                         device="meta"))
        result = fn(given)
        if (result is not None and result is not given) or given._hw_version > 0:
            # Raised from the `with ...backward():` line: the block has moved past the edit.
            path, kind = parse_module_site(self.tracer.sites[site]["name"])
            raise trace_error(f"editing the gradient of {path}.{kind} (`t.grad = ...`, or in "
                              "place) in the `with ....backward():` block",
                              "the server computes gradients in one backward pass and cannot "
                              "replace one midway yet: read gradients and compute with them")


def _fed_on(nodes: list, key_of, backward: int) -> set:
    """The sites (name, call) whose read values reach, through the graph's own nodes, the
    value ``backward`` or a write into another site. Nodes come in order and a node's id is
    its index in ``nodes``."""
    empty: frozenset = frozenset()
    deps: list = []   # node id -> the sites it is computed from
    out: set = set()
    for node in nodes:
        found = empty
        for ref in _refs(node["args"]) + _refs(list(node.get("kwargs", {}).values())):
            more = deps[ref]
            if more and more is not found:
                found = more if not found else found | more
        if node["op"] == SITE_READ:
            found = found | {key_of(node)}
        elif node["op"] == SITE_WRITE:
            out |= found - {key_of(node)}
        deps.append(found)
    return out | deps[backward]


def _refs(value) -> list[int]:
    if isinstance(value, dict):
        if "ref" in value and len(value) == 1:
            return [value["ref"]]
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


__all__ = ["Backward"]
