"""Attribution patching: approximate every activation-patching result at once from one clean
cache, one corrupted cache and the corrupted run's gradients (a first-order Taylor estimate:
``(clean - corrupt) * d metric / d corrupt``), per (layer, position) of the residual stream and
per (layer, head) of the attention outputs.

This is Neel Nanda's ``get_cache_fwd_and_bwd`` written the TL way: forward and backward
caching hooks added with ``add_hook``, then a metric differentiated. The one change for a
remote model: the metric goes to the forward as ``metric=`` (traced like a hook; the server
differentiates it) instead of being applied to returned logits, and ``value.backward()``
is then a no-op. The remote numbers must equal the local ones. Run it with::

    .venv/bin/python examples/attribution_patching.py
"""
from __future__ import annotations

import torch

import hookwire.transformerlens  # noqa: F401  (adds remote= to run_with_hooks / run_with_cache)
from transformer_lens import ActivationCache

from _pairs import remote_and_local  # examples/_pairs.py: server + model pairs

MODELS = ["tiny-gpt2", "tiny-llama"]
CLEAN = "When Mary and John went to the store, John gave a drink to "
CORRUPT = "When Mary and John went to the store, Joan gave a drink to "
ANSWER, WRONG = "M", "J"


def wanted(name: str) -> bool:
    return name.endswith("hook_resid_pre") or name.endswith("attn.hook_z")


def get_cache_fwd_and_bwd(model, tokens, metric, remote: bool):
    model.reset_hooks()
    cache, grad_cache = {}, {}

    def forward_cache_hook(act, hook):
        cache[hook.name] = act.detach()

    def backward_cache_hook(grad, hook):
        grad_cache[hook.name] = grad.detach()

    model.add_hook(wanted, forward_cache_hook, "fwd")
    model.add_hook(wanted, backward_cache_hook, "bwd")
    value = model(tokens, metric=metric) if remote else metric(model(tokens))
    value.backward()
    model.reset_hooks()
    return value.item(), ActivationCache(cache, model), ActivationCache(grad_cache, model)


def attribution(model, clean, corrupt, answer: int, wrong: int, remote: bool):
    def logit_diff(logits):
        return (logits[:, -1, answer] - logits[:, -1, wrong]).mean()

    clean_value, clean_cache, _ = get_cache_fwd_and_bwd(model, clean, logit_diff, remote)
    corrupt_value, corrupt_cache, corrupt_grads = get_cache_fwd_and_bwd(
        model, corrupt, logit_diff, remote)
    resid, heads = [], []
    for layer in range(model.cfg.n_layers):
        name = model.hook_dict[f"blocks.{layer}.hook_resid_pre"].name
        delta = clean_cache[name] - corrupt_cache[name]
        resid.append((delta * corrupt_grads[name]).sum(-1)[0])          # per position
        z = model.hook_dict[f"blocks.{layer}.attn.hook_z"].name
        delta_z = clean_cache[z] - corrupt_cache[z]
        heads.append((delta_z * corrupt_grads[z]).sum((-1, -3))[0])     # per head
    return torch.stack(resid), torch.stack(heads), torch.tensor([clean_value, corrupt_value])


def main() -> None:
    with remote_and_local(MODELS) as pairs:
        for name, remote_model, local_model in pairs:
            clean, corrupt = local_model.to_tokens(CLEAN), local_model.to_tokens(CORRUPT)
            answer = int(local_model.to_tokens(ANSWER, prepend_bos=False)[0, 0])
            wrong = int(local_model.to_tokens(WRONG, prepend_bos=False)[0, 0])
            local = attribution(local_model, clean, corrupt, answer, wrong, remote=False)
            remote = attribution(remote_model, clean, corrupt, answer, wrong, remote=True)
            for got, want in zip(remote, local):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            resid, heads, values = remote
            layer, pos = divmod(int(resid.abs().argmax()), resid.shape[1])
            hl, hh = divmod(int(heads.abs().argmax()), heads.shape[1])
            print(f"  {name}: logit diff clean {values[0]:+.4f} corrupt {values[1]:+.4f}; "
                  f"largest resid attribution L{layer} pos {pos} ({resid[layer, pos]:+.4f}), "
                  f"largest head L{hl}H{hh} ({heads[hl, hh]:+.4f}); remote == local")
        print("attribution patching: remote == local")


if __name__ == "__main__":
    main()
