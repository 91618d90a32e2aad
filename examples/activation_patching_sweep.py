"""Residual-stream activation patching: for every (layer, position), patch the clean run's
``resid_pre`` into the corrupted run and measure the logit difference at the last position.

The clean cache comes from ``run_with_cache`` (remotely for the remote sweep, locally for the
local one); each patch is a ``functools.partial`` reading that cache, the way TL notebooks
write it. The remote sweep must equal the local one. Run it with::

    .venv/bin/python examples/activation_patching_sweep.py
"""
from __future__ import annotations

import functools

import torch

import hookwire.transformerlens  # noqa: F401  (adds remote= to run_with_hooks / run_with_cache)

from _pairs import remote_and_local  # examples/_pairs.py: server + model pairs

MODELS = ["tiny-gpt2", "tiny-llama"]
# The tiny models use a byte-level tokenizer: the prompts differ in exactly one token, and the
# answers are single characters.
CLEAN = "When Mary and John went to the store, John gave a drink to "
CORRUPT = "When Mary and John went to the store, Joan gave a drink to "
ANSWER, WRONG = "M", "J"


def is_resid_pre(name: str) -> bool:
    return name.endswith("hook_resid_pre")


def patch_resid_pre(resid, hook, pos, clean_resid):
    resid[:, pos, :] = clean_resid[:, pos, :]


def sweep(model, clean, corrupt, answer: int, wrong: int):
    def logit_diff(logits) -> torch.Tensor:
        return logits[:, -1, answer] - logits[:, -1, wrong]

    _, clean_cache = model.run_with_cache(clean, names_filter=is_resid_pre)
    clean_diff = logit_diff(model(clean))
    corrupt_diff = logit_diff(model(corrupt))
    n_layers, n_pos = model.cfg.n_layers, clean.shape[1]
    results = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        clean_resid = clean_cache[f"blocks.{layer}.hook_resid_pre"]
        for pos in range(n_pos):
            hook = functools.partial(patch_resid_pre, pos=pos, clean_resid=clean_resid)
            logits = model.run_with_hooks(
                corrupt, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)])
            results[layer, pos] = logit_diff(logits)[0]
    return results, clean_diff[0], corrupt_diff[0]


def main() -> None:
    with remote_and_local(MODELS) as pairs:
        for name, remote_model, local_model in pairs:
            clean, corrupt = local_model.to_tokens(CLEAN), local_model.to_tokens(CORRUPT)
            assert clean.shape == corrupt.shape
            answer = local_model.to_tokens(ANSWER, prepend_bos=False)
            wrong = local_model.to_tokens(WRONG, prepend_bos=False)
            assert answer.shape == wrong.shape == (1, 1)
            answer, wrong = int(answer[0, 0]), int(wrong[0, 0])
            with torch.no_grad():
                local = sweep(local_model, clean, corrupt, answer, wrong)
            remote = sweep(remote_model, clean, corrupt, answer, wrong)
            for got, want in zip(remote, local):
                torch.testing.assert_close(got, want)
            results, clean_diff, corrupt_diff = remote
            # The prompts differ at one position: patching the residual stream entering block 0
            # there turns the corrupted run into the clean one.
            differing = (clean != corrupt).nonzero()
            assert len(differing) == 1
            diff_pos = int(differing[0, 1])
            torch.testing.assert_close(results[0, diff_pos], clean_diff, rtol=1e-4, atol=1e-4)
            print(f"  {name}: {results.numel()} patched runs; logit diff clean "
                  f"{clean_diff.item():+.4f}, corrupt {corrupt_diff.item():+.4f}, patching "
                  f"L0 pos {diff_pos} -> {results[0, diff_pos].item():+.4f}; remote == local")
        print("activation patching sweep: remote == local")


if __name__ == "__main__":
    main()
