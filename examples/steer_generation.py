"""Steering generation with an added vector, by HF module path: remote == local.

Starts a hookwire server in this process (127.0.0.1, ephemeral port). For each model family:
1. a steering vector = mean block output on a "positive" prompt minus that on a "negative"
   one, read with ``run_with_cache`` (remotely; the local run gives the same vector);
2. ``generate`` with a forward hook adding the vector to that block's output at every step
   (``intervene_on="all"``), greedy and with seeded sampling, tokens printed as they arrive;
3. the same calls on a local HF model with the server's weights (``hhf.LocalModel``): the
   tokens and the per-step values saved must be identical.

    .venv/bin/python examples/steer_generation.py
"""
from __future__ import annotations

import torch

import hookwire.hf as hhf
from _pairs import remote_and_local, served_hf_model

BLOCKS = {"tiny-gpt2": "transformer.h.1", "tiny-llama": "model.layers.1"}
POSITIVE = torch.tensor([[10, 20, 30, 40, 50, 60]])
NEGATIVE = torch.tensor([[200, 210, 220, 230, 240, 250]])
PROMPT = torch.tensor([[72, 101, 108, 108, 111, 32, 119]])   # "Hello w" in bytes


def steering_vector(model, block: str) -> torch.Tensor:
    _, pos = model.run_with_cache(POSITIVE, modules=[block])
    _, neg = model.run_with_cache(NEGATIVE, modules=[block])
    return pos[block].mean(dim=(0, 1)) - neg[block].mean(dim=(0, 1))


def steered(model, block: str, vector, **kw):
    def add_vector(module, args, output):      # a plain torch forward hook
        return output + 4.0 * vector
    return model.generate(PROMPT, 8, {block: add_vector}, intervene_on="all",
                          modules=[block], **kw)


def main() -> None:
    with remote_and_local(list(BLOCKS)) as pairs:
        for name, _, _ in pairs:
            block = BLOCKS[name]
            remote, local = hhf.RemoteModel(name), hhf.LocalModel(served_hf_model(name))
            vector = steering_vector(remote, block)
            torch.testing.assert_close(vector, steering_vector(local, block),
                                       rtol=1e-5, atol=1e-6)
            for sampling in (dict(do_sample=False), dict(do_sample=True, seed=7, top_k=40)):
                print(f"{name} {sampling}: tokens as they arrive:", end="", flush=True)
                got = steered(remote, block, vector,
                              on_token=lambda step, t: print(f" {t.tolist()}", end="",
                                                             flush=True), **sampling)
                print()
                want = steered(local, block, vector, **sampling)
                assert torch.equal(got.sequences, want.sequences), (got.sequences,
                                                                    want.sequences)
                for a, b in zip(got.cache[block], want.cache[block]):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
                plain = remote.generate(PROMPT, 8, **sampling)
                changed = (plain.sequences != got.sequences).sum().item()
                print(f"  remote == local: {got.sequences[0, -8:].tolist()} "
                      f"({changed} of 8 tokens differ from unsteered)")


if __name__ == "__main__":
    main()
