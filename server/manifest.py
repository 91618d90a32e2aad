"""What a client needs to know about a hosted model: its hook sites in firing order with
symbolic shapes, its config and its tokenizer files.

Sites are found by running two small probe forwards with different batch and sequence
sizes and recording every hook point as it fires; each dimension is then named ``B``
(batch), ``S`` (sequence) or kept as a number.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from transformer_lens.hook_points import HookPoint

from hookwire.frames import DTYPE_NAMES
from hookwire.graph import hook_mode
from hookwire.errors import GraphValidationError
from hookwire.server.tl_modes import flags_applied, tl_hooks_marked
from hookwire.protocol import ModelInfo, SiteDescription, dump
from hookwire.tokenizer import tokenizer_files
from hookwire.validate import SiteInfo

_PROBES = ((3, 11), (5, 13))  # (batch, seq): distinct from each other and from small dims


def _record_sites(bridge, batch: int, seq: int
                  ) -> list[tuple[str, int, tuple, torch.dtype, bool]]:
    """(name, call, shape, dtype, has_gradient) for every hook point as it fires.

    The probe runs with autograd on and then differentiates the logits: a site has a gradient
    when its output depends on the weights *and* reaches the logits (``rotary_emb.hook_in``
    on Llama does not). Locally, only such sites fire their backward hooks."""
    # One entry per hook point, named by its canonical name (aliases share the object).
    points = {id(hp): (hp.name or name, hp) for name, hp in bridge.hook_dict.items()
              if isinstance(hp, HookPoint)}
    fired: list = []
    outputs: list = []
    counts: dict[str, int] = {}
    handles = []
    for name, hp in points.values():
        def hook(module, args, output, name=name):
            if isinstance(output, torch.Tensor):
                call = counts.get(name, 0)
                counts[name] = call + 1
                fired.append((name, call, tuple(output.shape), output.dtype))
                if output.requires_grad:
                    # A fresh tensor per site, as the executor makes for gradient sites.
                    output = output.view_as(output)
                outputs.append(output)
                return output
            return None
        handles.append(hp.register_forward_hook(hook))
    try:
        tokens = torch.randint(0, _probe_vocab(bridge), (batch, seq), generator=torch.Generator()
                               .manual_seed(0)).to(next(bridge.parameters()).device)
        # As a local run_with_cache(incl_bwd=True) would: backward hooks everywhere (TL's
        # normalizations then keep hook_normalized in the autograd graph).
        with torch.enable_grad(), tl_hooks_marked(bwd_points=[hp for _, hp in
                                                             points.values()]), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TL's notes on the path it takes: expected here
            logits = bridge(tokens, return_type="logits")
        differentiable = [i for i, out in enumerate(outputs) if out.requires_grad]
        # enable_grad here too: under a caller's no_grad (a notebook's set_grad_enabled(False))
        # logits.sum() would have no grad_fn.
        with torch.enable_grad():
            grads = torch.autograd.grad(logits.sum(), [outputs[i] for i in differentiable],
                                        allow_unused=True) if logits.requires_grad else ()
        has_grad = {i for i, g in zip(differentiable, grads) if g is not None}
    finally:
        for h in handles:
            h.remove()
    return [entry + (i in has_grad,) for i, entry in enumerate(fired)]


def _probe_vocab(bridge) -> int:
    """Token ids the probes may use: below d_vocab, 256 and the rows of the model's first
    embedding table (a hand-built bridge's cfg can claim more tokens than it embeds)."""
    limit = min(bridge.cfg.d_vocab, 256)
    original = getattr(bridge, "original_model", None)
    if isinstance(original, torch.nn.Module):
        embedding = next((m for m in original.modules() if isinstance(m, torch.nn.Embedding)),
                         None)
        if embedding is not None:
            limit = min(limit, embedding.num_embeddings)
    return max(limit, 1)


def probe_sizes(bridge) -> tuple:
    """The two (batch, seq) probes: the defaults, or shorter sequences for a model with fewer
    positions (TL's native test models have n_ctx=8)."""
    n_ctx = getattr(bridge.cfg, "n_ctx", None)
    (b1, s1), (b2, s2) = _PROBES
    if isinstance(n_ctx, int) and 2 < n_ctx < s2:
        return (b1, n_ctx - 1), (b2, n_ctx)
    return _PROBES


def probe_sites(bridge, flags=()) -> list[SiteInfo]:
    """The TL sites in firing order, with TL's hook switches ``flags`` on (the rest off)."""
    probes = probe_sizes(bridge)
    (b1, s1), (b2, s2) = probes
    with flags_applied(bridge, flags):
        first, second = _record_sites(bridge, b1, s1), _record_sites(bridge, b2, s2)
    if [(n, c) for n, c, *_ in first] != [(n, c) for n, c, *_ in second]:
        raise RuntimeError("hook sites fire in a different order for different input sizes")
    sites = []
    for (name, call, shape1, dtype, grad), (_, _, shape2, *_) in zip(first, second):
        if len(shape1) != len(shape2):
            continue
        dims = symbolic_shape(shape1, shape2, probes)
        if dims is not None and dtype in DTYPE_NAMES:
            sites.append(SiteInfo(name, call, dims, dtype, grad))
    return sites


def symbolic_shape(shape1, shape2, probes=_PROBES) -> tuple | None:
    """One site's shapes in the two probes -> each dim as ``B``, ``S`` or its fixed size
    (None when a dim moves with neither)."""
    (b1, s1), (b2, s2) = probes
    dims = []
    for d1, d2 in zip(shape1, shape2):
        if d1 == d2:
            dims.append(d1)
        elif (d1, d2) == (b1, b2):
            dims.append("B")
        elif (d1, d2) == (s1, s2):
            dims.append("S")
        else:
            return None
    return tuple(dims)


_TL_CONFIG_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "n_ctx",
                   "n_key_value_heads", "architecture")


def tl_config(bridge) -> dict:
    """The TL config values a client's own model must share with this one."""
    out = {}
    for key in _TL_CONFIG_KEYS:
        value = getattr(bridge.cfg, key, None)
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            out[key] = value
    return out


def _descriptions(sites: list[SiteInfo]) -> list[SiteDescription]:
    return [SiteDescription(name=s.name, call=s.call, shape=list(s.shape),
                            dtype=DTYPE_NAMES[s.dtype], grad=s.grad) for s in sites]


def describe(hosted, sites: list[SiteInfo], tl_flags=()) -> ModelInfo:
    return ModelInfo(
        model=hosted.name, architecture=hosted.architecture, config=hosted.config_dict,
        sites=_descriptions(sites),
        hook_names=[name for name in hosted.bridge.hook_dict],
        hook_aliases=hook_aliases(hosted.bridge),
        tokenizer_files=_tokenizer_files(hosted.tokenizer),
        tl_config=tl_config(hosted.bridge), tl_flags=sorted(tl_flags))


def _tokenizer_files(tokenizer) -> dict:
    """The tokenizer's files for clients; none for a bridge hosted with no HF tokenizer (a
    native TL model, a stub): clients then bring their own token ids."""
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        return {}
    return tokenizer_files(tokenizer)


@dataclass
class HookMode:
    """The model with some of TL's hook switches on: what clients are told, and the tables
    its graphs are validated against."""
    info_json: str
    site_table: dict
    site_order: dict


def probe_hook_mode(hosted, tl_flags) -> HookMode:
    """Probe the TL sites with ``tl_flags`` on (``set_use_split_qkv_input`` adds
    ``hook_q_input``... and reorders the attention's sites). Refused with a typed error where
    TL refuses the switch for this architecture. The caller holds the model's lock."""
    try:
        sites = probe_sites(hosted.bridge, tl_flags)
    except (ValueError, NotImplementedError) as exc:
        raise GraphValidationError(f"model {hosted.name!r} cannot run with TL hook switches "
                                   f"{hook_mode(tl_flags)!r}: {exc}", rule="tl_flags") from None
    table, order = site_lookup(hosted.bridge, sites)
    return HookMode(dump(describe(hosted, sites, tl_flags)), table, order)


def hook_aliases(bridge) -> dict[str, str]:
    """alias -> canonical name for every hook point TL 4 knows under another name."""
    out = {}
    for alias, hp in bridge.hook_dict.items():
        canonical = getattr(hp, "name", None)
        if canonical and canonical != alias:
            out[alias] = canonical
    return out


def site_lookup(bridge, sites: list[SiteInfo]) -> tuple[dict, dict]:
    """(name, call) -> SiteInfo and -> firing position, under the canonical name *and* every
    alias TL accepts for the same hook point (``blocks.0.hook_resid_pre`` for
    ``blocks.0.hook_in``), so graphs may name sites either way."""
    table = {(s.name, s.call): s for s in sites}
    order = {(s.name, s.call): i for i, s in enumerate(sites)}
    for alias, hp in bridge.hook_dict.items():
        canonical = getattr(hp, "name", None) or alias
        for s in sites:
            if s.name == canonical and alias != canonical:
                table[(alias, s.call)] = s
                order[(alias, s.call)] = order[(s.name, s.call)]
    return table, order
