"""Attention implementations a request may need: attention probabilities as a module site on
the server's plain HF tree, and eager attention for TL hook points that only fire there.

pyvene's ``attention_weight`` component (and an HF user hooking ``attn.attn_dropout``) means
"the input of the attention-dropout module": the softmaxed attention probabilities. In
transformers 5 GPT-2's attention applies dropout functionally (``eager_attention_forward``) or
not at all (SDPA), so that module never runs and such hooks never fire -- locally, with
pyvene 0.1.8, they silently do nothing.

For requests that hook them, the server's plain tree therefore uses one extra attention
implementation (and the probe that lists module sites does too), registered with
transformers under our own name: eager attention that passes the probabilities through the
module's own ``attn_dropout`` (an identity in eval mode), which makes them a real module site
with the meaning pyvene's table gives it. Models without ``attn_dropout`` modules (Llama) always
keep their attention implementation.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask

NAME = "hookwire_eager_weights"


def attention_with_weight_site(module, query, key, value, attention_mask, scaling=None,
                               dropout=0.0, **kwargs):
    dropout_module = getattr(module, "attn_dropout", None)
    if not isinstance(dropout_module, torch.nn.Module):
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        # (after a "narrow" write the mask arrives narrowed too: server.narrowing)
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = torch.nn.functional.softmax(scores, dim=-1).type(value.dtype)
    probs = dropout_module(probs)  # the site: forward (pre-)hooks see the probabilities
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return out, probs


def weight_site_modules(model) -> set[int]:
    """ids of the attention-dropout modules of ``model``: the sites that need the
    implementation above."""
    return {id(m.attn_dropout) for m in model.modules()
            if isinstance(getattr(m, "attn_dropout", None), torch.nn.Module)}


@contextlib.contextmanager
def attention_weight_sites(model, enabled: bool = True):
    """Run ``model`` (the server's own plain tree) with the implementation above for the
    duration, if it has attention-dropout modules at all. Only requests that hook them pay
    for eager attention (and its float rounding, which differs slightly from SDPA's)."""
    if not enabled or not weight_site_modules(model):
        yield
        return
    AttentionInterface.register(NAME, attention_with_weight_site)
    AttentionMaskInterface.register(NAME, eager_mask)  # an additive mask, as eager takes
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def eager_probe_model(model):
    """The HF model a TL probe retries with eager attention (None: it already runs eager, or
    it is no HF model at all, e.g. a native TL model)."""
    if getattr(model, "config", None) is None or runs_eager(model):
        return None
    return model


def runs_eager(model) -> bool:
    return getattr(model.config, "_attn_implementation", None) == "eager"


@contextlib.contextmanager
def eager_attention(model, enabled: bool = True):
    """Run ``model`` (an HF model, e.g. the one inside the TL bridge) with eager attention for
    the duration: the path TransformerLens's own loader always takes, where attention
    patterns and scores exist (under SDPA their hook points never fire)."""
    if not enabled or runs_eager(model):
        yield
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


__all__ = ["eager_probe_model", "attention_weight_sites", "weight_site_modules",
           "attention_with_weight_site", "eager_attention", "runs_eager"]
