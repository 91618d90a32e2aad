"""TransformerLens hooks, run remotely, compared with the same hooks run locally.

Self-contained: starts a hookwire server in this process (a real websocket server on
127.0.0.1, in a background thread), runs a few common hook patterns through it, runs the
same hooks on a local copy of the model (same config, same seed, same weights), and asserts
the results match. Run it with::

    .venv/bin/python examples/tl_quickstart.py
"""
from __future__ import annotations

import functools

import torch

import hookwire.transformerlens  # noqa: F401  (adds remote= to run_with_hooks / run_with_cache)

from _pairs import remote_and_local  # examples/_pairs.py: server + model pairs

MODELS = ["tiny-gpt2", "tiny-llama"]
PROMPT = "The quick brown fox jumps over the lazy dog."


def compare(label, remote, local):
    torch.testing.assert_close(remote, local, rtol=1e-5, atol=1e-6)
    print(f"  ok  {label}")


def patterns(name: str, remote_model, local_model) -> None:
    tokens = remote_model.to_tokens(PROMPT)
    n_layers = remote_model.cfg.n_layers

    # 1. head ablation in place, no return value
    def ablate_head_1(z, hook):
        z[:, :, 1, :] = 0.0

    hooks = [("blocks.0.attn.hook_z", ablate_head_1)]
    compare("head ablation in place on hook_z",
            remote_model.run_with_hooks(tokens, fwd_hooks=hooks),
            local_model.run_with_hooks(tokens, fwd_hooks=hooks))

    # 2. a hook returning a new tensor replaces the activation
    def halve(act, hook):
        return act * 0.5

    hooks = [("blocks.1.hook_resid_pre", halve)]
    compare("hook returning a new tensor",
            remote_model.run_with_hooks(tokens, fwd_hooks=hooks),
            local_model.run_with_hooks(tokens, fwd_hooks=hooks))

    # 3. storing into an outer dict and list, with a callable names filter
    def make_store():
        cache, means = {}, []

        def store(act, hook):
            cache[hook.name] = act.detach()
            means.append(act.mean(dim=-1))
        return store, cache, means

    is_resid_post = lambda hook_name: hook_name.endswith("hook_resid_post")  # noqa: E731
    store_r, cache_r, means_r = make_store()
    store_l, cache_l, means_l = make_store()
    logits_r = remote_model.run_with_hooks(tokens, fwd_hooks=[(is_resid_post, store_r)])
    logits_l = local_model.run_with_hooks(tokens, fwd_hooks=[(is_resid_post, store_l)])
    compare("logits with caching hooks", logits_r, logits_l)
    assert list(cache_r) == list(cache_l) and len(cache_r) == n_layers, (list(cache_r),
                                                                         list(cache_l))
    for key in cache_l:
        compare(f"cache[{key!r}] (a real tensor in the user's dict)", cache_r[key], cache_l[key])
    assert len(means_r) == len(means_l) == n_layers
    for a, b in zip(means_r, means_l):
        compare("list.append(act.mean(-1))", a, b)

    # 4. activation patching from a clean run's ActivationCache with functools.partial
    corrupt = tokens.clone()
    corrupt[0, 1] = (corrupt[0, 1] + 7) % remote_model.cfg.d_vocab
    _, clean_cache = local_model.run_with_cache(tokens)  # a local cache, sent as constants

    def patch_pos(act, hook, pos, cache):
        act[:, pos, :] = cache[hook.name][:, pos, :]

    site = "blocks.0.hook_resid_post"
    hooks = [(site, functools.partial(patch_pos, pos=1, cache=clean_cache))]
    compare("activation patching with functools.partial + ActivationCache",
            remote_model.run_with_hooks(corrupt, fwd_hooks=hooks),
            local_model.run_with_hooks(corrupt, fwd_hooks=hooks))

    # 5. return_type="loss"
    compare("return_type='loss' with an ablation hook",
            remote_model.run_with_hooks(tokens, return_type="loss",
                                        fwd_hooks=[("blocks.0.attn.hook_z", ablate_head_1)]),
            local_model.run_with_hooks(tokens, return_type="loss",
                                       fwd_hooks=[("blocks.0.attn.hook_z", ablate_head_1)]))

    # 6. the same call on a local TL model, sent to the server with remote=True
    #    (the server's model is found by the local model's cfg.model_name)
    hooks = [("blocks.0.attn.hook_z", ablate_head_1)]
    compare("remote=True on the local model object",
            local_model.run_with_hooks(tokens, fwd_hooks=hooks, remote=True),
            local_model.run_with_hooks(tokens, fwd_hooks=hooks))


def main() -> None:
    with remote_and_local(MODELS) as pairs:
        for name, remote_model, local_model in pairs:
            print(f"{name}:")
            patterns(name, remote_model, local_model)
        print("all patterns match")


if __name__ == "__main__":
    main()
