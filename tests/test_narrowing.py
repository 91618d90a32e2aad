"""A narrowing write narrows everything the forward carries per row (server/narrowing.py).

For real HF models of several families and every attention implementation that runs on a
CPU, a forward over 2k rows whose layer-``L`` output is narrowed to its first k rows (as the
server's narrowing write does, with the same hook order) must give exactly the logits of the
forward over those k rows alone -- with left- or right-padded rows too. Without the narrowing
of the caller's arguments, eager attention fails ("size of tensor a (k) must match (2k)"),
Gemma 2 fails on its sliding-window and full masks, and SDPA with padding fails on its mask.
The end-to-end path (pyvene on a server hosting an eager GPT-2 or Llama) is in
tests/test_pyvene_upstream_spellings.py.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close
from transformers import (Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from hookwire.module_sites import attach, module_site
from hookwire.server.narrowing import narrowed_arguments

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=50, max_position_embeddings=64)

FAMILIES = {
    "gpt2": (lambda: GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=50,
                                                n_positions=64)), "transformer.h"),
    "llama": (lambda: LlamaForCausalLM(LlamaConfig(**SMALL)), "model.layers"),
    "mistral": (lambda: MistralForCausalLM(MistralConfig(**SMALL, sliding_window=3)),
                "model.layers"),
    "qwen2": (lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL)), "model.layers"),
    # Alternating sliding-window (4) and full layers: two masks, made before the loop.
    "gemma2": (lambda: Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8, sliding_window=4)),
               "model.layers"),
}


def build(family: str, attn: str):
    make, layers = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    model.set_attn_implementation(attn)
    return model, layers


def narrowed_logits(model, site: str, rows: int, ids, mask):
    """The forward over all rows, the site's value narrowed to ``rows`` rows by a hook attached
    first (as the graph's site hook is), then the server's argument narrowing."""
    def narrow(module, args, value):
        return value[:rows]

    handle = attach(model.get_submodule(site.split(":")[1]), site, narrow)
    try:
        with torch.no_grad(), narrowed_arguments(model, (site, 0), ids.shape[0]):
            return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


# Every implementation each family offers on a CPU (Gemma 2 has no SDPA in transformers 5).
CASES = [(f, a) for f in sorted(FAMILIES) for a in ("eager", "sdpa")
         if a == "eager" or f != "gemma2"]


@pytest.mark.parametrize("family,attn", CASES)
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_narrowed_forward_equals_the_kept_rows_alone(family, attn, padding):
    model, layers = build(family, attn)
    k, seq = 2, 8
    ids = torch.randint(0, 50, (2 * k, seq), generator=torch.Generator().manual_seed(1))
    mask = None
    if padding is not None:
        mask = torch.ones_like(ids)
        pad = torch.arange(seq) >= seq - 3 if padding == "right" else torch.arange(seq) < 3
        mask[1, pad] = 0      # a kept row that is padded
        mask[2 * k - 1, pad] = 0  # and a dropped one
    for layer in (0, 1):      # narrowed before the last layer (the case that crashed)
        site = module_site(f"{layers}.{layer}", "output")
        got = narrowed_logits(model, site, k, ids, mask)
        with torch.no_grad():
            alone = model(input_ids=ids[:k],
                          attention_mask=None if mask is None else mask[:k]).logits
        assert got.shape == alone.shape
        if mask is None:
            assert_close(got, alone, rtol=1e-5, atol=1e-5)
        else:  # padded positions' logits are arbitrary; the real ones must agree
            keep = mask[:k].bool()
            assert_close(got[keep], alone[keep], rtol=1e-5, atol=1e-5)


def test_narrowing_an_input_site_narrows_that_call_s_other_arguments():
    """Narrowing a layer's *input* (a pre-hook): the same call's mask is narrowed too."""
    model, layers = build("llama", "eager")
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    got = narrowed_logits(model, module_site(f"{layers}.1", "input"), 2, ids, None)
    with torch.no_grad():
        assert_close(got, model(input_ids=ids[:2]).logits, rtol=1e-5, atol=1e-5)


def test_without_the_argument_narrowing_eager_attention_fails():
    """The failure this module fixes (pyvene's eager GPT-2, batch >= 2, with a source)."""
    model, layers = build("gpt2", "eager")
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(3))
    site = module_site(f"{layers}.0", "output")
    handle = attach(model.get_submodule(f"{layers}.0"), site, lambda m, a, v: v[:2])
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="must match the size"):
            model(input_ids=ids)
    finally:
        handle.remove()


def test_no_narrowing_site_changes_nothing():
    model, _ = build("gpt2", "eager")
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with narrowed_arguments(model, None, 2):
            again = model(input_ids=ids).logits
    assert torch.equal(plain, again)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_flex_attention_block_masks_are_narrowed_by_batch():
    """flex attention's BlockMask (flex attention itself does not run on this CPU build)."""
    from torch.nn.attention.flex_attention import create_block_mask

    from hookwire.server.narrowing import _State

    keep = torch.ones(4, 8, dtype=torch.bool)
    keep[1, -3:] = False
    block = create_block_mask(lambda b, h, q, kv: (q >= kv) & keep[b, kv], 4, None, 8, 8,
                              device="cpu", BLOCK_SIZE=4)
    state = _State(full_batch=4)
    state.rows = 2
    narrowed = state.narrow(block)
    assert narrowed.shape == (2, 1, 8, 8)
    assert torch.equal(narrowed.to_dense(), block.to_dense()[:2])
    assert state.narrow((block, torch.zeros(4, 3), torch.zeros(4)))[1].shape == (2, 3)
