"""What a client needs to know about a hosted model: its hook sites in firing order with
symbolic shapes, its config and its tokenizer files.

Sites are found by running two small probe forwards with different batch and sequence
sizes and recording every hook point as it fires; each dimension is then named ``B``
(batch), ``S`` (sequence) or kept as a number.
"""
from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass

import torch
from transformer_lens.hook_points import HookPoint

from hookwire.frames import DTYPE_NAMES
from hookwire.errors import GraphValidationError
from hookwire.ir import SiteInfo, flat_dim, hook_mode
from hookwire.server.devices import input_device
from hookwire.server.tl_modes import flags_applied, tl_hooks_marked
from hookwire.protocol import ModelInfo, SiteDescription, dump
from hookwire.site_layout import layout_of
from hookwire.tokenizer import tokenizer_files

PROBE_SHAPES = ((3, 11), (5, 13))  # (batch, seq): distinct from each other and from small dims


def _record_sites(bridge, batch: int, seq: int, nontensor: dict | None = None,
                  gradients: bool = True, marked: bool | None = None):
    """((name, call, shape, dtype, has_gradient) for every hook point as it fires with a
    tensor, whether it ran with TL hook marks); hook points that fire with something else go
    to ``nontensor`` (name -> what).

    The probe runs as a local ``run_with_cache(incl_bwd=True)`` would: TL sees forward and
    backward hooks on every hook point (some TL components fire a hook point only when it is
    hooked), unless TL's own hooked path fails on this model (``marked=None`` tries it, then
    goes without). With ``gradients`` it differentiates the logits: a site has a gradient when
    its output depends on the weights *and* reaches the logits (``rotary_emb.hook_in`` on
    Llama does not); locally only such sites fire their backward hooks. ``gradients=False``:
    shapes only (every has_gradient False)."""
    if marked is not None:
        return _record(bridge, batch, seq, nontensor, marked, gradients), marked
    try:
        return _record(bridge, batch, seq, nontensor, True, gradients), True
    except Exception:
        return _record(bridge, batch, seq, nontensor, False, gradients), False


def _record(bridge, batch, seq, nontensor, mark_backward, gradients):
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
                fired.append((name, call, tuple(output.shape), output.dtype,
                              tuple(output.stride())))
                if output.requires_grad:
                    # A fresh tensor per site, as the executor makes for gradient sites.
                    output = output.view_as(output)
                outputs.append(output)
                return output
            if nontensor is not None and output is not None:
                nontensor.setdefault(name, _describe_value(output))
            return None
        handles.append(hp.register_forward_hook(hook))
    try:
        tokens = torch.randint(0, _probe_vocab(bridge), (batch, seq), generator=torch.Generator()
                               .manual_seed(0)).to(_bridge_device(bridge))
        marks = [hp for _, hp in points.values()] if mark_backward else []
        with torch.set_grad_enabled(gradients), tl_hooks_marked(marks, marks), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TL's notes on the path it takes: expected here
            logits = bridge(tokens, return_type="logits")
        differentiable = [i for i, out in enumerate(outputs) if out.requires_grad]
        # enable_grad here too: under a caller's no_grad (a notebook's set_grad_enabled(False))
        # logits.sum() would have no grad_fn.
        with torch.enable_grad():
            grads = torch.autograd.grad(logits.sum(), [outputs[i] for i in differentiable],
                                        allow_unused=True) \
                if gradients and logits.requires_grad and differentiable else ()
        has_grad = {i for i, g in zip(differentiable, grads) if g is not None}
    finally:
        for h in handles:
            h.remove()
    # (name, call, shape, dtype, has_gradient, strides)
    return [entry[:4] + (i in has_grad, entry[4]) for i, entry in enumerate(fired)]


def _bridge_device(bridge) -> torch.device:
    original = getattr(bridge, "original_model", None)
    if isinstance(original, torch.nn.Module):
        return input_device(original)
    return next(bridge.parameters()).device


def _describe_value(value) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join("Tensor" if isinstance(v, torch.Tensor) else type(v).__name__
                          for v in value)
        return f"a {type(value).__name__} ({inner})"
    return f"a {type(value).__name__}"


def probe_vocab(model, declared: int) -> int:
    """Token ids a probe forward may use: below ``declared`` (the vocabulary the config
    claims), below 256, and below the rows of ``model``'s first embedding table (a hand-built
    model's config can claim more tokens than it embeds: TL's pretrain test models)."""
    limit = min(int(declared), 256)
    if isinstance(model, torch.nn.Module):
        embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)),
                         None)
        if embedding is not None:
            limit = min(limit, embedding.num_embeddings)
    return max(limit, 1)


def _probe_vocab(bridge) -> int:
    return probe_vocab(getattr(bridge, "original_model", None), bridge.cfg.d_vocab)


def probe_sizes(bridge) -> tuple:
    """The two (batch, seq) probes: the defaults, or shorter sequences for a model with fewer
    positions (TL's native test models have n_ctx=8)."""
    n_ctx = getattr(bridge.cfg, "n_ctx", None)
    (b1, s1), (b2, s2) = PROBE_SHAPES
    if isinstance(n_ctx, int) and 2 < n_ctx < s2:
        return (b1, n_ctx - 1), (b2, n_ctx)
    return PROBE_SHAPES


def probe_sites(bridge, eager_model=None, flags=()) -> tuple[list[SiteInfo], dict[str, str]]:
    """(TL hook sites in firing order, {hook point: why it cannot be served}).

    With ``eager_model`` (the bridge's HF model, when it does not already run eager
    attention) the probe runs a second time with eager attention, as TransformerLens's own
    loader hosts every model: sites that fire only there (``hook_pattern``,
    ``hook_attn_scores`` on models whose attention is otherwise SDPA) are listed with
    ``eager=True``; requests that read or write them run with eager attention. ``flags``:
    TL's hook switches on during the probes (the rest off)."""
    with flags_applied(bridge, flags):
        return _probe_sites(bridge, eager_model)


def _probe_sites(bridge, eager_model):
    probes = probe_sizes(bridge)
    (b1, s1), (b2, s2) = probes
    nontensor: dict[str, str] = {}
    # Gradients (which sites a backward pass reaches) from the first probe; the second, at
    # another size, only for the shapes.
    first, marked = _record_sites(bridge, b1, s1, nontensor)
    fired = [first, _record_sites(bridge, b2, s2, gradients=False, marked=marked)[0]]
    eager_only: set = set()
    canonical = {hp.name or name for name, hp in bridge.hook_dict.items()
                 if isinstance(hp, HookPoint)}
    silent = canonical - {e[0] for e in fired[0]} - set(nontensor)
    eager_failed = None
    if eager_model is not None and silent:  # some hook points never fired: try eager
        from hookwire.server.attention_sites import eager_attention

        try:
            with eager_attention(eager_model):
                first, _ = _record_sites(bridge, b1, s1, gradients=False, marked=marked)
                plain = [(n, c) for n, c, *_ in fired[0]]
                with_eager = [(n, c) for n, c, *_ in first]
                if [k for k in with_eager if k in set(plain)] == plain and \
                        len(with_eager) > len(plain):
                    eager_only = set(with_eager) - set(plain)
                    fired = [_record_sites(bridge, b1, s1, marked=marked)[0],
                             _record_sites(bridge, b2, s2, gradients=False,
                                           marked=marked)[0]]
        except Exception as exc:
            eager_failed = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" \
                if str(exc) else type(exc).__name__
    sites, unserved = describe_fired(*fired, probes=probes)
    if eager_failed is not None:
        for name in silent:
            if name.endswith(("hook_pattern", "hook_attn_scores")):
                unserved[name] = ("attention patterns and scores exist only with eager "
                                  "attention, which this model cannot switch to "
                                  f"({eager_failed})")
    for name, what in nontensor.items():
        # Remote TL hooks are handed tensors; locally this one gets the whole value.
        unserved.setdefault(name, f"it fires with {what}, not a tensor, and remote TL hooks "
                                  "get tensors; hook the HF module it wraps with "
                                  "hookwire.hf instead (torch hooks there get the whole "
                                  "tuple)")
    return [SiteInfo(s.name, s.call, s.shape, s.dtype, s.grad, (s.name, s.call) in eager_only,
                     s.layout)
            for s in sites], unserved


def describe_fired(first: list, second: list, probes=PROBE_SHAPES
                   ) -> tuple[list[SiteInfo], dict[str, str]]:
    """Two probes' fired sites ``(name, call, shape, dtype[, grad, strides])`` -> the sites a
    graph may use, with symbolic shapes and (from the strides) layouts, and {name: why not}
    for those that fire but cannot be described: a shape that follows the values rather than
    the input's size (tokens routed to one expert), calls whose number depends on the input,
    dtypes that cannot travel."""
    unserved: dict[str, str] = {}
    calls1, calls2 = Counter(e[0] for e in first), Counter(e[0] for e in second)
    for name in calls1.keys() | calls2.keys():
        if calls1[name] != calls2[name]:
            unserved[name] = ("it fires a number of times that depends on the input "
                              f"({calls1[name]} and {calls2[name]} calls for two input "
                              "sizes), so a graph cannot name its calls before it runs")
    first = [e for e in first if e[0] not in unserved]
    second = [e for e in second if e[0] not in unserved]
    if [(e[0], e[1]) for e in first] != [(e[0], e[1]) for e in second]:
        raise RuntimeError("hook sites fire in a different order for different input sizes")
    sites = []
    for (name, call, shape1, dtype, *rest), (_, _, shape2, _, *rest2) in zip(first, second):
        dims = symbolic_shape(shape1, shape2, probes) if len(shape1) == len(shape2) else None
        if dims is None:
            unserved.setdefault(name, _shape_reason(shape1, shape2, probes))
        elif dtype not in DTYPE_NAMES:
            unserved.setdefault(name, f"its values are {dtype}, which cannot travel")
        else:
            # Entries with strides (TL sites): the layout both probes share, if not contiguous.
            layout = layout_of([(probes[0], shape1, rest[1]),
                                (probes[1], shape2, rest2[1])]) \
                if len(rest) > 1 and len(rest2) > 1 else None
            sites.append(SiteInfo(name, call, dims, dtype, bool(rest and rest[0]), False,
                                  layout))
    served = {s.name for s in sites}
    return sites, {k: v for k, v in unserved.items() if k not in served}


def _shape_reason(shape1, shape2, probes=PROBE_SHAPES) -> str:
    """Why a site's shapes in the two probes have no symbolic form, as precisely as we can."""
    (b1, s1), (b2, s2) = probes
    seen = f"its shape ({tuple(shape1)} for a {b1}x{s1} input, {tuple(shape2)} for {b2}x{s2})"
    if len(shape1) != len(shape2):
        return f"{seen} changes rank with the input"
    for d1, d2 in zip(shape1, shape2):
        if d1 == d2 or symbolic_shape((d1,), (d2,), probes) is not None:
            continue
        derived = None
        if d2 - d1 == s2 - s1:
            derived = f"the sequence length {d1 - s1:+d} (e.g. a convolution's padding)"
        elif d1 % b1 == 0 and d2 == d1 // b1 * b2:
            derived = f"batch x {d1 // b1} flattened into one dim"
        elif d1 % s1 == 0 and d2 == d1 // s1 * s2:
            derived = f"sequence x {d1 // s1} flattened into one dim"
        if derived is not None:
            return (f"{seen} has a dim that is {derived}, which the manifest's symbolic "
                    "shapes (batch, sequence, batch x sequence, fixed sizes) do not describe")
    return (f"{seen} does not follow batch and sequence length: it depends on the values "
            "(e.g. how many tokens a router sends to an expert), and a graph's shapes must be "
            "known before it runs")


def symbolic_shape(shape1, shape2, probes=PROBE_SHAPES) -> tuple | None:
    """One site's shapes in the two probes -> each dim as ``B``, ``S``, ``B*S`` / ``B*S*k``
    (batch and sequence flattened, times k) or its fixed size (None when a dim moves with none
    of them)."""
    (b1, s1), (b2, s2) = probes
    dims = []
    for d1, d2 in zip(shape1, shape2):
        if d1 == d2:
            dims.append(d1)
        elif (d1, d2) == (b1, b2):
            dims.append("B")
        elif (d1, d2) == (s1, s2):
            dims.append("S")
        elif d1 % (b1 * s1) == 0 and d2 == d1 // (b1 * s1) * (b2 * s2):
            dims.append(flat_dim(d1 // (b1 * s1)))   # B*S, or B*S*k
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
                            dtype=DTYPE_NAMES[s.dtype], grad=s.grad, eager=s.eager,
                            layout=None if s.layout is None else
                            [tuple(dim) for dim in s.layout])
            for s in sites]


def describe(hosted, sites: list[SiteInfo], unserved: dict[str, str], tl_flags=()) -> ModelInfo:
    bridge = hosted.bridge
    return ModelInfo(
        model=hosted.name, architecture=hosted.architecture, config=hosted.config_dict,
        sites=_descriptions(sites),
        unserved_sites=unserved,
        hook_names=[name for name in bridge.hook_dict] if bridge is not None else [],
        hook_aliases=hook_aliases(bridge) if bridge is not None else {},
        tokenizer_files=_tokenizer_files(hosted.tokenizer),
        output=hosted.family.output_field,
        tl_config=tl_config(bridge) if bridge is not None else {},
        tl_flags=sorted(tl_flags))


def _tokenizer_files(tokenizer) -> dict:
    """The tokenizer's files for clients; none for a model hosted with no HF tokenizer (a
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


def probe_hook_mode(entry, tl_flags) -> HookMode:
    """Probe the TL sites with ``tl_flags`` on (``set_use_split_qkv_input`` adds
    ``hook_q_input``... and reorders the attention's sites). Refused with a typed error where
    TL refuses the switch for this architecture. The caller holds the model's lock. The
    answer is the model's own description with the TL sites of that mode (module sites, which
    the switches do not touch, as they are)."""
    from hookwire.protocol import parse_server_message
    from hookwire.server.attention_sites import eager_probe_model

    hosted = entry.hosted
    if hosted.bridge is None or entry.tl_refused is not None:
        raise GraphValidationError(f"model {hosted.name!r} serves no TL hook points, so no "
                                   "TL hook switches", rule="tl_flags")
    original = hosted.original
    try:
        tl_sites, unserved = probe_sites(hosted.bridge, eager_probe_model(original),
                                         tl_flags)
    except (ValueError, NotImplementedError) as exc:
        raise GraphValidationError(f"model {hosted.name!r} cannot run with TL hook switches "
                                   f"{hook_mode(tl_flags)!r}: {exc}", rule="tl_flags") from None
    from hookwire.module_sites import is_module_site

    module_sites = [s for s in entry.sites if is_module_site(s.name)]
    sites = tl_sites + module_sites
    info = parse_server_message(entry.info_json)
    info.sites = _descriptions(sites)
    info.unserved_sites = {**{k: v for k, v in info.unserved_sites.items()
                              if is_module_site(k)}, **unserved}
    info.tl_flags = sorted(tl_flags)
    table, order = site_lookup(hosted.bridge, sites)
    return HookMode(dump(info), table, order)


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
