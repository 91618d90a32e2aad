"""Getting a hosted model ready to serve: its hook sites (TL hook points, then HF module
sites) with their shapes, what it tells clients, and the checks that it can be served at all.

A model that cannot be served is refused here, at load, with the reason
(``UnsupportedModel``): its sites cannot be probed. A model that is not causal (a later token
changes earlier positions' outputs: TL's hand-built test models, an encoder used as a decoder)
is served too, but never padded: it shares a forward only with requests of its own length
(``ModelEntry.causal``, ``worker.batch_key``), and clients that would pad rows refuse it. A front
that cannot serve it is refused with the reason in the manifest: TL hook points when
TransformerLens's bridge does not run on it (or it has no LM head), generation when it keeps
no KV cache, HF module sites when its HF tree cannot be mirrored.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch

from hookwire.errors import UnsupportedModel
from hookwire.frames import DTYPE_NAMES
from hookwire.kv_cache import cache_kwargs
from hookwire.module_sites import PREFIX
from hookwire.protocol import dump
from hookwire.server.attention_sites import eager_probe_model
from hookwire.server.batch_probe import replace_sensitive_sites
from hookwire.server.cancel_watch import block_modules
from hookwire.server.hf_modules import (module_table, plain_hf_model, probe_module_layouts,
                                        probe_module_sites)
from hookwire.server.index_guard import value_ranges
from hookwire.server.manifest import describe, probe_sites, probe_vocab, site_lookup
from hookwire.server.models import HostedModel, bridge_failure

log = logging.getLogger("hookwire.server")

# The manifest's entry for "no HF module sites at all" (the reason is its value).
ALL_MODULE_SITES = PREFIX + "*"


class _NoHFModel(Exception):
    """The hosted bridge wraps a module that is no HF model: there is no module tree."""


@dataclass
class ModelEntry:
    """A hosted model ready to serve: everything the worker needs per request, computed once
    at load by :func:`prepare_model` -- the sites in firing order with their symbolic shapes
    (``site_table``/``site_order``, the tables graphs are validated against), the modules
    hooks go on (``site_modules``), the manifest sent to clients (``info_json``), what cannot
    be served and why (``unserved``, ``tl_refused``, ``generate_refused``), and the per-model
    safety tables (``value_ranges``, ``solo_replace_sites``, ``parameters``)."""
    hosted: HostedModel
    sites: list
    site_table: dict
    site_order: dict
    info_json: str
    site_modules: dict
    hf_model: object = None  # the plain HF tree that module sites ("hf:...") run on
    unserved: dict = field(default_factory=dict)   # site name -> why it cannot be hooked
    output_dtype: torch.dtype = torch.float32      # of what the forward returns
    generate_refused: str | None = None            # why it cannot generate here (None: can)
    tl_refused: str | None = None                  # why TL hook points are not served
    # name -> tensor (detached, same storage) for "@<name>" constants: its parameters, buffers
    parameters: dict = field(default_factory=dict)
    # site name -> [low, high) its integer values must lie in (server/index_guard.py)
    value_ranges: dict = field(default_factory=dict)
    # (name, call) of sites a replacing write changes the forward's path at: such a writer
    # runs alone (server/batch_probe.py)
    solo_replace_sites: set = field(default_factory=set)
    # storage addresses of every parameter and buffer (bridge and HF tree): a site value in
    # one of them is written copy-on-write (hookwire.executor.Interleaver, ``weights``)
    weight_storages: frozenset = frozenset()
    # TL sites that are hook points of a block itself (``blocks.N.hook_in/out`` and their
    # aliases): a forward may give way at them (server/give_way.py), nested forwards
    # re-entering no component that is part-way through its own forward
    block_sites: frozenset = frozenset()
    # TL sites of a block's attention where its scores, pattern and output are made
    # (``blocks.N.attn.hook_attn_scores/hook_pattern/hook_out``): a forward gives way there
    # too (attention is most of a long sequence's block), re-entrant in every served family
    attention_sites: frozenset = frozenset()
    # ... and their modules, each once: a forward's stop check runs after each
    attention_points: tuple = ()
    # The plain HF tree's (module sites' forward): each block's attention module, after which
    # its stop check runs too (HF attention is one call: no scores or pattern apart)
    hf_attention_points: tuple = ()
    # Why its TL forward never gives way (None: it may): HF code it runs keeps per-forward
    # state on the modules, live across the points where a forward gives way
    # (``TL_FORWARD_STATE``)
    tl_forward_state: str | None = None
    # TL hook-switch combination (graph.hook_mode) -> manifest.HookMode, probed on first use
    modes: dict = field(default_factory=dict)
    # False: a later token changes earlier positions' outputs (probed at load), so requests
    # are never right-padded: only requests of equal length share a forward.
    causal: bool = True

    # The last dim of what the forward returned at load (None: not measured).
    output_width: int | None = None

    @property
    def output_dim(self) -> int:
        """Size of the last dim of what the forward returns (vocabulary, or hidden size): as
        measured at load, since a config may say otherwise (TL's hand-built test models
        declare d_vocab=256 over a 64-row LM head)."""
        if self.output_width is not None:
            return self.output_width
        if self.hosted.family.has_lm_head:
            return self.hosted.vocab_size
        return int(self.hosted.original.config.hidden_size)


def weight_storages(*models) -> frozenset:
    """Where the models' parameters and buffers live. Some families hand a site a slice of a
    buffer (OpenAI GPT's and BERT's position ids are ``position_ids[:, :seq]``): written in
    place, it would change the shared model for every later request of every user."""
    return frozenset(t.untyped_storage().data_ptr() for model in models if model is not None
                     for t in list(model.parameters()) + list(model.buffers())
                     if t.numel() and t.device.type != "meta")


def _sites_at(site_modules: dict, modules) -> frozenset:
    """The names (aliases included) under which ``modules`` are sites."""
    own = {id(m) for m in modules}
    return frozenset(name for name, m in site_modules.items() if id(m) in own)


def block_sites(bridge, site_modules: dict) -> frozenset:
    """The sites whose hook point is a direct child of one of the bridge's blocks. A
    component inside a block may keep per-call state on itself (TL's OPT MLP bridge does:
    a forward nested at its ``hook_in`` breaks the one it interrupts); a block's own hook
    points fire between its components."""
    from transformer_lens.hook_points import HookPoint

    if bridge is None:
        return frozenset()
    return _sites_at(site_modules, (m for block in block_modules(bridge)
                                    for m in block.children() if isinstance(m, HookPoint)))


# Hook points of an attention component where its scores, its pattern, then its output
# exist (the last splits a block's attention from its MLP)
ATTENTION_GIVE_WAY_POINTS = ("hook_attn_scores", "hook_pattern", "hook_out")


def attention_points(bridge) -> tuple:
    """The hook-point modules of each block's attention named in
    ``ATTENTION_GIVE_WAY_POINTS``: between the attention's score, pattern and output
    computations, and between the attention and the MLP. Every served family's forward is
    re-entrant there (tests/test_families.py), unlike at hook points of every component
    (OPT's MLP bridge)."""
    from transformer_lens.hook_points import HookPoint

    if bridge is None:
        return ()
    return tuple(m for block in block_modules(bridge)
                 for attn in [getattr(block, "attn", None)] if attn is not None
                 for name, m in attn.named_children()
                 if name in ATTENTION_GIVE_WAY_POINTS and isinstance(m, HookPoint))


def hf_attention_points(hf_model) -> tuple:
    """Each block's attention module in a plain HF tree (a direct child of the block whose
    class name says attention: ``attn``, ``self_attn``, ``attention``...; none for a block
    without one): a forward reading HF module sites gives way after it, between the
    block's attention and its MLP. Every served family's plain forward is re-entrant there
    (tests/test_families.py)."""
    if hf_model is None:
        return ()
    return tuple(attn for block in block_modules(hf_model)
                 for attn in [next((m for m in block.children()
                                    if "attention" in type(m).__name__.lower()), None)]
                 if attn is not None)


def prepare_model(hosted: HostedModel) -> ModelEntry:
    try:
        return _prepare(hosted)
    except UnsupportedModel:
        raise
    except Exception as exc:
        raise UnsupportedModel(bridge_failure(hosted.architecture, exc),
                               architecture=hosted.architecture) from exc


def _prepare(hosted: HostedModel) -> ModelEntry:
    # TL hook points first, then HF module sites (hookwire.module_sites): additive, so TL
    # clients see the sites they always saw, in the same order.
    sites, unserved, tl_refused = [], {}, None
    if hosted.bridge is None:
        tl_refused = (f"{hosted.architecture} has no LM head (its output is "
                      f"{hosted.family.output_field}), and TransformerLens needs one: use "
                      "hookwire.hf or hookwire.pyvene with it, or serve the family's LM model "
                      "(e.g. GPT2LMHeadModel) for TL hooks")
    else:
        original = hosted.original
        try:
            sites, unserved = probe_sites(hosted.bridge,
                                          eager_probe_model(original))
        except Exception as exc:
            # TransformerLens's bridge does not run on this model (this transformers, this
            # dtype): its hook points are refused with the reason; the HF module-path fronts
            # may still serve it.
            log.warning("TL hook points of %s not served: %s", hosted.name, exc)
            tl_refused = bridge_failure(hosted.architecture, exc)
    try:
        if hosted.bridge is not None and getattr(hosted.original, "config", None) is None:
            # A bridge over a module that is no HF model (TL's native models...): TL sites
            # only.
            raise _NoHFModel("the bridge wraps no HF model")
        hf_model = plain_hf_model(hosted)
        module_sites, module_unserved = probe_module_sites(hf_model)
        layouts = probe_module_layouts(hf_model)
    except Exception as exc:
        if hosted.bridge is None or tl_refused is not None:
            raise
        # A model whose HF tree we cannot mirror still serves its TL sites; clients of the
        # module-path fronts are told why they cannot use it.
        if not isinstance(exc, _NoHFModel):
            log.exception("no HF module sites for %s", hosted.name)
        hf_model, module_sites, layouts = None, [], ({}, {}, {}, {}, [])
        module_unserved = {ALL_MODULE_SITES: f"the server could not mirror {hosted.name!r}'s "
                           f"HF module tree ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:200] if str(exc) else ''})"}
    output_dtype, causal, output_width = probe_causality(hosted, hf_model)
    generate_refused = kv_cache_refusal(hosted, hf_model)
    sites = sites + module_sites
    unserved.update(module_unserved)
    info = describe(hosted, sites, unserved)
    info.output_dtype = DTYPE_NAMES[output_dtype]
    info.causal = causal
    info.output_width = output_width
    info.generate_refused = generate_refused
    info.tl_refused = tl_refused
    (info.module_layouts, info.step_module_layouts, info.module_kwarg_layouts,
     info.step_module_kwarg_layouts, info.list_outputs) = layouts
    site_table, site_order = (site_lookup(hosted.bridge, sites) if hosted.bridge is not None
                              else _plain_lookup(sites))
    site_modules = {name: hp for name, hp in hosted.bridge.hook_dict.items()} \
        if hosted.bridge is not None else {}
    if hf_model is not None:
        site_modules.update(module_table(hf_model, module_sites))
    parameters = {}
    if hf_model is not None:
        for name, t in list(hf_model.named_parameters(remove_duplicate=False)) + \
                list(hf_model.named_buffers(remove_duplicate=False)):
            parameters.setdefault(name, t.detach())
    tl_bridge = hosted.bridge if tl_refused is None else None
    points = attention_points(tl_bridge)
    return ModelEntry(
        hosted=hosted, sites=sites, site_table=site_table, site_order=site_order,
        info_json=dump(info), site_modules=site_modules, hf_model=hf_model, unserved=unserved,
        output_dtype=output_dtype, generate_refused=generate_refused, tl_refused=tl_refused,
        parameters=parameters, value_ranges=value_ranges(sites, hosted.bridge, hf_model),
        solo_replace_sites=_solo_replace_sites(hosted, sites, site_modules, tl_refused),
        weight_storages=weight_storages(hosted.model, hf_model),
        block_sites=block_sites(tl_bridge, site_modules),
        attention_sites=_sites_at(site_modules, points), attention_points=points,
        hf_attention_points=hf_attention_points(hf_model),
        tl_forward_state=TL_FORWARD_STATE.get(hosted.architecture),
        causal=causal, output_width=output_width)


# Families whose TL forward keeps per-forward state on the model's modules past a point
# where a forward gives way, so a forward nested there would read or overwrite it
# (tests/test_give_way_state.py audits every served family for such state).
TL_FORWARD_STATE = {
    "RecurrentGemmaForCausalLM": (
        "HF's RecurrentGemma keeps its recurrence on the modules (conv1d_state, "
        "recurrent_states): with the cache TL's forward runs with, each recurrent layer "
        "reads what the last forward left there"),
}


def _solo_replace_sites(hosted, sites, site_modules, tl_refused) -> set:
    """TL sites where a replacing write moves the forward onto another code path (such a
    writer runs alone). Where the probe itself cannot run, every TL site counts as one:
    writers run alone, which is slower but never changes a batch mate's result."""
    if hosted.bridge is None or tl_refused is not None:
        return set()
    try:
        return replace_sensitive_sites(hosted.bridge, sites, site_modules)
    except Exception:
        log.warning("replace-sensitivity probe failed for %s; TL writers run alone",
                    hosted.name, exc_info=True)
        return {(s.name, s.call) for s in sites if not s.name.startswith(PREFIX)}


def _plain_lookup(sites) -> tuple[dict, dict]:
    return ({(s.name, s.call): s for s in sites},
            {(s.name, s.call): i for i, s in enumerate(sites)})


def probe_causality(hosted: HostedModel, hf_model) -> tuple[torch.dtype, bool, int]:
    """(dtype of the forward's output, whether the model is causal, the output's last dim).
    Causal: changing the last
    token leaves every earlier position's output as it was -- the promise right-padding and
    co-batching requests of different lengths rest on. A model that breaks it is served
    unpadded (see ``ModelEntry.causal``)."""
    # The plain HF forward where there is one (the same computation as the bridge's, without
    # TL's bookkeeping); the bridge otherwise.
    use_bridge = hf_model is None
    model = hosted.bridge if use_bridge else hf_model
    from hookwire.server.devices import input_device

    vocab = probe_vocab(hosted.original, hosted.vocab_size)
    tokens = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    outs = []
    with torch.no_grad():
        for t in (tokens, changed):
            t = t.to(input_device(hosted.original))
            if use_bridge:
                out = type(model).forward(model, t, return_type="logits")
            else:
                out = type(model).forward(model, input_ids=t, use_cache=False)
                out = getattr(out, hosted.family.output_field)
            dtype, width = out.dtype, int(out.shape[-1])
            outs.append(out[:, :-1].float().cpu())
    scale = outs[0].abs().max().clamp_min(1e-6)
    # Exactly equal for causal models, up to reduction order (MoE expert grouping: ~1e-7).
    causal = bool(((outs[0] - outs[1]).abs().max() / scale) < 1e-4)
    if not causal:
        log.warning("%s (%s) is not causal: a later token changes earlier positions' outputs; "
                    "its requests are never padded (only equal lengths share a forward)",
                    hosted.name, hosted.architecture)
    return dtype, causal, width


def kv_cache_refusal(hosted: HostedModel, hf_model) -> str | None:
    """Why the server's token loop cannot generate with this model (None: it can). The loop
    keeps a transformers ``DynamicCache`` and runs one new token per forward; it is used only
    where that gives the logits a full forward gives (models that keep their state in an
    object of their own -- SSMs, RWKV -- or keep none are refused, with a way out)."""
    if not hosted.family.has_lm_head:
        return f"{hosted.architecture} has no LM head: there are no logits to pick tokens from"
    if hf_model is None:
        return "the server has no HF module tree for it"
    from transformers import DynamicCache

    from hookwire.server.devices import input_device

    way_out = ("; generate with TransformerLens's generate(remote=True) instead (it re-runs "
               "the whole sequence at every step), or locally")
    tokens = torch.randint(0, probe_vocab(hf_model, hosted.vocab_size), (1, 5),
                           generator=torch.Generator().manual_seed(2)).to(
                               input_device(hf_model))
    forward = type(hf_model).forward
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' notes on cache arguments
            full = forward(hf_model, input_ids=tokens, use_cache=False).logits[:, -1]
            kv = DynamicCache(config=hf_model.config)
            forward(hf_model, input_ids=tokens[:, :-1], use_cache=True,
                    **cache_kwargs(forward, kv))
            step = forward(hf_model, input_ids=tokens[:, -1:], use_cache=True,
                           **cache_kwargs(forward, kv)).logits[:, -1]
    except Exception as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        return (f"{hosted.architecture} does not run with a KV cache here "
                f"({type(exc).__name__}: {first})" + way_out)
    scale = full.float().abs().max().clamp_min(1e-6)
    if not bool(((step.float() - full.float()).abs().max() / scale) < 1e-2):
        return (f"{hosted.architecture} keeps its state in a cache of its own, not in a KV "
                "cache: the server's token loop would give other tokens than a full forward"
                + way_out)
    return None


__all__ = ["ModelEntry", "prepare_model", "probe_causality", "kv_cache_refusal",
           "ALL_MODULE_SITES"]
