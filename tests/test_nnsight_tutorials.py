"""Three NNsight tutorials, written the way NNsight's documentation writes them, run on a
hookwire server (``hnn.RemoteLanguageModel``, no weights on the client) and locally with nnsight
on the same weights: activation patching (IOI), attribution patching, logit lens. Their
results are equal.

What differs from the documentation: transformers 5's GPT-2 block returns a tensor (the docs
index ``.output[0]``, the tuple of older versions), the prompts suit the byte-level tokenizer
of the tiny models, and ``.item()`` -- which reads a value, so it cannot run remotely -- is
called after the trace instead of inside it.
"""
from __future__ import annotations

import nnsight
import pytest
import torch
from nnsight import LanguageModel

import hookwire
import hookwire.nnsight as hnn
import hookwire.server as hs
from hookwire.client import close_connections
from hookwire.families import build_hf_model
from hookwire.server.models import BUILTIN_MODELS, load_model

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

# Byte-level tokens: the names are 4 tokens each, the answers their first letters.
CLEAN = "When Mary and John went out, John gave it to "
CORRUPTED = "When Mary and John went out, Mary gave it to "


@pytest.fixture(scope="module")
def models():
    hosted = {name: load_model(name) for name in ("tiny-gpt2", "tiny-llama")}
    srv = hs.start(models=hosted, port=0)
    hookwire.configure(url=srv.url)
    out = {}
    for name, h in hosted.items():
        spec = BUILTIN_MODELS[name]
        weights = build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0]
        out[name] = (LanguageModel(weights, tokenizer=h.tokenizer),
                     hnn.RemoteLanguageModel(name))
    yield out
    try:
        close_connections()
    finally:
        srv.stop()
        hookwire.configure(url=None)


# ---- activation patching (NNsight tutorial "Activation Patching", IOI) ------------------------

def activation_patching(model):
    correct_index = model.tokenizer("M")["input_ids"][0]
    incorrect_index = model.tokenizer("J")["input_ids"][0]
    N_LAYERS = len(model.transformer.h)
    clean_tokens = model.tokenizer(CLEAN)["input_ids"]

    # Clean run
    with model.trace(CLEAN) as tracer:
        clean_hs = nnsight.save([model.transformer.h[layer_idx].output
                                 for layer_idx in range(N_LAYERS)])
        clean_logits = model.lm_head.output
        clean_logit_diff = (clean_logits[0, -1, correct_index]
                            - clean_logits[0, -1, incorrect_index]).save()

    ioi_patching_results = []
    with model.trace() as tracer:
        # Corrupted run
        with tracer.invoke(CORRUPTED) as invoker:
            corrupted_logits = model.lm_head.output
            corrupted_logit_diff = (corrupted_logits[0, -1, correct_index]
                                    - corrupted_logits[0, -1, incorrect_index]).save()

        # Iterate through all the layers and tokens: one patched run each, in the same batch
        for layer_idx in range(len(model.transformer.h)):
            _ioi_patching_results = []
            for token_idx in range(len(clean_tokens)):
                with tracer.invoke(CORRUPTED) as invoker:
                    # Patch the clean hidden states into the corrupted run
                    model.transformer.h[layer_idx].output[:, token_idx, :] = \
                        clean_hs[layer_idx][:, token_idx, :]
                    patched_logits = model.lm_head.output
                    patched_logit_diff = (patched_logits[0, -1, correct_index]
                                          - patched_logits[0, -1, incorrect_index])
                    # The improvement of the correct token after patching
                    patched_result = (patched_logit_diff - corrupted_logit_diff) / (
                        clean_logit_diff - corrupted_logit_diff)
                    _ioi_patching_results.append(patched_result.save())
            ioi_patching_results.append(_ioi_patching_results)

    return torch.tensor([[r.item() for r in row] for row in ioi_patching_results]), \
        clean_logit_diff, corrupted_logit_diff


def test_activation_patching(models):
    local, remote = models["tiny-gpt2"]
    expected, got = activation_patching(local), activation_patching(remote)
    torch.testing.assert_close(got, expected)
    assert got[0].shape == (2, len(CLEAN)) and torch.isfinite(got[0]).all()


# ---- attribution patching (NNsight tutorial "Attribution Patching") ---------------------------

def attribution_patching(model):
    correct_index = model.tokenizer("M")["input_ids"][0]
    incorrect_index = model.tokenizer("J")["input_ids"][0]

    def ioi_metric(logits, clean_logit_diff, corrupted_logit_diff):
        patched = logits[0, -1, correct_index] - logits[0, -1, incorrect_index]
        return (patched - corrupted_logit_diff) / (clean_logit_diff - corrupted_logit_diff)

    with model.trace(CLEAN):
        clean_logits = model.lm_head.output
        clean_logit_diff = (clean_logits[0, -1, correct_index]
                            - clean_logits[0, -1, incorrect_index]).save()
    with model.trace(CORRUPTED):
        corrupted_logits = model.lm_head.output
        corrupted_logit_diff = (corrupted_logits[0, -1, correct_index]
                                - corrupted_logits[0, -1, incorrect_index]).save()

    clean_out, corrupted_out, corrupted_grads = [], [], []
    with model.trace() as tracer:
        with tracer.invoke(CLEAN) as invoker_clean:
            for layer in model.transformer.h:
                # the heads' outputs side by side, before the output projection
                clean_out.append(layer.attn.c_proj.input.save())
        with tracer.invoke(CORRUPTED) as invoker_corrupted:
            for layer in model.transformer.h:
                corrupted_out.append(layer.attn.c_proj.input.save())
            logits = model.lm_head.output.save()
            value = ioi_metric(logits, clean_logit_diff, corrupted_logit_diff).save()
            with value.backward():
                for attn_out in reversed(corrupted_out):
                    corrupted_grads.append(attn_out.grad.save())
    corrupted_grads.reverse()

    n_heads = model.config.n_head
    patching_results = []
    for clean, corrupted, grad in zip(clean_out, corrupted_out, corrupted_grads):
        residual_attr = einsum_heads((clean - corrupted) * grad, n_heads)
        patching_results.append(residual_attr)
    return torch.stack(patching_results), value


def einsum_heads(x, n_heads):
    """[batch, pos, d_model] -> the attribution of each head, summed over positions."""
    return x.unflatten(-1, (n_heads, -1)).sum(dim=(-1, -3))


def test_attribution_patching(models):
    local, remote = models["tiny-gpt2"]
    expected, got = attribution_patching(local), attribution_patching(remote)
    torch.testing.assert_close(got, expected)
    assert got[0].shape == (2, 1, 4) and got[0].abs().sum() > 0


# ---- logit lens (NNsight tutorial "Logit Lens") -----------------------------------------------

def logit_lens(model, prompt="The Eiffel Tower is in the city of"):
    layers = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
    probs_layers = []
    with model.trace() as tracer:
        with tracer.invoke(prompt) as invoker:
            for layer_idx, layer in enumerate(layers):
                # Process layer output through the model's head and layer normalization
                layer_output = model.lm_head(norm(layer.output))
                # Apply softmax to obtain probabilities and save the result
                probs = torch.nn.functional.softmax(layer_output, dim=-1).save()
                probs_layers.append(probs)
    probs = torch.cat(probs_layers)
    # Find the maximum probability and corresponding tokens for each position
    max_probs, tokens = probs.max(dim=-1)
    words = [[model.tokenizer.decode(t.cpu()) for t in layer_tokens]
             for layer_tokens in tokens]
    return probs, max_probs, tokens, words


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_logit_lens(models, name):
    """Calls the model's own ln_f and lm_head inside the block: remotely, with the server's
    weights (the client has none)."""
    local, remote = models[name]
    expected, got = logit_lens(local), logit_lens(remote)
    torch.testing.assert_close(got[:3], expected[:3])
    assert got[3] == expected[3]
