"""Trace one planned pyvene call into a graph.

At each site, in the server's firing order, the site's value is a proxy for the whole batch.
Getters and setters run pyvene's own pure functions on proxies of their row blocks --
``output_to_subcomponent`` (head splits, q/k/v thirds), ``gather_neurons``,
``do_intervention`` (which calls the intervention's ``forward``: pyvene's math) and
``scatter_neurons`` -- so every torch op they perform becomes a graph node, and every tensor
they touch (index tensors, rotations, masks, weights) a constant. Setters edit their rows in
place, as pyvene's hooks do, and the site is written back in place.
"""
from __future__ import annotations

import torch
from torch.nn.utils import parametrize
from pyvene.models.interventions import CollectIntervention, InterventionOutput, SkipIntervention
from pyvene.models.modeling_utils import (do_intervention, gather_neurons,
                                          output_to_subcomponent, scatter_neurons)

from hookwire.errors import HookwireError
from hookwire.pyvene.components import check_fires
from hookwire.pyvene.fixes import needs_fix, per_example_swap
from hookwire.pyvene.plan import Layout, Rows, Task, UnsupportedCall
from hookwire.trace import Tracer, tracing


class CallTrace:
    """The traced graph of one call, and the names its results come back under."""

    def __init__(self, tracer: Tracer, collect_keys: list[str], output_names: list[str]):
        self.tracer = tracer
        self.collect_keys = collect_keys
        self.output_names = output_names


def _gather(value, component: str, unit: str, locs, model_class, hf_config):
    """pyvene's ``_gather_intervention_output`` (minus its hot path), on a proxy."""
    selected = value.clone()
    if locs is None:
        return selected
    selected = output_to_subcomponent(selected, component, model_class, hf_config)
    return gather_neurons(selected, unit, locs, device="cpu")


def trace_call(tasks: list[Task], layout: Layout, info, model_name: str, model_class,
               hf_config, use_fast: bool, reverse_link: dict, output_dim: int,
               outputs: list[Rows], narrow: tuple[str, int] | None = None,
               differentiable: bool = False) -> CallTrace:
    """``outputs``: row blocks whose outputs come back, in order: of the forward's own output
    (logits after everything the model does to them -- Gemma 2's soft-capping, Cohere's
    logit scale --, or a base model's last hidden state), ``output_dim`` wide.
    ``narrow``: (site, k) -- after that site only the first k rows go on (a "narrow" write).
    ``differentiable``: trace with autograd on, so constants computed from trainable
    parameters keep their link to them (see ``hookwire.pyvene.training``)."""
    events: dict[str, list] = {}
    for t in tasks:
        check_fires(t.site, info, model_name)
        if t.src is not None:
            get_site = t.site.input_site if isinstance(t.intervention, SkipIntervention) \
                else t.site.site
            if isinstance(t.intervention, SkipIntervention):
                check_fires(type(t.site)(t.site.component, t.site.path, "input"),
                            info, model_name)
                _check_positional_input(t, info)
            events.setdefault(get_site, []).append((t.order, 0, t))
        events.setdefault(t.site.site, []).append((t.order, 1, t))
    if narrow is not None:
        events.setdefault(narrow[0], [])
    order = sorted(events, key=lambda name: info.site_index[(name, 0)])
    batch, seq = sum(r.stop - r.start for r in layout.rows), layout.seq_len
    if any(r.length != seq for r in layout.rows):
        for name in order:  # padding is cut off along dim 1: it must be the sequence
            shape = info.sites[info.site_index[(name, 0)]].shape
            if tuple(shape[:2]) != ("B", "S"):
                raise HookwireError(f"site {name!r} has shape {shape}, not (batch, seq, ...): "
                                    "base and sources of different lengths cannot share its "
                                    "forward; pass inputs of equal length")

    tracer = Tracer()
    gathered: dict[str, object] = {}
    hot: dict[str, object] = {}
    collect_keys: list[str] = []
    output_names: list[str] = []
    # cached(): a parametrized weight (pyvene's orthogonal rotations) is computed once per
    # call, so it becomes one constant, not one per use.
    with tracing(tracer), torch.set_grad_enabled(differentiable), parametrize.cached():
        for name in order:
            site = info.sites[info.site_index[(name, 0)]]
            x = tracer.read_site(name, 0, site.concrete_shape(batch, seq), site.dtype,
                                 strides=site.concrete_strides(batch, seq))
            index = len(tracer.sites) - 1
            for _, phase, t in sorted(events[name], key=lambda e: (e[0], e[1])):
                # a trace error names the intervention and its site
                tracer.context = (f"pyvene intervention {t.key} "
                                  f"({type(t.intervention).__name__})", name)
                if phase == 0:
                    gathered[t.key] = _gather(t.src.of(x, seq), t.site.component, t.unit,
                                              t.src_locs, model_class, hf_config)
                    continue
                result = _setter(t, x, seq, gathered, hot, reverse_link, model_class,
                                 hf_config, use_fast)
                if result is not None:
                    collect_keys.append(t.key)
                    tracer.save(f"__collect_{len(collect_keys) - 1}", result)
            tracer.context = None
            if narrow is not None and name == narrow[0]:
                tracer.write_site(index, x[:narrow[1]], "narrow")
                batch = narrow[1]  # later sites hold the kept rows only
            elif x._hw_version > 0:
                tracer.write_site(index, x, "inplace")
            del x
        out = tracer.read_output("logits", (batch, seq, output_dim), info.output_dtype)
        for k, rows in enumerate(outputs):
            output_names.append(f"__logits_{k}")
            tracer.save(output_names[-1], rows.of(out, seq))
    return CallTrace(tracer, collect_keys, output_names)


def _check_positional_input(t: Task, info) -> None:
    """pyvene's SkipIntervention reads the module's first positional argument (``args[0]``
    in its getter): a module the model calls with keyword arguments only (Llama's
    ``self_attn``) fails locally with IndexError, where the server's input site would hold
    the first keyword argument."""
    layout = info.module_layouts.get(t.site.input_site)
    if layout is not None and (not layout or layout[0] != "Tensor"):
        raise UnsupportedCall(
            f"SkipIntervention {t.key!r} reads the positional input of module {t.site.path!r}, "
            "which the model calls with keyword arguments only: local pyvene fails on this "
            "(IndexError). Skip a component whose module takes its input positionally "
            "(block_output, mlp_output), or run pyvene locally", key=t.key)


def _setter(t: Task, x, seq, gathered, hot, reverse_link, model_class, hf_config,
            use_fast):
    """pyvene's setter hook on the ``dst`` rows; returns a collected value, else None."""
    rows = t.dst.of(x, seq)
    link = reverse_link.get(t.key)
    if link is not None and link in hot:
        selected = hot[link]
    else:
        selected = _gather(rows, t.site.component, t.unit, t.dst_locs, model_class, hf_config)
    iv = t.intervention
    if isinstance(iv, CollectIntervention):
        return do_intervention(selected, None, iv, t.subspaces)
    source = None
    if not iv.is_source_constant:
        source = gathered.get(t.key) if t.source_constant is None else t.source_constant
    if needs_fix(iv, selected, t.subspaces):  # pyvene 0.1.8 merges them (see fixes.py)
        out = per_example_swap(iv, selected, source, t.subspaces)
    else:
        out = do_intervention(selected, source, iv, t.subspaces)
    if isinstance(out, InterventionOutput):
        out = out.output
    if link is not None:
        hot[link] = out.clone()
    if t.dst_locs is None:
        rows[:] = out[:]
    else:
        scatter_neurons(rows, out, t.site.component, t.unit, t.dst_locs, model_class, hf_config,
                        use_fast, device="cpu")
    return None


__all__ = ["trace_call", "CallTrace"]
