"""The interleaver: runs a validated graph alongside a real forward pass.

Like ``torch.fx.Interpreter``, ``run_node`` dispatches on the node's kind. Hooks go only on
the sites the graph uses. At each site the nodes whose inputs are now complete run (their
*stage* is that site), saved values go to ``on_save`` the moment they exist, values nobody
needs any more are dropped, and when no later site and no output is needed the forward stops.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

import torch

from hookwire.errors import ExecutionError
from hookwire.module_sites import attach
from hookwire.validate import ValidatedGraph, _walk_refs, resolve


class _StopForward(Exception):
    """Raised from the last needed hook to end the forward pass early."""


class Interleaver:
    def __init__(self, vg: ValidatedGraph, constants: dict[str, torch.Tensor],
                 on_save: Callable[[str, torch.Tensor], None],
                 on_site: Callable[[int, int], None] | None = None):
        self.vg = vg
        self.constants = constants
        self.on_save = on_save
        self.on_site = on_site or (lambda k, n: None)
        self.values: dict[int, object] = {}
        self.by_stage: dict[int, list] = defaultdict(list)
        for dn in vg.nodes:
            self.by_stage[dn.stage].append(dn)
        self.saves_of: dict[int, list[str]] = defaultdict(list)
        for name, nid in vg.graph.saves.items():
            self.saves_of[nid].append(name)
        # How many consumers each value still has: a value is dropped at zero.
        self.pending: dict[int, int] = defaultdict(int)
        for dn in vg.nodes:
            for r in set(_walk_refs(dn.args, []) + _walk_refs(tuple(dn.kwargs.values()), [])):
                self.pending[r] += 1
        self.writes: dict[int, dict[str, int]] = defaultdict(dict)
        self.sites_done = 0
        self.timings: dict[str, float] = {}

    # ---- node kinds ----------------------------------------------------------------------
    def run_node(self, dn, site_value=None):
        if dn.op == "site.read":
            return site_value
        if dn.op == "site.write":
            self.writes[dn.site][dn.mode] = dn.id
            return resolve(dn.args[1], self.values, self.constants)
        args = resolve(dn.args, self.values, self.constants)
        kwargs = {k: resolve(v, self.values, self.constants) for k, v in dn.kwargs.items()}
        try:
            return dn.spec.fn(*args, **kwargs)
        except Exception as exc:
            raise ExecutionError(f"node {dn.id} ({dn.op}) failed: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                                 node=dn.id, op=dn.op) from None

    def _run_stage(self, stage: int, site_value=None):
        for dn in self.by_stage.get(stage, ()):
            value = self.run_node(dn, site_value)
            self.values[dn.id] = value
            for name in self.saves_of.get(dn.id, ()):
                self.on_save(name, value)
            for r in set(_walk_refs(dn.args, []) + _walk_refs(tuple(dn.kwargs.values()), [])):
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
            if not isinstance(output, torch.Tensor):
                raise ExecutionError(f"site {name!r} did not produce a tensor")
            self._run_stage(index, output)
            result = None
            writes = self.writes.pop(index, {})
            if "inplace" in writes:
                value = self.values.pop(writes["inplace"], None)
                read_id = self._read_node(index)
                if read_id is not None and self.pending.get(read_id, 0) > 0:
                    # Someone still needs the value as it was read: keep a copy.
                    self.values[read_id] = output.clone()
                with torch.no_grad():
                    output.copy_(value)
            if "replace" in writes or "narrow" in writes:  # narrow: fewer batch rows
                result = self.values.pop(writes.get("replace", writes.get("narrow")), None)
            self.sites_done += 1
            self.on_site(self.sites_done, len(self.vg.site_infos))
            if stop_early and index == last_needed:
                raise _StopForward
            return result
        return hook

    def _read_node(self, index: int):
        for dn in self.by_stage.get(index, ()):
            if dn.op == "site.read":
                return dn.id
        return None

    def run(self, site_modules: dict[str, torch.nn.Module], forward: Callable[[], object],
            need_output: bool):
        """Run the forward with hooks at the graph's sites; returns the forward's output
        (None when it was stopped early because nothing after the last site is needed)."""
        t0 = time.perf_counter()
        self._run_stage(-1)
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
            except _StopForward:
                output = None
        finally:
            for h in handles:
                h.remove()
        if self.sites_done != len(self.vg.site_infos):
            raise ExecutionError(f"the forward pass reached {self.sites_done} of "
                                 f"{len(self.vg.site_infos)} sites")
        self.timings["execute_s"] = time.perf_counter() - t0
        return output


__all__ = ["Interleaver"]
