"""Logit lens from a remote activation cache, compared with the same from a local cache.

``run_with_cache`` runs on the server (only the residual stream after each block and the
final norm's scale are computed, kept and sent back); the logit lens itself is computed here,
on the client, with the *local* model's final norm and unembedding applied to the cached
activations -- exactly what a TL notebook does with a local cache. The same lens computed from
a cache made by local TL on the same weights must agree. Run it with::

    .venv/bin/python examples/cache_logit_lens.py
"""
from __future__ import annotations

import torch
from transformer_lens import ActivationCache

import hookwire.transformerlens  # noqa: F401  (adds remote= to run_with_hooks / run_with_cache)

from _pairs import remote_and_local  # examples/_pairs.py: server + model pairs

MODELS = ["tiny-gpt2", "tiny-llama"]
PROMPT = "The quick brown fox jumps over the lazy dog."


def wanted(name: str) -> bool:
    return name.endswith("hook_resid_post")


@torch.no_grad()
def logit_lens(cache, local_model) -> torch.Tensor:
    """[layer, pos, d_vocab] log-probs: each block's residual output decoded as if final."""
    n_layers = local_model.cfg.n_layers
    resid = torch.stack([cache[f"blocks.{layer}.hook_resid_post"][0]
                         for layer in range(n_layers)])  # [layer, pos, d_model]
    normed = local_model.ln_final(resid)
    logits = normed @ local_model.W_U + local_model.b_U
    return logits.log_softmax(dim=-1)


def run(name: str, remote_model, local_model) -> None:
    tokens = local_model.to_tokens(PROMPT)
    logits_r, cache_r = remote_model.run_with_cache(tokens, names_filter=wanted)
    logits_l, cache_l = local_model.run_with_cache(tokens, names_filter=wanted)

    assert isinstance(cache_r, ActivationCache), type(cache_r)
    assert list(cache_r.keys()) == list(cache_l.keys()), (list(cache_r), list(cache_l))
    torch.testing.assert_close(logits_r, logits_l)
    for key in cache_l.keys():
        assert type(cache_r[key]) is torch.Tensor
        torch.testing.assert_close(cache_r[key], cache_l[key])

    lens_r = logit_lens(cache_r, local_model)
    lens_l = logit_lens(cache_l, local_model)
    torch.testing.assert_close(lens_r, lens_l)
    # The last layer's lens is the model's own output distribution.
    torch.testing.assert_close(lens_r[-1], logits_r[0].log_softmax(-1), rtol=1e-4, atol=1e-5)

    # Where does the next-token prediction settle? (layer at which the top-1 matches the end)
    top = lens_r.argmax(dim=-1)  # [layer, pos]
    agree = (top == top[-1]).float().mean(dim=-1)
    print(f"  {name}: cached {len(cache_r)} activations, lens {tuple(lens_r.shape)}; "
          f"top-1 agreement with the final layer by layer: "
          f"{[round(a, 2) for a in agree.tolist()]}")


def main() -> None:
    with remote_and_local(MODELS) as pairs:
        for name, remote_model, local_model in pairs:
            run(name, remote_model, local_model)
        print("logit lens from the remote cache: remote == local")


if __name__ == "__main__":
    main()
