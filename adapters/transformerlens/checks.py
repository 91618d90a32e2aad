"""What is checked about a model and its input before a remote call is traced: that the model
is one the server's can stand for, which of TL's hook switches it has on, and the residual
input of ``start_at_layer``."""
from __future__ import annotations

import re

import torch

from hookwire.errors import HookwireError
from hookwire.ir import TL_HOOK_FLAGS

# What must agree between a local TL 4 bridge and the server's for hooks to mean the same.
_SHAPE_KEYS = ("n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def check_remote_capable(model) -> None:
    """A remote call runs the *server's* model in place of this one: only a TL model (a
    bridge, or a TL 2.x ``HookedTransformer``) can be stood for; a hand-made
    ``HookedRootModule`` cannot."""
    cfg = getattr(model, "cfg", None)
    if cfg is None or getattr(cfg, "n_layers", None) is None:
        raise HookwireError(
            f"remote=True runs a model hosted on the server in place of this "
            f"{type(model).__name__}, which is not a TransformerLens model (no cfg with "
            "n_layers): run it locally, or use a TransformerBridge (or "
            "hookwire.transformerlens.RemoteModel(name)) of the server's model")


def hook_flags(model) -> frozenset:
    """TL's ``set_use_*`` switches this model has on (they decide which hook points fire)."""
    cfg = model.cfg
    return frozenset(f for f in TL_HOOK_FLAGS if bool(getattr(cfg, f, False)))


def check_bridge_compatible(model, info) -> None:
    """A local TL 4 bridge must be the server model's architecture with its shapes, or its
    hooks would run on a different model (as the TL 2.x client checks, legacy.py)."""
    if getattr(model, "_hookwire_remote", None) is not None or not info.tl_config:
        return  # a stand-in is built from this very description
    want, cfg = info.tl_config, model.cfg
    local_arch = getattr(cfg, "architecture", None)
    if local_arch and want.get("architecture") and local_arch != want["architecture"]:
        raise HookwireError(
            f"the local model is a {local_arch} but the server's {info.name!r} is a "
            f"{want['architecture']}: remote hooks need the same architecture (pass the "
            "right remote_model=, or use hookwire.transformerlens.RemoteModel(name))")
    for key in _SHAPE_KEYS:
        mine, theirs = getattr(cfg, key, None), want.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise HookwireError(
                f"the local model's {key}={mine} but the server's {info.name!r} has "
                f"{key}={theirs}: remote hooks need the same architecture")


def start_input(model, info, input, start_at_layer: int) -> tuple[int, torch.Tensor]:
    """``(k, residual)`` for a forward that starts at block k: the residual-stream tensor
    ``[batch, pos, d_model]`` entering it, as TL's ``forward(start_at_layer=k)`` takes it."""
    n_layers = model.cfg.n_layers
    k = start_at_layer + n_layers if start_at_layer < 0 else start_at_layer
    if not 0 <= k < n_layers:
        raise ValueError(f"start_at_layer={start_at_layer} out of range [0, {n_layers}).")
    if not (isinstance(input, torch.Tensor) and input.is_floating_point()):
        raise ValueError("start_at_layer requires a residual-stream tensor [batch, pos, "
                         f"d_model]; got {type(input).__name__}. Capture it from a prior "
                         "run_with_cache (e.g. cache['blocks.k.hook_in']).")
    residual = input if input.dim() == 3 else input.unsqueeze(0)
    site = info.sites[info.site_index[(f"blocks.{k}.hook_in", 0)]] \
        if (f"blocks.{k}.hook_in", 0) in info.site_index else None
    d_model = model.cfg.d_model
    if residual.dim() != 3 or residual.shape[-1] != d_model:
        raise ValueError(f"start_at_layer needs a residual of shape [batch, pos, {d_model}], "
                         f"got {tuple(input.shape)}")
    if site is not None and residual.dtype != site.dtype:
        raise HookwireError(f"the residual is {residual.dtype}; the server's model runs in "
                            f"{site.dtype}: cast it with .to({site.dtype})")
    return k, residual.detach().to("cpu").contiguous()


def implicit_attention_mask(model, texts: list, tokens, padding_side):
    """The mask TL's forward builds itself for a batch of texts padded on the left (right
    padding is harmless to a causal model, and TL leaves it unmasked): None otherwise."""
    tokenizer = getattr(model, "tokenizer", None)
    if len(texts) < 2 or tokenizer is None or tokenizer.pad_token_id is None:
        return None
    side = padding_side or getattr(tokenizer, "padding_side", "right")
    if side != "left":
        return None
    try:  # TL 4 (transformer_lens.utils is gone there), then TL 2.x
        from transformer_lens.utilities import get_attention_mask
    except ImportError:
        from transformer_lens.utils import get_attention_mask
    return get_attention_mask(tokenizer, tokens,
                              prepend_bos=getattr(model.cfg, "default_prepend_bos", True),
                              padding_side="left")


def implicit_position_ids(model, mask):
    """The positions TL's forward derives with the mask it builds for left-padded texts (pad
    slots at position 1), where the model takes derived positions."""
    accepts = getattr(model, "_accepts_derived_position_ids", None)
    if accepts is None or not accepts():
        return None
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill(mask == 0, 1)


def position_ids_input(position_ids, tokens, n_ctx):
    """A caller's (or TL's) position ids as the server takes them: int64, shaped like the
    token ids, each within the model's positions."""
    if not isinstance(position_ids, torch.Tensor) or position_ids.is_floating_point():
        raise HookwireError("position_ids must be an integer tensor")
    pos = position_ids.detach().to("cpu", torch.int64)
    if pos.dim() == 1:
        pos = pos.unsqueeze(0).expand(tokens.shape[0], -1)
    if tuple(pos.shape) != tuple(tokens.shape) or bool((pos < 0).any()) or \
            (n_ctx and bool((pos >= n_ctx).any())):
        raise HookwireError(f"position_ids must be in [0, {n_ctx}) with the tokens' shape "
                            f"{tuple(tokens.shape)}, got {tuple(position_ids.shape)}")
    return pos.contiguous()


def padding_mask(attention_mask, tokens):
    """A caller's (or TL's) attention mask as the server takes it: 0/1 int64, shaped like
    the token ids."""
    if not isinstance(attention_mask, torch.Tensor):
        raise HookwireError("attention_mask must be a tensor")
    mask = attention_mask.detach().to("cpu")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != tuple(tokens.shape) or not bool(((mask == 0) | (mask == 1)).all()):
        raise HookwireError(f"attention_mask must be 0/1 with the tokens' shape "
                            f"{tuple(tokens.shape)}, got {tuple(attention_mask.shape)}")
    return mask.to(torch.int64)


def start_skip(model, start: int | None, legacy: bool):
    """Sites that do not fire when the forward starts at block ``start``: the token
    embedding (the residual is fed in its place); for a TL 2.x model also everything before
    block ``start`` (its forward skips those blocks; a TL 4 bridge runs them and discards
    their output, firing their hooks, so they are traced as usual)."""
    if start is None:
        return None

    def skip(name: str) -> bool:
        if name in ("hook_embed", "hook_tokens") or name.startswith("embed."):
            return True
        if legacy:
            if name.startswith(("pos_embed.", "hook_pos_embed")):
                return True
            m = _BLOCK.match(name)
            return m is not None and int(m.group(1)) < start
        return False
    return skip


__all__ = ["check_remote_capable", "hook_flags", "check_bridge_compatible", "start_input",
           "start_skip", "implicit_attention_mask", "padding_mask", "implicit_position_ids",
           "position_ids_input"]
