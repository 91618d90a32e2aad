"""Zero-ablate every attention head in turn (via ``hook_z``) and record the change in loss,
remotely and locally; the two sweeps must agree. Run it with::

    .venv/bin/python examples/head_ablation_sweep.py
"""
from __future__ import annotations

import functools

import torch

import hookwire.transformerlens  # noqa: F401  (adds remote= to run_with_hooks / run_with_cache)

from _pairs import remote_and_local  # examples/_pairs.py: server + model pairs

MODELS = ["tiny-gpt2", "tiny-llama"]
PROMPTS = ["The quick brown fox jumps over the lazy dog.",
           "Pack my box with five dozen liquor jugs!!!!"]


def ablate_head(z, hook, head):
    z[:, :, head, :] = 0.0


def sweep(model, tokens) -> torch.Tensor:
    """[layer, head] loss increase when that head's output is zeroed."""
    cfg = model.cfg
    baseline = model(tokens, return_type="loss")
    deltas = torch.zeros(cfg.n_layers, cfg.n_heads)
    for layer in range(cfg.n_layers):
        for head in range(cfg.n_heads):
            hook = (f"blocks.{layer}.attn.hook_z", functools.partial(ablate_head, head=head))
            loss = model.run_with_hooks(tokens, fwd_hooks=[hook], return_type="loss")
            deltas[layer, head] = loss - baseline
    return deltas


def main() -> None:
    with remote_and_local(MODELS) as pairs:
        for name, remote_model, local_model in pairs:
            tokens = local_model.to_tokens(PROMPTS)
            with torch.no_grad():
                local_deltas = sweep(local_model, tokens)
            remote_deltas = sweep(remote_model, tokens)
            torch.testing.assert_close(remote_deltas, local_deltas)
            assert local_deltas.abs().max() > 0, "no ablation changed the loss"
            layer, head = divmod(int(local_deltas.abs().argmax()), local_model.cfg.n_heads)
            print(f"  {name}: {local_deltas.numel()} heads ablated; largest loss change "
                  f"{remote_deltas[layer, head].item():+.5f} at L{layer}H{head}; "
                  f"remote == local")
        print("head ablation sweep: remote == local")


if __name__ == "__main__":
    main()
