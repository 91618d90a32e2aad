"""Zero-ablate every attention head in turn (via ``hook_z``) and record the change in loss,
remotely and locally; the two sweeps must agree. Run it with::

    .venv/bin/python examples/head_ablation_sweep.py
"""
from __future__ import annotations

import functools

import torch

import hookwire
import hookwire.server as hs
import hookwire.transformerlens as htl  # makes run_with_hooks(..., remote=True) work
from hookwire.client import close_connections
from hookwire.server.models import load_model

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
    srv = hs.start(models=MODELS, port=0)
    try:
        print(f"server at {srv.url}")
        hookwire.configure(url=srv.url)
        for name in MODELS:
            remote_model = htl.RemoteModel(name)  # no weights: meta device stand-in
            local_model = load_model(name).bridge  # same config and seed: same weights
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
    finally:
        close_connections()
        srv.stop()


if __name__ == "__main__":
    main()
