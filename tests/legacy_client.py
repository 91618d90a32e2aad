"""The legacy client half of tests/test_tl_legacy_client.py. Runs under .venv-legacy
(TransformerLens 2.x + transformers 4.57), never under the main environment.

    legacy_client.py WS_URL DIR

DIR holds what the main side wrote: tokens.npy, clean.npy, corrupt.npy and, per model,
weights/<model>/<i>.npy + weights/<model>/index.json (the server model's HF weights, so a
real local HookedTransformer can be built). For each model it runs tests/legacy_cases.py
  * "standin":      on hookwire.transformerlens.RemoteModel(name) (weightless, meta device);
  * "local_remote": on a real local HookedTransformer, with remote=True, remote_model=name;
  * "legacy_local": the same local model run locally by TL 2.x (no weight processing);
and writes every result as .npy (allow_pickle=False) under DIR/out/<model>/<variant>/, with
an index.json, plus DIR/out/facts.json: what TL 2.x-specific behaviour looked like.
"""
from __future__ import annotations

import json
import os
import sys
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import legacy_cases  # noqa: E402

MODELS = ("tiny-gpt2", "tiny-llama")


def load_npy(path) -> torch.Tensor:
    return torch.from_numpy(np.load(path, allow_pickle=False))


def save_all(folder, values: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    index = {}
    for i, (key, value) in enumerate(values.items()):
        assert type(value) is torch.Tensor, (key, type(value))
        np.save(os.path.join(folder, f"{i}.npy"), value.detach().cpu().numpy(),
                allow_pickle=False)
        index[key] = f"{i}.npy"
    with open(os.path.join(folder, "index.json"), "w") as fh:
        json.dump(index, fh)


def local_hooked_transformer(name, info, weights_dir, processed=False):
    """A real HookedTransformer with the server model's weights, loaded the way
    ``from_pretrained_no_processing`` loads them (or ``from_pretrained``'s processing)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import (convert_gpt2_weights,
                                                                convert_llama_weights)

    from hookwire.families import build_hf_model
    from hookwire.tokenizer import tokenizer_from_files
    from hookwire.transformerlens.legacy import legacy_config_kwargs

    with open(os.path.join(weights_dir, "index.json")) as fh:
        index = json.load(fh)
    state = {key: load_npy(os.path.join(weights_dir, fname)) for key, fname in index.items()}
    hf_model, _ = build_hf_model(info.architecture, info.config)
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in k or "rotary" in k for k in missing), \
        (missing, unexpected)
    kwargs = legacy_config_kwargs(info.architecture, info.config)
    if processed:
        kwargs["normalization_type"] = {"LN": "LNPre", "RMS": "RMSPre"}[
            kwargs["normalization_type"]]
    cfg = HookedTransformerConfig(device="cpu", model_name=f"local-{name}", **kwargs)
    model = HookedTransformer(cfg, tokenizer=tokenizer_from_files(info.tokenizer_files))
    convert = {"GPT2LMHeadModel": convert_gpt2_weights,
               "LlamaForCausalLM": convert_llama_weights}[info.architecture]
    model.load_and_process_state_dict(
        convert(hf_model, cfg), fold_ln=processed, center_writing_weights=processed,
        center_unembed=processed, fold_value_biases=processed,
        refactor_factored_attn_matrices=False)
    return model.eval()


def expect_error(fn, exc_type, needle: str) -> str:
    try:
        fn()
    except exc_type as exc:
        assert needle in str(exc), f"{exc_type.__name__} without {needle!r}: {exc}"
        return f"{exc_type.__name__}: {exc}"
    raise AssertionError(f"expected {exc_type.__name__} ({needle})")


def main(url: str, folder: str) -> None:
    import transformer_lens
    import transformers
    from transformer_lens import ActivationCache, HookedTransformer

    import hookwire
    import hookwire.transformerlens as htl
    from hookwire.client import get_connection
    from hookwire.errors import HookwireError, TraceError

    hookwire.configure(url=url)
    tokens, clean, corrupt = (load_npy(os.path.join(folder, f"{n}.npy"))
                              for n in ("tokens", "clean", "corrupt"))
    facts = {"transformers": transformers.__version__,
             "transformer_lens_has_bridge": hasattr(transformer_lens, "TransformerBridge"),
             "models": {}}
    out = os.path.join(folder, "out")
    for name in MODELS:
        info = get_connection().model_info(name)
        model_facts = facts["models"][name] = {}

        stand_in = htl.RemoteModel(name)
        # (a subclass whose weight properties say how to get weights: weights.guard_weightless)
        assert isinstance(stand_in, HookedTransformer) and \
            type(stand_in).__name__ == "HookedTransformer", type(stand_in)
        assert next(stand_in.parameters()).device.type == "meta"
        model_facts["text_tokens"] = stand_in.to_tokens("hello world").tolist()
        results, case_facts = legacy_cases.run_all(stand_in, name, tokens, clean, corrupt,
                                                   kw={}, ctx_kw={})
        model_facts["names_seen"] = case_facts["names_seen"]
        model_facts["grad_order"] = {"remote": case_facts["grad_order"]}
        cache = case_facts["last_cache"]
        model_facts["cache_type"] = type(cache).__name__
        model_facts["cache_is_activation_cache"] = isinstance(cache, ActivationCache)
        model_facts["cache_keys"] = list(cache.keys())
        # A patching sweep refers to the clean cache the server still holds.
        stats = get_connection().stats
        before = stats.tensors_referenced
        legacy_cases.case_patching(stand_in, clean, corrupt, {})
        model_facts["patching_references"] = stats.tensors_referenced - before
        # Text in, as TL 2.x users call it.
        results["text/logits"] = stand_in.run_with_hooks("hello world", fwd_hooks=[])
        # Non-blocking: a handle at once, the same values when waited for.
        run = stand_in.run_with_hooks(tokens, blocking=False,
                                      fwd_hooks=[("blocks.0.attn.hook_z",
                                                  legacy_cases._ablate_head(1)),
                                                 ("blocks.1.attn.hook_z",
                                                  legacy_cases._ablate_head(3))])
        model_facts["nonblocking_equal"] = torch.equal(run.result(),
                                                       results["ablate_hook_z/logits"])
        run = stand_in.run_with_cache(tokens, blocking=False, names_filter="hook_embed")
        _, nb_cache = run.result()
        model_facts["nonblocking_cache"] = [type(nb_cache).__name__, list(nb_cache.keys())]
        save_all(os.path.join(out, name, "standin"), results)

        local = local_hooked_transformer(name, info, os.path.join(folder, "weights", name))
        remote_kw = {"remote": True, "remote_model": name}
        results, case_facts = legacy_cases.run_all(local, name, tokens, clean, corrupt,
                                                   kw=remote_kw, ctx_kw=remote_kw)
        assert not any(hp._forward_hooks for hp in local.hook_dict.values()), "hooks left"
        save_all(os.path.join(out, name, "local_remote"), results)
        model_facts["full_cache_keys"] = {
            "remote": sorted(stand_in.run_with_cache(tokens)[1].keys()),
            "local": sorted(local.run_with_cache(tokens)[1].keys())}
        results, case_facts = legacy_cases.run_all(local, name, tokens, clean, corrupt, kw={},
                                                   ctx_kw={})
        model_facts["grad_order"]["local"] = case_facts["grad_order"]
        save_all(os.path.join(out, name, "legacy_local"), results)

        # TL 2.x-only run_with_cache options: pos_slice (TL 4 has none), remote vs TL 2.x
        # locally on the same weights.
        worst = 0.0
        for pos_slice in (-1, [0, 2], (1, 5)):
            names = lambda n: n.endswith(("hook_z", "hook_resid_pre", "hook_pattern"))  # noqa
            _, remote_cache = stand_in.run_with_cache(tokens, pos_slice=pos_slice,
                                                      names_filter=names)
            _, local_cache = local.run_with_cache(tokens, pos_slice=pos_slice,
                                                  names_filter=names)
            assert list(remote_cache.keys()) == list(local_cache.keys())
            for key in local_cache.keys():
                assert remote_cache[key].shape == local_cache[key].shape, (key, pos_slice)
                diff = (remote_cache[key] - local_cache[key]).abs().max().item()
                worst = max(worst, diff)
        model_facts["pos_slice_max_abs_diff"] = worst

        processed = local_hooked_transformer(name, info, os.path.join(folder, "weights", name),
                                             processed=True)
        values = {}
        for variant, model in (("processed", processed), ("unprocessed", local)):
            logits, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
            values[f"{variant}/logits"] = logits
            values[f"{variant}/blocks.1.hook_resid_post"] = cache["blocks.1.hook_resid_post"]
        save_all(os.path.join(out, name, "processing"), values)

        # TL's hook switches travel with the request: with use_attn_result on, hook_result
        # fires on the server as it does in TL 2.x here.
        gated = {}
        local.cfg.use_attn_result = True
        try:
            for variant, kwargs in (("remote", dict(remote=True, remote_model=name)),
                                    ("local", {})):
                store = {}

                def keep(act, hook, store=store):
                    store["value"] = act.detach().clone()
                local.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", keep)],
                                     **kwargs)
                gated[f"{variant}/blocks.0.attn.hook_result"] = store["value"]
        finally:
            local.cfg.use_attn_result = False
        save_all(os.path.join(out, name, "gated"), gated)

        # Typed errors, raised before anything is sent.
        errors = model_facts["errors"] = {}
        def branches_on_values(act, hook):
            if act.sum() > 0:  # data-dependent Python control flow: untraceable
                return act * 2
        errors["trace"] = expect_error(
            lambda: stand_in.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                                branches_on_values)]),
            TraceError, "branches_on_values")
        other = "tiny-llama" if name == "tiny-gpt2" else "tiny-gpt2"
        errors["wrong_model"] = expect_error(
            lambda: local.run_with_hooks(tokens, remote=True, remote_model=other,
                                         fwd_hooks=[("blocks.0.hook_resid_pre",
                                                     lambda a, hook: None)]),
            HookwireError, "same architecture")
        if name == "tiny-llama":
            local.cfg.ungroup_grouped_query_attention = True  # TL 2.x then shows 4 k heads
            try:
                errors["ungrouped_k"] = expect_error(
                    lambda: local.run_with_hooks(tokens, remote=True, remote_model=name,
                                                 fwd_hooks=[("blocks.0.attn.hook_k",
                                                             lambda a, hook: None)]),
                    HookwireError, "ungroup_grouped_query_attention")
            finally:
                local.cfg.ungroup_grouped_query_attention = False
        assert not any(hp._forward_hooks for hp in local.hook_dict.values()), "hooks left"

    with open(os.path.join(out, "facts.json"), "w") as fh:
        json.dump(facts, fh, indent=1)
    print("legacy client: done")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
