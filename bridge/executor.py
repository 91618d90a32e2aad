"""The interleaver: runs a validated graph alongside a real forward pass.

Like ``torch.fx.Interpreter``, ``run_node`` dispatches on the node's kind:
``getattr(self, node.kind)`` -- one method per special op (``site_read``, ``site_write``,
``site_grad``, ``output_read``, ``const_grad``; :mod:`hookwire.ir.special`) and ``call_op``
for every registry op. A subclass changes how a kind runs by overriding its method. Hooks go
only on
the sites the graph uses. At each site the nodes whose inputs are now complete run (their
*stage* is that site), saved values go to ``on_save`` the moment they exist, values nobody
needs any more are dropped, and when no later site and no output is needed the forward stops.

With ``Graph.backward`` set, the forward runs with autograd on and keeps, at every site whose
gradient is read, the tensor the model goes on with (after the graph's writes: what a
torch full backward hook on that module sees). After the forward, ``finish`` runs the
output-stage nodes (a metric), then ``torch.autograd.grad`` of the chosen scalar with respect
to exactly those tensors and to the constants whose gradient the graph reads (``const.grad``)
-- never the weights, so nothing accumulates in ``.grad`` of the shared model -- and then the
gradient-stage nodes.
"""
from __future__ import annotations

import contextlib
import time
import weakref
from collections import defaultdict
from typing import Callable

import torch

from hookwire.errors import ExecutionError
from hookwire.held_saves import HeldSaves, same_part_in
from hookwire.ir.args import resolve, walk_refs
from hookwire.ir.special import CONST_GRAD, SITE_GRAD, SITE_READ, SITE_WRITE
from hookwire.ir.stages import BEFORE_FORWARD
from hookwire.ir.validated import DecodedNode, ValidatedGraph
from hookwire.ir.wire import is_parameter
from hookwire.module_sites import attach


class StopForward(Exception):
    """Raised from the last needed hook to end the forward pass early."""


class Interleaver:
    """Runs one validated graph alongside a forward pass.

    ``on_save(name, value)`` gets each saved value (``snapshot=False`` added for a held
    save that is already a copy nothing else holds: hookwire.held_saves).
    ``on_site(k, n)`` is called after the k-th of n sites, ``on_node()`` before every node
    (both may raise to stop the request: cancelled, over its deadline). ``value_ranges``
    maps a site index to the ``[low, high)`` range integer values written there must lie in
    (token ids: the vocabulary; position ids: the positions), checked before the model
    indexes with them.

    Life of one: build it from a validated graph (the worker does, once the request is
    prepared); either ``run(site_modules, forward, need_output)`` -- hooks on the graph's
    sites, ``start()`` for the constant-only nodes, the forward, hooks removed -- or, in a
    batched forward, :mod:`hookwire.batching` calls ``start()`` and then ``at_site`` with a
    view of the request's own rows; then ``finish(outputs)`` for the output stage, the
    backward pass and the gradient stage; ``release()`` drops every value at the end.
    Values are kept only while a later node, save or backward still needs them
    (``pending``)."""

    def __init__(self, vg: ValidatedGraph, constants: dict[str, torch.Tensor],
                 on_save: Callable[..., None],
                 on_site: Callable[[int, int], None] | None = None,
                 on_node: Callable[[], None] | None = None,
                 value_ranges: dict[int, tuple[int, int]] | None = None,
                 weights: frozenset = frozenset(),
                 hold_bytes: Callable[[int], None] | None = None):
        self.vg = vg
        # Storage of the served model's parameters and buffers: a site value living there
        # is never written in place (see at_site).
        self.weights = weights
        # Storage of the served model's own parameters the graph reads ("@" constants): a
        # value sharing it never becomes an activation, which the model may edit in place.
        self.read_only = {t.untyped_storage().data_ptr() for tid, t in constants.items()
                          if is_parameter(tid)}
        self.on_node = on_node or (lambda: None)
        self.value_ranges = value_ranges or {}
        # Constants whose gradient is read become leaves of this request's autograd graph
        # (fresh copies: the caller's tensors, possibly shared residents, stay untouched).
        self.grad_consts = [dn.args[0].tid for dn in vg.nodes if dn.op == CONST_GRAD]
        self.constants = dict(constants)
        for tid in self.grad_consts:
            self.constants[tid] = constants[tid].detach().clone().requires_grad_(True)
        self.const_grads: dict[str, torch.Tensor] = {}
        self.on_save = on_save
        self.on_site = on_site or (lambda k, n: None)
        self.values: dict[int, object] = {}
        self.by_stage: dict[int, list] = defaultdict(list)
        self.stage: int | None = None  # the stage whose nodes run now
        for dn in vg.nodes:
            self.by_stage[dn.stage].append(dn)
        self.saves_of: dict[int, list[str]] = defaultdict(list)
        for name, nid in vg.graph.saves.items():
            self.saves_of[nid].append(name)
        # How many consumers each value still has: a value is dropped at zero.
        self.pending: dict[int, int] = defaultdict(int)
        for dn in vg.nodes:
            for r in set(walk_refs(dn.args, []) + walk_refs(tuple(dn.kwargs.values()), [])):
                self.pending[r] += 1
        self.writes: dict[int, dict[str, int]] = defaultdict(dict)
        self.sites_done = 0
        self.timings: dict[str, float] = {}
        self.backward = vg.graph.backward
        if self.backward is not None:
            self.pending[self.backward] += 1  # kept until the backward pass
        self.grad_sites = {dn.site for dn in vg.nodes if dn.op == SITE_GRAD}
        self.inplace_sites = {dn.site for dn in vg.nodes
                              if dn.op == SITE_WRITE and dn.mode == "inplace"}
        # Saves wait while an in-place write is still to come: locally a kept activation
        # shows a later site's edit where the model hands both sites one tensor.
        self.held = HeldSaves(max(self.inplace_sites, default=None), hold_bytes)
        # What those held copies may take at most (device memory beside the graph's own
        # values, which ``vg.value_bytes`` bounds): a save of a site read is no op's
        # value, so nothing else counts it.
        last, stage_of = self.held.last_write_stage, {dn.id: dn.stage for dn in vg.nodes}
        self.held_bound = 0 if last is None else sum(
            v.numel() * v.element_size() for nid in vg.graph.saves.values()
            if stage_of.get(nid, last + 1) <= last and
            isinstance(v := vg.shapes.get(nid), torch.Tensor))
        # Tensors that are one tensor when this graph runs alone, two in a batch (a batch
        # mate's replacement: the forward goes on with a copy, while the model may still
        # hand the tensor it replaced to other sites -- an attention's q, k and v inputs):
        # this graph's in-place writes into one reach its rows of the other (``moved``).
        # (Both by the id of the tensor whose storage they view, as held saves are: what a
        # batch mate's replacement or a write looks up takes time in proportion to what it
        # concerns, not to everything this graph keeps.)
        self._twins: dict[int, list[tuple[_Geometry, _Geometry]]] = {}
        self._views_of: dict[int, list[int]] = {}  # id(root) -> node ids whose value views it
        # Where a batch copied a replacement of this graph's that has no memory of its own
        # per element (``x[:, :1].expand_as(x)``): run alone, the forward goes on with that
        # tensor, and an in-place write into it later fails (``copied``).
        self._overlapping: list[_Geometry] = []
        self.grad_inputs: dict[int, torch.Tensor] = {}   # site -> tensor the model went on with
        self.grads: dict[int, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.device: torch.device | None = None  # of the activation at the current site

    @property
    def needs_grad(self) -> bool:
        return self.backward is not None

    def grad_mode(self):
        """The autograd mode the forward must run in for this graph."""
        return torch.enable_grad() if self.needs_grad else torch.no_grad()

    # ---- node kinds ----------------------------------------------------------------------
    def run_node(self, dn: DecodedNode, site_value=None):
        """The value of one node: the method named by its kind runs it (``site_value`` is
        the activation at the current site, for ``site.read``)."""
        return getattr(self, dn.kind)(dn, site_value)

    def site_read(self, dn: DecodedNode, site_value):
        return site_value

    def site_grad(self, dn: DecodedNode, site_value):
        return self.grads[dn.site]

    def output_read(self, dn: DecodedNode, site_value):
        return self.outputs[dn.args[0]]

    def const_grad(self, dn: DecodedNode, site_value):
        return self.const_grads[dn.args[0].tid]

    def site_write(self, dn: DecodedNode, site_value):
        """The value to write; ``at_site`` applies it once the site's stage has run."""
        self.writes[dn.site][dn.mode] = dn.id
        return resolve(dn.args[1], self.values, self.constants)

    def call_op(self, dn: DecodedNode, site_value):
        """A registry op: its torch callable on the resolved arguments."""
        args = resolve(dn.args, self.values, self.constants)
        kwargs = {k: resolve(v, self.values, self.constants) for k, v in dn.kwargs.items()}
        if len(_devices(args, _devices(tuple(kwargs.values())))) > 1:
            args, kwargs = self._co_locate(args, kwargs)
        try:
            return dn.spec.fn(*args, **kwargs)
        except Exception as exc:
            raise ExecutionError(f"node {dn.id} ({dn.op}) failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                                 node=dn.id, op=dn.op) from None

    def _co_locate(self, args, kwargs):
        """Tensors of one op that live on different devices (a model spread over several):
        constants, resident values and earlier sites' values go to the device of the
        activation they meet -- the current site's -- as they would if the user's hook had
        run on that layer's device."""
        devices = _devices(args, _devices(tuple(kwargs.values())))
        target = self.device if self.device in devices else \
            next((d for d in devices if d.type != "cpu"), next(iter(devices)))
        return _to(args, target), {k: _to(v, target) for k, v in kwargs.items()}

    def _run_stage(self, stage: int, site_value=None):
        self.stage = stage  # (what on_node may ask: the site whose nodes run now)
        for dn in self.by_stage.get(stage, ()):
            self.on_node()  # between nodes too: nodes after the last site obey the deadline
            value = self.run_node(dn, site_value)
            self.values[dn.id] = value
            if isinstance(value, torch.Tensor):
                self._views_of.setdefault(id(_root(value)), []).append(dn.id)
            for name in self.saves_of.get(dn.id, ()):
                if self.held.holds(stage):
                    self.held.hold(name, stage, value)
                else:
                    self.on_save(name, value)
            for r in set(walk_refs(dn.args, []) + walk_refs(tuple(dn.kwargs.values()), [])):
                self.pending[r] -= 1
                if self.pending[r] <= 0:
                    self.values.pop(r, None)

    # ---- the hook placed at each site ----------------------------------------------------
    def _site_hook(self, name: str, last_needed: int, stop_early: bool):
        calls_to_site = {info.call: i for i, info in enumerate(self.vg.site_infos)
                         if info.name == name}
        counter = [0]

        def hook(module, args, output):
            call = counter[0]
            counter[0] += 1
            index = calls_to_site.get(call)
            if index is None:
                return None
            result = self.at_site(index, output)
            if stop_early and index == last_needed:
                raise StopForward
            return result
        return hook

    def at_site(self, index: int, output):
        """This graph's work at its site ``index``, on the activation ``output`` (for a batch,
        a view of the request's own rows): reads, in-place writes (into ``output``), and the
        replacement to return (or None)."""
        if not isinstance(output, torch.Tensor):
            raise ExecutionError(f"site {self.vg.site_infos[index].name!r} did not produce "
                                 "a tensor")
        self.device = output.device
        # With autograd on, an in-place write must not touch a tensor the graph's own
        # ops saved for backward: they read a (differentiable) copy instead.
        copy_read = self.needs_grad and index in self.inplace_sites
        self._run_stage(index, output.clone() if copy_read else output)
        result = None
        writes = self.writes.pop(index, {})
        for node in writes.values():
            self._check_range(index, node, self.values.get(node))
        if "inplace" in writes:
            value = self.values.pop(writes["inplace"], None)
            read_id = self._read_node(index)
            if not copy_read and read_id is not None and self.pending.get(read_id, 0) > 0:
                # Someone still needs the value as it was read: keep a copy.
                self.values[read_id] = output.clone()
            # A site value that is (a view of) a weight or buffer of the shared model -- a
            # family whose position ids are a slice of a buffer -- is edited in a copy that
            # replaces it in this forward: written in place it would change the model for
            # every later request. This forward sees the edit as it would locally.
            target = output.clone() if output.numel() and \
                output.untyped_storage().data_ptr() in self.weights else output
            self.held.written(index, value, target)
            if self._overlapping and self._was_overlapping(target):
                info = self.vg.site_infos[index]
                raise ExecutionError(f"in-place write into site {info.name!r} failed: "
                                     f"{_OVERLAP_ERROR[:200]}", node=writes["inplace"])
            # Differentiable when a backward follows (gradients flow through the edit).
            with contextlib.nullcontext() if self.needs_grad else torch.no_grad():
                try:
                    target.copy_(value)
                    if self._twins and not self.needs_grad:
                        self._write_twins(target)
                except RuntimeError as exc:
                    # e.g. a broadcast activation (GPT-2's position embeddings, expanded over
                    # the batch): torch refuses the in-place write, as it would locally.
                    info = self.vg.site_infos[index]
                    raise ExecutionError(f"in-place write into site {info.name!r} failed: "
                                         f"{str(exc).splitlines()[0][:200]}",
                                         node=writes["inplace"]) from None
            if target is not output:
                result = target
        if "replace" in writes or "narrow" in writes:  # narrow: fewer batch rows
            result = self.values.pop(writes.get("replace", writes.get("narrow")), None)
            if self.read_only and isinstance(result, torch.Tensor) and \
                    result.untyped_storage().data_ptr() in self.read_only:
                result = result.clone()
            if isinstance(result, torch.Tensor) and result.device != output.device:
                result = result.to(output.device)  # e.g. a constant, or another layer's value
        if index == self.held.last_write_stage:
            for name, value, own in self.held.release():  # no write is left to change them
                if own:  # a copy nothing else holds: no need to copy it again
                    self.on_save(name, value, snapshot=False)
                else:
                    self.on_save(name, value)
        if index in self.grad_sites:
            final = output if result is None else result
            if not final.requires_grad:
                info = self.vg.site_infos[index]
                raise ExecutionError(
                    f"site {info.name!r} (call {info.call}) has no gradient in this run: "
                    "its value no longer depends on the weights (a hook replaced it with "
                    "a constant?); locally its backward hook would not fire")
            # A fresh tensor as the site's output (as torch's full backward hooks make
            # one): the gradient is the one flowing through *this* site's uses only, not
            # through other sites that received the same tensor object.
            final = result = final.view_as(final)
            self.grad_inputs[index] = final
        self.sites_done += 1
        self.on_site(self.sites_done, len(self.vg.site_infos))
        return result

    def _check_range(self, index: int, node: int, value) -> None:
        """Integer values written into a site the model indexes with (token ids, position
        ids) must lie in its range: out of range, the model's embedding would raise -- on
        CUDA, a device-side assert that poisons the process for every user."""
        bounds = self.value_ranges.get(index)
        if bounds is None or not isinstance(value, torch.Tensor) or not value.numel() or \
                value.is_floating_point():
            return
        low, high = bounds
        lo, hi = int(value.min()), int(value.max())
        if lo < low or hi >= high:
            info = self.vg.site_infos[index]
            raise ExecutionError(f"node {node} writes values in [{lo}, {hi}] into site "
                                 f"{info.name!r}, whose values must lie in [{low}, {high}): "
                                 "the model indexes with them", node=node, op=SITE_WRITE,
                                 rule="value_range", site=info.name)

    # ---- in a batch: the forward goes on with a copy ---------------------------------------
    def moved(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """A batched forward goes on with ``new``, a copy of ``old`` made at a site after a
        batch mate replaced its rows there. Run alone, this graph's forward would go on with
        ``old``: what it holds of ``old`` -- held saves, and its own values that view it (a
        site read kept for a later node or a save) -- follows ``new`` instead, so a later
        in-place edit shows in them as it would solo. (Solo, those values also keep the
        tensor alive until the end, where a held save is re-read.)"""
        self.held.moved(old, new)
        self._follow_values(old, new)
        # (Not where either tensor has elements shared between rows -- an activation
        # broadcast over the batch: a member's rows of it are every member's, and a write
        # mirrored there would reach them all; nor a dtype view, whose place in the tensor
        # it views is counted in other units.)
        if old.dtype == new.dtype and old.shape == new.shape and \
                _plain_layout(old) and _plain_layout(new):
            mine, other = _Geometry.of(old), _Geometry.of(new)
            for key, pair in ((id(_root(old)), (mine, other)), (id(_root(new)), (other, mine))):
                alive = [p for p in self._twins.get(key, ())  # (a dead tensor's id, reused)
                         if p[0].root() is not None and p[1].root() is not None]
                self._twins[key] = alive + [pair]

    def _write_twins(self, target: torch.Tensor) -> None:
        """``target`` (this graph's rows of a site's activation) was just written in place:
        the same rows of its twin get the same values, as solo both are one tensor."""
        root = _root(target)
        for mine, other in self._twins.get(id(root), ()):
            if mine.root() is not root:  # (a dead tensor's id, reused)
                continue
            whole, twin = mine.tensor(), other.tensor()
            if whole is None or twin is None or whole.dtype != target.dtype:
                continue
            where = same_part_in(whole, twin, tuple(target.shape), tuple(target.stride()),
                                 target.storage_offset())
            if where is not None:
                torch.as_strided(twin, target.shape, *where).copy_(target)

    def copied(self, value: torch.Tensor, into: torch.Tensor) -> None:
        """A batched forward copied this graph's replacement ``value`` into ``into`` (its
        rows of the batch it goes on with); solo it would go on with ``value`` itself:
        saves and values viewing ``value`` follow ``into``."""
        self.held.copied(value, into)
        self._follow_values(value, into)
        if torch._debug_has_internal_overlap(value) == 1:  # 1: MemOverlap.Yes
            self._overlapping.append(_Geometry.of(into))

    def _was_overlapping(self, target: torch.Tensor) -> bool:
        """Whether ``target`` is where a batch copied a replacement of this graph's whose
        elements share memory: run alone, the write would go into that replacement itself,
        and torch refuses it (the batch's copy would take it, and the result differ from the
        solo run's error). A part of the copy is not matched: solo its write may succeed."""
        root = target._base if target._base is not None else target
        geometry = (tuple(target.shape), tuple(target.stride()), target.storage_offset())
        return any(g.root() is root and (g.size, g.stride, g.offset) == geometry
                   for g in self._overlapping)

    def _follow_values(self, old: torch.Tensor, new: torch.Tensor) -> None:
        root = _root(old)
        stay = []
        for nid in self._views_of.pop(id(root), ()):
            v = self.values.get(nid)
            if not isinstance(v, torch.Tensor) or _root(v) is not root:
                continue  # dropped since, re-pointed, or a dead tensor's id reused
            where = None if v.dtype != old.dtype else \
                same_part_in(old, new, tuple(v.shape), tuple(v.stride()), v.storage_offset())
            if where is None:
                stay.append(nid)
                continue
            self.values[nid] = moved = torch.as_strided(new, v.shape, *where)
            self._views_of.setdefault(id(_root(moved)), []).append(nid)
        if stay:
            self._views_of.setdefault(id(root), []).extend(stay)

    def release(self) -> None:
        """Drop every value and callback now that the request is over, so its tensors are
        freed at once instead of when the cycle collector finds the request's closures."""
        self.values.clear()
        self._twins.clear()
        self._views_of.clear()
        self._overlapping.clear()
        self.held.clear()
        self.constants.clear()
        self.grad_inputs.clear()
        self.grads.clear()
        self.const_grads.clear()
        self.outputs = {}
        self.on_save = self.on_site = self.on_node = None

    def start(self):
        """Nodes that need no site (constants only) run before the forward."""
        self._run_stage(BEFORE_FORWARD)

    @property
    def finished_sites(self) -> bool:
        return self.sites_done == len(self.vg.site_infos)

    def _read_node(self, index: int):
        for dn in self.by_stage.get(index, ()):
            if dn.op == SITE_READ:
                return dn.id
        return None

    def run(self, site_modules: dict[str, torch.nn.Module], forward: Callable[[], object],
            need_output: bool):
        """Run the forward with hooks at the graph's sites; returns the forward's output
        (None when it was stopped early because nothing after the last site is needed)."""
        t0 = time.perf_counter()
        self.start()
        handles = []
        last = len(self.vg.site_infos) - 1
        try:
            for name in dict.fromkeys(info.name for info in self.vg.site_infos):
                # TL hook points take a forward hook; HF module sites a (pre-)hook that
                # hands over one tensor (hookwire.module_sites).
                handles.append(attach(site_modules[name], name,
                                      self._site_hook(name, last, stop_early=not need_output)))
            try:
                output = forward()
            except StopForward:
                output = None
        finally:
            for h in handles:
                h.remove()
        if not self.finished_sites:
            raise ExecutionError(f"the forward pass reached {self.sites_done} of "
                                 f"{len(self.vg.site_infos)} sites")
        self.timings["execute_s"] = time.perf_counter() - t0
        return output

    def finish(self, outputs: dict[str, torch.Tensor], on_backward: Callable[[], None] = None):
        """After the forward: output-stage nodes (reading ``outputs``), the backward pass if
        the graph asks for one, then the gradient-stage nodes."""
        self.outputs = outputs
        for value in outputs.values():
            if isinstance(value, torch.Tensor):
                self.device = value.device
        self._run_stage(self.vg.output_stage)
        if self.backward is None:
            return
        t0 = time.perf_counter()
        if on_backward is not None:
            on_backward()
        target = self.values.get(self.backward)
        if not isinstance(target, torch.Tensor) or not target.requires_grad:
            raise ExecutionError(f"node {self.backward}: the value to differentiate does not "
                                 "depend on any site whose gradient is read", node=self.backward)
        order = sorted(self.grad_inputs)
        wrt = [self.grad_inputs[i] for i in order] + \
            [self.constants[tid] for tid in self.grad_consts]
        grads = torch.autograd.grad(target, wrt, allow_unused=True) if wrt else ()
        for tid, g in zip(self.grad_consts, grads[len(order):]):
            # A constant the value does not depend on has a zero gradient.
            self.const_grads[tid] = torch.zeros_like(self.constants[tid]) if g is None else g
        for i, g in zip(order, grads[:len(order)]):
            if g is None:
                info = self.vg.site_infos[i]
                raise ExecutionError(f"site {info.name!r} (call {info.call}) does not influence "
                                     "the value being differentiated (locally its backward "
                                     "hook would not fire)")
            self.grads[i] = g
        self.grad_inputs.clear()
        self.values.pop(self.backward, None)
        with torch.no_grad():
            self._run_stage(self.vg.grad_stage)
        self.grads.clear()
        self.const_grads.clear()
        self.timings["backward_s"] = time.perf_counter() - t0


def _devices(values, out: set | None = None) -> set:
    out = set() if out is None else out
    if isinstance(values, torch.Tensor):
        out.add(values.device)
    elif isinstance(values, (tuple, list)):
        for v in values:
            _devices(v, out)
    return out


def _to(values, device: torch.device):
    if isinstance(values, torch.Tensor):
        return values if values.device == device else values.to(device)
    if isinstance(values, tuple):
        return tuple(_to(v, device) for v in values)
    if isinstance(values, list):
        return [_to(v, device) for v in values]
    return values


__all__ = ["Interleaver"]


def _root(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _plain_layout(t: torch.Tensor) -> bool:
    """No two of ``t``'s elements share memory, and it counts places in its storage as the
    tensor it views does (same dtype)."""
    root = t._base if t._base is not None else t
    return root.dtype == t.dtype and torch._debug_has_internal_overlap(t) == 0


def _overlap_error() -> str:
    """torch's own words for an in-place write into a tensor whose elements share memory."""
    try:
        torch.zeros(1).expand(2).copy_(torch.zeros(2))
    except RuntimeError as exc:
        return str(exc).splitlines()[0]
    return "more than one element of the written-to tensor refers to a single memory location"


_OVERLAP_ERROR = _overlap_error()


class _Geometry:
    """A tensor by weak reference to the tensor whose storage it views, and its place
    there: a batch's activation is followed without being kept alive."""

    def __init__(self, root: "weakref.ref", size: tuple, stride: tuple, offset: int):
        self.root, self.size, self.stride, self.offset = root, size, stride, offset

    @classmethod
    def of(cls, t: torch.Tensor) -> "_Geometry":
        root = t._base if t._base is not None else t
        return cls(weakref.ref(root), tuple(t.shape), tuple(t.stride()), t.storage_offset())

    def tensor(self) -> torch.Tensor | None:
        root = self.root()
        return None if root is None else \
            torch.as_strided(root, self.size, self.stride, self.offset)
