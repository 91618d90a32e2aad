"""Legacy TransformerLens clients: a TL 2.x ``HookedTransformer`` (or any ``HookedRootModule``
that is not a TL 4 bridge) whose hooks run on the server's TL 4 bridge.

The server's sites carry TL 4 canonical names (``blocks.0.hook_in``); a legacy model's hook
points carry legacy names (``blocks.0.hook_resid_pre``). The server publishes TL 4's own alias
table (``ModelInfo.hook_aliases``), so each legacy hook point maps to the site TL 4 itself
would hook for that name, and hooks still see ``hook.name`` == the legacy name.

Shapes: TL 4 hands hooks on a few aliases a converted view of the raw activation (heads split
out of ``hook_q/k/v/z``; ``hook_rot_q/k`` as [batch, pos, head, d_head]). Legacy hooks expect
the same layouts, so the trace applies the same views here; an edit through the view writes
the site, a returned tensor is mapped back before it replaces the site.

Backward hooks (``bwd_hooks``, ``incl_bwd``) see the gradient of their site in the same
legacy layout; as for TL 4 models they may read gradients, not replace them.

Numerics: the server runs a TL 4 bridge over *unprocessed* HF weights, which equals a legacy
``HookedTransformer.from_pretrained_no_processing`` model -- not ``from_pretrained``'s default
(fold_ln, center_writing_weights, center_unembed, fold_value_biases change activations such as
``hook_resid_*`` and ``ln*.hook_normalized``; logits only up to a constant)."""
from __future__ import annotations

import functools

import torch

from hookwire.client import RemoteModelInfo
from hookwire.errors import HookwireError
from hookwire.families import config_from_dict, family_for_architecture
from hookwire.transformerlens.hook_tracer import Dialect, served_stop_site

# Legacy name suffix -> how TL 4 presents the site to a hook on that name.
_HEADS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z")  # [B,S,H*D] -> [B,S,H,D]
_ROTARY = ("attn.hook_rot_q", "attn.hook_rot_k")                       # [B,H,S,D] -> [B,S,H,D]


# Hook points TL 2.x only computes when a config flag is on (else they never fire locally).
_GATED = {"attn.hook_result": "use_attn_result", "hook_q_input": "use_split_qkv_input",
          "hook_k_input": "use_split_qkv_input", "hook_v_input": "use_split_qkv_input",
          "hook_attn_in": "use_attn_in", "hook_mlp_in": "use_hook_mlp_in",
          "hook_tokens": "use_hook_tokens"}


def _fires_locally(model, name: str) -> bool:
    for suffix, flag in _GATED.items():
        if name.endswith(suffix):
            return bool(getattr(model.cfg, flag, False))
    return True


def is_legacy(model) -> bool:
    """True for hooked models that are not TL 4 bridges (TL 2.x/3.x ``HookedTransformer``)."""
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TL 2.x: there are no bridges
        return True
    return not isinstance(model, TransformerBridge)


def site_for(info: RemoteModelInfo, legacy_name: str) -> str | None:
    """The server site TL 4 hooks for this (legacy or canonical) name, if it fires."""
    canonical = info.hook_aliases.get(legacy_name, legacy_name)
    return canonical if (canonical, 0) in info.site_index else None


def _to_legacy(name: str, x, d_head: int):
    if name.endswith(_HEADS) and x.dim() == 3:
        return x.unflatten(-1, (-1, d_head))
    if name.endswith(_ROTARY) and x.dim() == 4:
        return x.transpose(1, 2)
    return x


def _from_legacy(name: str, y, site_shape: tuple):
    if name.endswith(_HEADS) and len(site_shape) == 3 and y.dim() == 4:
        return y.flatten(-2)
    if name.endswith(_ROTARY) and len(site_shape) == 4:
        return y.transpose(1, 2)
    return y


def _expected_heads(model, name: str) -> int | None:
    cfg = model.cfg
    if name.endswith(("attn.hook_k", "attn.hook_v", "attn.hook_rot_k")):
        if getattr(cfg, "ungroup_grouped_query_attention", False):
            return cfg.n_heads
        return getattr(cfg, "n_key_value_heads", None) or cfg.n_heads
    if name.endswith(_HEADS + _ROTARY):
        return cfg.n_heads
    return None


def _label(fn) -> str:
    """The user's hook behind TL 2.x's ``full_hook`` wrapper, as a readable name."""
    for cell in getattr(fn, "__closure__", None) or ():
        inner = cell.cell_contents
        if callable(inner) and not isinstance(inner, torch.nn.Module):
            if isinstance(inner, functools.partial):
                return f"partial({getattr(inner.func, '__qualname__', inner.func)!s})"
            return getattr(inner, "__qualname__", None) or repr(inner)
    return getattr(fn, "__name__", "hook")


def check_compatible(model, info: RemoteModelInfo) -> None:
    """A local legacy model must have the server model's shapes, or its hooks mean nothing."""
    want = info.__dict__.get("_legacy_cfg")
    if want is None:  # once per server model: building an HF config is not free
        want = info.__dict__["_legacy_cfg"] = legacy_config_kwargs(info.architecture,
                                                                    info.config)
    cfg = model.cfg
    keys = ["n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab",
            "positional_embedding_type"]
    if getattr(cfg, "original_architecture", None):  # unset on hand-built configs
        keys.append("original_architecture")
    for key in keys:
        if getattr(cfg, key, None) != want[key]:
            raise HookwireError(
                f"the local model's {key}={getattr(cfg, key, None)} but the server's "
                f"{info.name!r} has {key}={want[key]}: remote hooks need the same architecture")


class LegacyDialect(Dialect):
    """TL 2.x names and layouts for :func:`hookwire.transformerlens.hook_tracer.trace_hook_points`:
    each legacy hook point's hooks run on proxies of the site TL 4 maps its name to, at the
    site's first call, in the legacy layout (see the module docstring). A forward with
    ``stop_at_layer=k`` returns the residual without entering block k: it stops *before*
    that site's hooks."""
    stops_before_hooks = True
    legacy = True

    def check_model(self, info: RemoteModelInfo) -> None:
        check_compatible(self.model, info)

    def plan(self, info: RemoteModelInfo, batch: int, seq: int) -> None:
        by_site: dict[str, list] = {}
        unmapped = []
        for name, hp in self.model.hook_dict.items():
            if hp._backward_pre_hooks:
                raise HookwireError(f"backward pre-hooks on {name!r} cannot run remotely")
            if not (hp._forward_hooks or hp._backward_hooks):
                continue
            site = site_for(info, name)
            if site is None:
                if _fires_locally(self.model, name):  # e.g. run_with_cache() hooks every point
                    unmapped.append(name)
            else:
                by_site.setdefault(site, []).append((name, hp))
        if unmapped:
            raise HookwireError(
                f"hooks on {unmapped[:5]} cannot run remotely: the server's model "
                f"{info.name!r} has no hook point that fires for these names (TL 4 does not "
                "compute hook_result / split q,k,v inputs / hook_attn_in / hook_mlp_in on it)")
        self.by_site = by_site

    def points(self, site) -> list[tuple[str, object]]:
        return self.by_site.get(site.name, []) if site.call == 0 else []

    def stop_site(self, info: RemoteModelInfo, stop_at_layer) -> str | None:
        """A legacy forward with ``stop_at_layer`` runs ``blocks[:k]`` (Python slice
        semantics) and returns the residual, i.e. the input of block k (or of ln_final)."""
        if stop_at_layer is None:
            return None
        n = self.model.cfg.n_layers
        k = len(range(n)[:stop_at_layer])
        name = f"blocks.{k}.hook_in" if k < n else "ln_final.hook_in"
        return served_stop_site(info, name, stop_at_layer)

    def to_view(self, name: str, x):
        return _to_legacy(name, x, self.model.cfg.d_head)

    def check_view(self, name: str, view) -> None:
        heads = _expected_heads(self.model, name)
        if heads is not None and (view.dim() != 4 or view.shape[2] != heads):
            raise HookwireError(
                f"{name!r}: the server's activation has shape {tuple(view.shape)} but this "
                f"legacy model expects {heads} heads there (ungroup_grouped_query_attention?)")

    def from_view(self, name: str, out, x):
        return _from_legacy(name, out, tuple(x.shape))

    def label(self, hp, key, fn) -> str:
        return _label(fn)


# ---- the server model's shape as a HookedTransformerConfig -----------------------------------

def legacy_config_kwargs(architecture: str, config: dict) -> dict:
    """HookedTransformerConfig arguments for a server model (allow-listed families only)."""
    family = family_for_architecture(architecture)
    c = config_from_dict(family, config)
    if architecture == "GPT2LMHeadModel":
        return dict(n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head,
                    d_head=c.n_embd // c.n_head, d_mlp=c.n_inner or 4 * c.n_embd,
                    d_vocab=c.vocab_size, n_ctx=c.n_positions,
                    act_fn=c.activation_function, eps=c.layer_norm_epsilon,
                    normalization_type="LN", positional_embedding_type="standard",
                    original_architecture=architecture)
    if architecture == "LlamaForCausalLM":
        d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n_kv = c.num_key_value_heads or c.num_attention_heads
        return dict(n_layers=c.num_hidden_layers, d_model=c.hidden_size,
                    n_heads=c.num_attention_heads, d_head=d_head, d_mlp=c.intermediate_size,
                    d_vocab=c.vocab_size, n_ctx=c.max_position_embeddings, eps=c.rms_norm_eps,
                    act_fn=c.hidden_act, normalization_type="RMS", final_rms=True,
                    positional_embedding_type="rotary", rotary_dim=d_head,
                    rotary_base=int(_rope_theta(config, c)),
                    rotary_adjacent_pairs=False, gated_mlp=True,
                    n_key_value_heads=n_kv if n_kv != c.num_attention_heads else None,
                    original_architecture=architecture)
    raise HookwireError(f"no legacy HookedTransformer layout for {architecture!r}")


def _rope_theta(config: dict, c) -> float:
    """transformers 5 keeps rope_theta in ``rope_parameters``; 4.x on the config itself."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        return params["rope_theta"]
    return config.get("rope_theta", getattr(c, "rope_theta", 10000))


__all__ = ["is_legacy", "site_for", "LegacyDialect", "legacy_config_kwargs",
           "check_compatible"]
