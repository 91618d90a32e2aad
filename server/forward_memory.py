"""What the model's own forward holds at its peak, estimated from its shapes before it runs.

A graph's values are bounded node by node (``hookwire.validate``), and the forward's output
by ``Limits.max_output_bytes``; the forward's *activations* were bounded by nothing: batch
and sequence length only through the logits, so a model with a small vocabulary (the
built-in tiny ones: 257 tokens) admitted 1024 rows of 256 positions -- 269 MB of logits, and
attention scores of 1 GiB a copy. Attention is what grows fastest: every layer makes
``batch x heads x seq x seq`` scores, and the served forward materialises them (TL's bridge
rebuilds the pattern for its hook points; HF's eager attention does too). Measured peak
resident growth of one forward over its logits (the built-in tiny-gpt2 and tiny-llama through
TL's bridge, 16-512 rows of 16-256 positions): up to 3.3x one layer's scores where attention
dominates, up to 4.1x the widest activation (batch x seq x MLP width) where it does not --
so the estimate is three copies of the scores, five of the widest activation, and the
output; tests/test_isolation.py checks it bounds the measured peak, within 3x.
"""
from __future__ import annotations

ATTENTION_COPIES = 3  # scores, masked and scaled scores, pattern: alive together in a layer
# the MLP's hidden activation before and after its nonlinearity, and the residual stream's
# copies at hook points (narrower, but several)
WIDTH_COPIES = 5


def _first(config, *names, default=0) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def attention_heads_and_width(config) -> tuple[int, int]:
    """(attention heads, widest activation) of a TL config (``n_heads``, ``d_model``,
    ``d_mlp``) or an HF one, under the names the families use; the width is the MLP's hidden
    size where the config names one, else 4x the model's (GPT-2's ``n_inner`` is None: 4x).
    A composite config's text model counts."""
    config = getattr(config, "text_config", None) or config
    heads = _first(config, "n_heads", "num_attention_heads", "n_head", "num_heads",
                   "encoder_attention_heads", default=1)
    hidden = _first(config, "d_model", "hidden_size", "n_embd", "dim", default=1)
    mlp = _first(config, "d_mlp", "intermediate_size", "n_inner", "ffn_dim", "d_ff",
                 "ffn_hidden_size", "hidden_dim", default=4 * hidden)
    return heads, max(hidden, mlp)


def model_config(hosted):
    """The config the estimate reads: the TL bridge's where the model has one (every served
    model has; its original module may be no HF model), else the HF model's."""
    return hosted.bridge.cfg if hosted.bridge is not None else hosted.original.config


def forward_activation_bytes(config, batch: int, seq: int, itemsize: int) -> int:
    """Estimated peak bytes of one forward's activations over ``batch x seq`` tokens (the
    weights and the output not included)."""
    heads, width = attention_heads_and_width(config)
    return (ATTENTION_COPIES * batch * heads * seq * seq +
            WIDTH_COPIES * batch * seq * width) * itemsize


__all__ = ["forward_activation_bytes", "attention_heads_and_width", "model_config",
           "ATTENTION_COPIES", "WIDTH_COPIES"]
