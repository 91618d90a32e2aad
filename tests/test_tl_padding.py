"""Padded batches: a batch of texts padded on the left (TL builds the attention mask and
derives the positions itself) and an explicit ``attention_mask=`` run remotely as locally."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

MODELS = ("tiny-gpt2", "tiny-llama")
TEXTS = ["a much longer prompt here", "short"]


def _store(cache):
    def hook(act, hook):
        cache[hook.name] = act.detach().clone()
    return hook


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_of_texts_padded_like_tl(local_models, remote_models, name, side):
    local, remote = local_models[name], remote_models[name]
    names = lambda n: n.endswith(("hook_resid_post", "hook_pattern"))  # noqa: E731
    got, want = {}, {}
    out = remote.run_with_hooks(TEXTS, padding_side=side, fwd_hooks=[(names, _store(got))])
    expected = local.run_with_hooks(TEXTS, padding_side=side, fwd_hooks=[(names, _store(want))])
    assert_close(out, expected)
    assert sorted(got) == sorted(want)
    for key in want:
        assert_close(got[key], want[key])
    if side == "left":  # the mask mattered: without it the short row would differ
        unmasked = local(local.to_tokens(TEXTS, padding_side="left"))
        assert not torch.allclose(unmasked[1, -1], expected[1, -1])


@pytest.mark.parametrize("name", MODELS)
def test_explicit_attention_mask(local_models, remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(TEXTS, padding_side="left")
    mask = (tokens != local.tokenizer.pad_token_id).long()
    mask[:, 0] = 1  # the BOS
    got = remote(tokens, attention_mask=mask)
    want = local(tokens, attention_mask=mask)
    assert_close(got, want)
    assert_close(local.run_with_hooks(tokens, attention_mask=mask, remote=True,
                                      fwd_hooks=[("blocks.0.hook_resid_post",
                                                  lambda act, hook: act * 2)]),
                 local.run_with_hooks(tokens, attention_mask=mask,
                                      fwd_hooks=[("blocks.0.hook_resid_post",
                                                  lambda act, hook: act * 2)]))
