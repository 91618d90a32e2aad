"""Hook workloads written once, in legacy TransformerLens names, and run twice: remotely by a
TL 2.x ``HookedTransformer`` client in ``.venv-legacy`` (tests/legacy_client.py) and locally
on the server's own TL 4 bridge in the main environment (tests/test_tl_legacy_client.py).

Only torch here, nothing version-specific: both TL versions accept these names (TL 4 through
its aliases) and hand hooks the same layouts. Each case returns ``{key: tensor}``; the
``kw`` a case gets routes its calls (``{}`` locally, ``remote=True, remote_model=...`` for a
local legacy model, ``{}`` for a weightless stand-in, which is remote anyway).
"""
from __future__ import annotations

import functools

import torch

# Hook points stored by the "store" case, per family (legacy names).
COMMON_POINTS = [
    "hook_embed", "blocks.0.hook_resid_pre", "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v", "blocks.0.attn.hook_attn_scores", "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z", "blocks.0.hook_attn_out", "blocks.0.hook_resid_mid",
    "blocks.1.ln2.hook_normalized", "blocks.1.mlp.hook_pre", "blocks.1.mlp.hook_post",
    "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "ln_final.hook_scale",
    "ln_final.hook_normalized",
]
FAMILY_POINTS = {
    "tiny-gpt2": ["hook_pos_embed"],
    "tiny-llama": ["blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k",
                   "blocks.1.mlp.hook_pre_linear"],
}

# Every point a TL 2.x forward fires on each family (no use_* flags set).
ALL_POINTS = {
    name: sorted(set([p.replace("blocks.0.", f"blocks.{layer}.").replace("blocks.1.", f"blocks.{layer}.")
           for layer in range(2) for p in COMMON_POINTS + FAMILY_POINTS[name]
           + ["blocks.0.ln2.hook_scale", "blocks.0.attn.hook_z"]
           if p.startswith("blocks.")]
    + ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized"]
    + (["hook_pos_embed"] if name == "tiny-gpt2" else [])))
    for name in FAMILY_POINTS
}


def _ablate_head(head):
    def ablate(z, hook):
        z[:, :, head, :] = 0.0
    return ablate


def _halve_later_positions(act, hook):
    act[:, 1:, :] *= 0.5


def case_baseline(model, tokens, kw):
    return {"logits": model.run_with_hooks(tokens, fwd_hooks=[], **kw)}


def case_ablate_hook_z(model, tokens, kw):
    hooks = [("blocks.0.attn.hook_z", _ablate_head(1)), ("blocks.1.attn.hook_z", _ablate_head(3))]
    return {"logits": model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)}


def case_resid_edits(model, tokens, kw):
    def zero_bos(act, hook):
        act[:, 0, :] = 0.0
    hooks = [("hook_embed", zero_bos), ("blocks.1.hook_resid_pre", _halve_later_positions)]
    return {"logits": model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)}


def case_returned_tensors(model, tokens, kw):
    d_model, n_heads = model.cfg.d_model, model.cfg.n_heads
    delta = torch.linspace(-1.0, 1.0, d_model)           # captured: sent as a constant
    head_scale = torch.arange(1, n_heads + 1, dtype=torch.float32)[:, None] / n_heads

    hooks = [("blocks.0.hook_resid_pre", lambda act, hook: act + delta),
             ("blocks.0.attn.hook_z", lambda z, hook: z * head_scale),
             ("blocks.0.hook_mlp_out", lambda act, hook: act * 0.0),
             ("blocks.1.attn.hook_pattern", lambda p, hook: p * 0.5)]
    return {"logits": model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)}


def case_store(model, tokens, kw, name):
    store, names_seen = {}, []

    def save(act, hook, key):
        names_seen.append(hook.name)
        store[key] = act.detach().clone()

    points = COMMON_POINTS + FAMILY_POINTS[name]
    hooks = [(p, functools.partial(save, key=p)) for p in points]
    hooks.append(("blocks.0.attn.hook_z", _ablate_head(0)))  # edits after the store: kept
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)
    return {"logits": logits, **{f"store/{k}": v for k, v in store.items()}}, names_seen


def case_cache(model, tokens, kw, name):
    out = {}
    logits, cache = model.run_with_cache(
        tokens, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_z")), **kw)
    out["fn/logits"] = logits
    for key in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.0.attn.hook_z",
                "blocks.1.attn.hook_z"):
        out[f"fn/{key}"] = cache[key]
    wanted = ["blocks.1.hook_mlp_out", "ln_final.hook_normalized", "blocks.0.attn.hook_pattern"]
    logits, cache = model.run_with_cache(tokens, names_filter=wanted, **kw)
    out["list/logits"] = logits
    for key in wanted:
        out[f"list/{key}"] = cache[key]
    logits, full = model.run_with_cache(tokens, **kw)  # no filter: every point that fires
    out["all/logits"] = logits
    for key in ALL_POINTS[name]:
        out[f"all/{key}"] = full[key]
    _, cache = model.run_with_cache(tokens[:1], names_filter="blocks.1.hook_resid_post",
                                    remove_batch_dim=True, **kw)
    out["str/blocks.1.hook_resid_post"] = cache["blocks.1.hook_resid_post"]
    return out, cache


def case_hooks_context(model, tokens, kw, ctx_kw):
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", _ablate_head(2))]):
        inner = model.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_pre", _halve_later_positions)], **kw)
    with model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _ablate_head(0))], **ctx_kw):
        plain = model(tokens)
    return {"ctx+run_with_hooks": inner, "ctx+forward": plain}


def case_patching(model, clean, corrupt, kw):
    """Activation patching: a clean cache, then the corrupted run with one position of the
    clean residual patched in (the clean tensor travels as a constant)."""
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"),
                                          **kw)

    def patch(act, hook, cache, key, pos):
        act[:, pos, :] = cache[key][:, pos, :]

    out = {}
    for layer in range(2):
        key = f"blocks.{layer}.hook_resid_pre"
        hook = functools.partial(patch, cache=clean_cache, key=key, pos=3)
        out[f"patched/{layer}"] = model.run_with_hooks(corrupt, fwd_hooks=[(key, hook)], **kw)
    return out


def case_gqa(model, tokens, kw):
    """Llama: grouped k/v heads (2 of 4) and rotary q/k, in legacy layouts."""
    def zero_kv_head(k, hook):
        k[:, :, 0, :] = 0.0

    hooks = [("blocks.0.attn.hook_k", zero_kv_head),
             ("blocks.1.attn.hook_v", lambda v, hook: v * 0.5),
             ("blocks.1.attn.hook_rot_q", lambda q, hook: q * 2.0),
             ("blocks.0.attn.hook_rot_k", _halve_later_positions_rot)]
    return {"logits": model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)}


def _halve_later_positions_rot(k, hook):
    k[:, 1:, 1, :] *= 0.5  # [batch, pos, kv_head, d_head]


def case_add_hook_and_loss(model, tokens, kw):
    """A hook added with add_hook stays for later calls until reset_hooks(); losses."""
    def scale_mlp(act, hook):
        return act * 2.0

    model.add_hook("blocks.0.hook_mlp_out", scale_mlp)
    try:
        logits = model.run_with_hooks(tokens, fwd_hooks=[], **kw)
        loss = model.run_with_hooks(tokens, fwd_hooks=[], return_type="loss", **kw)
    finally:
        model.reset_hooks()
    per_token = model.run_with_hooks(tokens, fwd_hooks=[], return_type="loss",
                                     loss_per_token=True, **kw)
    return {"logits": logits, "loss": loss, "loss_per_token": per_token}


def case_gradients(model, tokens, kw):
    """Backward hooks (legacy layouts) and incl_bwd caches, from the loss."""
    grads, order = {}, []

    def grad_hook(grad, hook, key):
        grads[key] = grad.detach().clone()
        order.append(key)

    points = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_pre", "blocks.0.hook_mlp_out",
              "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_v"]
    try:
        loss = model.run_with_hooks(
            tokens, return_type="loss",
            bwd_hooks=[(p, functools.partial(grad_hook, key=p)) for p in points], **kw)
        loss.backward()  # locally: runs the hooks; remotely: a no-op (the server ran it)
        out = {"loss": loss.detach(), **{f"grad/{k}": v for k, v in grads.items()}}
        loss, cache = model.run_with_cache(
            tokens, return_type="loss", incl_bwd=True,
            names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_z")), **kw)
        out["cache/loss"] = loss.detach()
        for key in ("blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"):
            out[f"cache/{key}"] = cache[key]
            out[f"cache/{key}_grad"] = cache[key + "_grad"]
    finally:
        model.zero_grad(set_to_none=True)  # local runs accumulate into the weights
    return out, order


def case_hook_ctx(model, tokens, kw):
    """A value a hook keeps in hook.ctx persists (client side) into the next call."""
    def remember(act, hook):
        hook.ctx["mean"] = act.mean(0)

    def subtract(act, hook):
        return act - hook.ctx["mean"]

    point = "blocks.0.hook_resid_post"
    model.run_with_hooks(tokens, fwd_hooks=[(point, remember)], **kw)
    mean = model.hook_dict[point].ctx["mean"]
    logits = model.run_with_hooks(tokens, fwd_hooks=[(point, subtract)], clear_contexts=True,
                                  **kw)
    assert not model.hook_dict[point].ctx, "clear_contexts=True empties hook.ctx"
    return {"mean": mean, "logits": logits}


def case_stop_at_layer(model, tokens, kw):
    return {"resid": model.run_with_hooks(tokens, fwd_hooks=[], stop_at_layer=1, **kw)}


def run_all(model, name, tokens, clean, corrupt, kw, ctx_kw) -> tuple[dict, dict]:
    """Every case: ({"case/key": tensor}, facts the legacy client checks about TL 2.x)."""
    results, facts = {}, {}

    def add(case, values):
        for key, value in values.items():
            results[f"{case}/{key}"] = value

    add("baseline", case_baseline(model, tokens, kw))
    add("ablate_hook_z", case_ablate_hook_z(model, tokens, kw))
    add("resid_edits", case_resid_edits(model, tokens, kw))
    add("returned", case_returned_tensors(model, tokens, kw))
    values, facts["names_seen"] = case_store(model, tokens, kw, name)
    add("store", values)
    values, facts["last_cache"] = case_cache(model, tokens, kw, name)
    add("cache", values)
    add("hooks_ctx", case_hooks_context(model, tokens, kw, ctx_kw))
    add("patching", case_patching(model, clean, corrupt, kw))
    if name == "tiny-llama":
        add("gqa", case_gqa(model, tokens, kw))
    add("add_hook", case_add_hook_and_loss(model, tokens, kw))
    values, facts["grad_order"] = case_gradients(model, tokens, kw)
    add("gradients", values)
    add("hook_ctx", case_hook_ctx(model, tokens, kw))
    add("stop_at_layer", case_stop_at_layer(model, tokens, kw))
    return results, facts
