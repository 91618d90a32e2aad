"""Gradients in remote runs: backward hooks, incl_bwd caches, traced metrics and attribution
patching, each compared with the same TL call run locally on the same weights.

Locally TL accumulates gradients in the model's parameters; every local run here is followed by
``zero_grad`` so that the checks on the shared model (no ``.grad`` ever set by a remote run)
mean something.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from hookwire.errors import HookwireError, TraceError
from tests.conftest import MODEL_NAMES
from engines import ALSO_OUT_OF_PROCESS, EVERY_ENGINE

TOL = dict(rtol=1e-5, atol=1e-6)


def resid_or_z(name: str) -> bool:
    return name.endswith("hook_resid_pre") or name.endswith("attn.hook_z") or \
        name.endswith("hook_mlp_out")


def logit_diff(logits):
    # A typical scalar metric: correct minus wrong token logit at the last position.
    return (logits[:, -1, 5] - logits[:, -1, 7]).mean()


def assert_dicts_close(remote: dict, local: dict):
    assert local, "the local run produced nothing to compare"
    assert sorted(remote) == sorted(local)
    for key in local:
        torch.testing.assert_close(remote[key], local[key], **TOL, msg=key)


def _param_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(autouse=True)
def _zero_grads(local_models):
    for m in local_models.values():
        m.zero_grad(set_to_none=True)
    yield
    for m in local_models.values():
        m.zero_grad(set_to_none=True)


@EVERY_ENGINE
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bwd_hooks_with_loss_then_backward(local_models, tokens, name):
    model = local_models[name]

    def run(remote):
        grads, order = {}, []

        def grad_hook(grad, hook):
            grads[hook.name] = grad.detach().clone()
            order.append(hook.name)
        loss = model.run_with_hooks(tokens, return_type="loss",
                                    bwd_hooks=[(resid_or_z, grad_hook),
                                               ("blocks.1.hook_resid_pre", grad_hook)],
                                    remote=remote)
        loss.backward()  # a no-op after a remote run: the server already ran it
        return loss.detach(), grads, order

    local_loss, local_grads, local_order = run(False)
    model.zero_grad(set_to_none=True)
    remote_loss, remote_grads, remote_order = run(True)
    torch.testing.assert_close(remote_loss, local_loss, **TOL)
    assert_dicts_close(remote_grads, local_grads)
    assert remote_order == local_order  # latest site first, as a backward pass reaches them
    assert all(p.grad is None for p in model.parameters())


@ALSO_OUT_OF_PROCESS
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_run_with_cache_incl_bwd(local_models, tokens, name):
    model = local_models[name]
    local_loss, local_cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)
    remote_loss, remote_cache = model.run_with_cache(tokens, return_type="loss",
                                                     incl_bwd=True, remote=True)
    torch.testing.assert_close(remote_loss.detach(), local_loss.detach(), **TOL)
    assert any(k.endswith("_grad") for k in local_cache.keys())
    assert_dicts_close(dict(remote_cache.items()), dict(local_cache.items()))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_incl_bwd_with_names_filter_and_metric(local_models, tokens, name):
    model = local_models[name]
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    # Locally: TL's incl_bwd needs a scalar output, so the metric is applied by hand.
    grads = {}
    with model.hooks(bwd_hooks=[(n, lambda g, hook: grads.__setitem__(hook.name, g.detach()))
                                for n in names]):
        local_value = logit_diff(model(tokens))
        local_value.backward()
    model.zero_grad(set_to_none=True)
    value, cache = model.run_with_cache(tokens, names_filter=names, incl_bwd=True,
                                        metric=logit_diff, remote=True)
    torch.testing.assert_close(value.detach(), local_value.detach(), **TOL)
    canonical = {n: model.hook_dict[n].name for n in names}  # what hook.name says locally
    assert_dicts_close({n: cache[n + "_grad"] for n in names},
                       {n: grads[canonical[n]] for n in names})


def get_cache_fwd_and_bwd(model, tokens, forward=None):
    """Neel Nanda's get_cache_fwd_and_bwd: add_hook in both directions, a forward, a metric,
    ``.backward()``. ``forward(model, tokens)`` gives the value to differentiate (by default
    ``logit_diff(model(tokens))``, the notebook's own line)."""
    model.reset_hooks()
    cache, grad_cache = {}, {}

    def forward_cache_hook(act, hook):
        cache[hook.name] = act.detach()

    def backward_cache_hook(grad, hook):
        grad_cache[hook.name] = grad.detach()
    model.add_hook(resid_or_z, forward_cache_hook, "fwd")
    model.add_hook(resid_or_z, backward_cache_hook, "bwd")
    value = forward(model, tokens) if forward is not None else logit_diff(model(tokens))
    value.backward()
    model.reset_hooks()
    return value.item(), cache, grad_cache


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_persistent_bwd_hooks_and_metric(local_models, clean_corrupt_tokens, name):
    """get_cache_fwd_and_bwd with the metric passed to the remote call (one round trip)."""
    model = local_models[name]
    clean, _ = clean_corrupt_tokens

    def fwd_and_bwd(remote):
        if not remote:
            return get_cache_fwd_and_bwd(model, clean)
        return get_cache_fwd_and_bwd(model, clean, lambda m, t: m.run_with_hooks(
            t, metric=logit_diff, remote=True))

    local = fwd_and_bwd(False)
    model.zero_grad(set_to_none=True)
    remote = fwd_and_bwd(True)
    assert remote[0] == pytest.approx(local[0], rel=1e-5, abs=1e-6)
    assert_dicts_close(remote[1], local[1])
    assert_dicts_close(remote[2], local[2])


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_attribution_patching_equals_local(local_models, clean_corrupt_tokens, name):
    """Clean cache, corrupted cache and corrupted gradients (two calls), then attribution
    scores per layer and position: the numbers a local TL notebook gets."""
    model = local_models[name]
    clean, corrupt = clean_corrupt_tokens
    resid = lambda n: n.endswith("hook_resid_pre")  # noqa: E731

    def attribution(remote):
        kw = {"remote": True} if remote else {}
        _, clean_cache = model.run_with_cache(clean, names_filter=resid, **kw)
        if remote:
            value, corrupt_cache = model.run_with_cache(corrupt, names_filter=resid,
                                                        incl_bwd=True, metric=logit_diff,
                                                        remote=True)
        else:
            grads = {}
            with model.hooks(bwd_hooks=[(resid, lambda g, hook: grads.__setitem__(
                    hook.name + "_grad", g.detach()))]):
                _, corrupt_cache = model.run_with_cache(corrupt, names_filter=resid)
                # The local notebook's way: a second forward with the metric, then backward.
                value = logit_diff(model(corrupt))
                value.backward()
            # hook.name is the canonical name (blocks.k.hook_in); the cache uses both.
            alias = {model.hook_dict[f"blocks.{k}.hook_resid_pre"].name + "_grad":
                     f"blocks.{k}.hook_resid_pre_grad" for k in range(model.cfg.n_layers)}
            corrupt_cache = dict(corrupt_cache.items()) | {alias[k]: v for k, v in grads.items()}
        scores = torch.stack([
            ((clean_cache[f"blocks.{layer}.hook_resid_pre"]
              - corrupt_cache[f"blocks.{layer}.hook_resid_pre"])
             * corrupt_cache[f"blocks.{layer}.hook_resid_pre_grad"]).sum(-1)
            for layer in range(model.cfg.n_layers)])
        return value.detach(), scores

    local_value, local_scores = attribution(False)
    model.zero_grad(set_to_none=True)
    remote_value, remote_scores = attribution(True)
    torch.testing.assert_close(remote_value, local_value, **TOL)
    torch.testing.assert_close(remote_scores, local_scores, **TOL)
    assert local_scores.abs().sum() > 0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_gradients_through_forward_edits(local_models, tokens, name):
    """A forward hook that edits in place, one that replaces, and backward hooks after them:
    gradients flow through the edits as they do locally."""
    model = local_models[name]

    def zero_first_positions(act, hook):
        act[:, :3] = 0.0

    def scale(act, hook):
        return act * 0.5

    def run(remote):
        grads = {}
        loss = model.run_with_hooks(
            tokens, return_type="loss",
            fwd_hooks=[("blocks.0.hook_mlp_out", zero_first_positions),
                       ("blocks.1.hook_resid_pre", scale)],
            bwd_hooks=[(n, lambda g, hook: grads.__setitem__(hook.name, g.detach()))
                       for n in ("blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre",
                                 "blocks.1.hook_resid_post")],
            remote=remote)
        loss.backward()
        return loss.detach(), grads

    local_loss, local_grads = run(False)
    model.zero_grad(set_to_none=True)
    remote_loss, remote_grads = run(True)
    torch.testing.assert_close(remote_loss, local_loss, **TOL)
    assert_dicts_close(remote_grads, local_grads)


def test_metric_without_backward_returns_its_value(local_models, tokens):
    model = local_models["tiny-gpt2"]
    with torch.no_grad():
        expected = logit_diff(model(tokens))
    value = model.run_with_hooks(tokens, metric=logit_diff, remote=True)
    torch.testing.assert_close(value, expected, **TOL)
    assert not value.requires_grad  # no backward ran: nothing pretends one did


def test_stand_in_forward_with_metric_and_bwd_hooks(local_models, remote_models, tokens):
    local, remote = local_models["tiny-llama"], remote_models["tiny-llama"]
    results = []
    for model in (local, remote):
        grads = {}
        with model.hooks(bwd_hooks=[("blocks.1.hook_resid_post",
                                     lambda g, hook: grads.__setitem__(hook.name, g.detach()))]):
            value = logit_diff(model(tokens)) if model is local else \
                model(tokens, metric=logit_diff)
            value.backward()
        results.append((value.detach(), grads))
        local.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[1][0], results[0][0], **TOL)
    assert_dicts_close(results[1][1], results[0][1])


def test_remote_backward_never_touches_weights(local_models, tokens):
    """Many differentiating requests, with edits: the shared weights are bit-identical and
    hold no gradient afterwards."""
    model = local_models["tiny-gpt2"]
    before = _param_digest(model)

    def vandal(act, hook):
        act.mul_(3.0)  # edits the activation in place, never the weights
    for _ in range(3):
        model.run_with_cache(tokens, return_type="loss", incl_bwd=True, remote=True,
                             progress=False)
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", vandal)],
                             bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: None)],
                             metric=logit_diff, remote=True)
    assert _param_digest(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_backward_needs_a_scalar_or_hooks_at_backward_time(local_models, tokens):
    """Backward hooks with the logits returned: the forward runs (equal to local), and its
    backward would run later -- but run_with_hooks took its hooks off when it returned, so
    locally that backward would only fill the weights' .grad, which a remote run cannot: a
    typed error says so. Per-token losses are no scalar at all."""
    from hookwire.backward_done import GradientNotAvailable

    model = local_models["tiny-gpt2"]
    hooks = [("blocks.0.hook_resid_pre", lambda g, hook: None)]
    logits = model.run_with_hooks(tokens, bwd_hooks=hooks, remote=True)
    torch.testing.assert_close(logits.detach(), model(tokens).detach(), **TOL)
    assert logits.requires_grad  # as a local output's
    with pytest.raises(GradientNotAvailable, match="no backward hooks are attached"):
        logits.sum().backward()
    with pytest.raises(HookwireError, match="scalar output to differentiate"):
        model.run_with_hooks(tokens, return_type="loss", loss_per_token=True,
                             bwd_hooks=hooks, remote=True)


def test_plain_remote_output_says_why_it_has_no_gradient(local_models, remote_models,
                                                         tokens):
    """A remote forward with no backward hooks: the output requires grad as a local one
    does, and its .backward() raises a typed error with the way out instead of torch's
    "does not require grad"; in-place edits of it still work as on a local output."""
    from hookwire.backward_done import GradientNotAvailable

    for model in (remote_models["tiny-gpt2"], local_models["tiny-gpt2"]):
        logits = model.run_with_hooks(tokens, fwd_hooks=[], remote=True)
        assert logits.requires_grad
        logits[:, 0] = 0.0
        with pytest.raises(GradientNotAvailable, match="server ran no backward pass"):
            logits.sum().backward()
        with torch.no_grad():
            assert not model.run_with_hooks(tokens, fwd_hooks=[], remote=True).requires_grad


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_then_backward_as_in_a_local_notebook(local_models, remote_models, tokens,
                                                      name):
    """Attribution patching's usual spelling, unchanged: hooks in both directions, a plain
    forward, a metric computed locally on the logits, ``.backward()``. Remotely the forward
    runs at once and the backward when asked for, seeded with the metric's gradient; the
    cache, the gradients and the value equal the local run's -- on the weightless stand-in
    (Neel Nanda's get_cache_fwd_and_bwd with add_hook) and on a local model inside
    ``hooks(..., remote=True)``."""
    local, stand_in = local_models[name], remote_models[name]

    def in_hooks_block(model, remote):
        cache, grads = {}, {}
        with model.hooks(fwd_hooks=[(resid_or_z, lambda a, hook: cache.__setitem__(
                hook.name, a.detach()))],
                bwd_hooks=[(resid_or_z, lambda g, hook: grads.__setitem__(
                    hook.name, g.detach()))], **({"remote": True} if remote else {})):
            logits = model(tokens)
            value = logits[:, -1].log_softmax(-1)[:, 5].sum()
            value.backward()
        return value.item(), cache, grads

    expected = get_cache_fwd_and_bwd(local, tokens)
    local.zero_grad(set_to_none=True)
    got = get_cache_fwd_and_bwd(stand_in, tokens)
    assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert_dicts_close(got[1], expected[1])
    assert_dicts_close(got[2], expected[2])
    expected = in_hooks_block(local, remote=False)
    local.zero_grad(set_to_none=True)
    got = in_hooks_block(local, remote=True)
    assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert_dicts_close(got[1], expected[1])
    assert_dicts_close(got[2], expected[2])
    assert all(p.grad is None for p in local.parameters())  # the remote run's: none


def test_metric_must_be_a_traced_scalar(local_models, tokens):
    model = local_models["tiny-gpt2"]
    with pytest.raises(TraceError, match="metric returned a float"):
        model.run_with_hooks(tokens, metric=lambda logits: 1.0, remote=True)
    with pytest.raises(TraceError, match="floating-point scalar"):
        model.run_with_hooks(tokens, metric=lambda logits: logits[:, -1],
                             bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, hook: None)],
                             remote=True)


def test_bwd_hook_that_changes_gradients_is_refused(local_models, tokens):
    model = local_models["tiny-gpt2"]

    def clip(grad, hook):
        return grad.clamp(-1, 1)

    def clip_in_place(grad, hook):
        grad.clamp_(-1, 1)
    for hook in (clip, clip_in_place):
        with pytest.raises(TraceError, match="changes the gradient"):
            model.run_with_hooks(tokens, return_type="loss",
                                 bwd_hooks=[("blocks.0.hook_resid_pre", hook)], remote=True)


def test_other_backward_through_the_result_is_refused(local_models, tokens):
    model = local_models["tiny-gpt2"]
    loss = model.run_with_hooks(tokens, return_type="loss",
                                bwd_hooks=[("blocks.0.hook_resid_pre", lambda g, hook: None)],
                                remote=True)
    with pytest.raises(HookwireError, match="already ran on the server"):
        (2 * loss).backward()
    loss.backward()  # the backward the server ran: fine


def test_backward_with_stop_at_layer_is_refused(local_models, tokens):
    model = local_models["tiny-gpt2"]
    with pytest.raises(HookwireError, match="stop_at_layer"):
        model.run_with_hooks(tokens, stop_at_layer=1, metric=logit_diff, remote=True)


def test_frozen_model_and_retain_grad_fail_as_locally(local_models, tokens):
    """What cannot give local TL's gradients raises before anything is sent: a model with
    every parameter frozen (TL: ValueError, no grad_fn), and ``retain_grad()`` on an
    activation inside a hook (its .grad would be read after a local backward)."""
    from hookwire.errors import TraceError

    model = local_models["tiny-gpt2"]
    names = ["blocks.0.hook_resid_post"]
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with pytest.raises(ValueError, match="no grad_fn"):
            model.run_with_cache(tokens, return_type="loss", names_filter=names,
                                 incl_bwd=True)
        with pytest.raises(ValueError, match="grad_fn") as remote:
            model.run_with_cache(tokens, return_type="loss", names_filter=names,
                                 incl_bwd=True, remote=True)
        assert isinstance(remote.value, HookwireError)
    finally:
        for p in frozen:
            p.requires_grad_(True)

    def keep_grad(act, hook):
        act.retain_grad()
    with pytest.raises(TraceError, match="retain_grad.*bwd_hooks"):
        model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(names[0], keep_grad)],
                             remote=True)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_frozen_stand_in_gives_what_a_frozen_local_model_gives(server, local_models,
                                                                  tokens, name):
    """A stand-in's weights are meta, but freezing it freezes what it stands for: its output
    has no grad_fn and backward hooks are refused, as on a frozen local model; unfrozen (as
    built), its output requires grad like a local one."""
    import hookwire.transformerlens as htl

    stand_in, local = htl.RemoteModel(name), local_models[name]
    names = ["blocks.0.hook_resid_post"]
    assert stand_in(tokens).requires_grad == local(tokens).requires_grad
    params = list(local.parameters())
    for model in (stand_in, local):
        model.requires_grad_(False)
    try:
        remote_logits, local_logits = stand_in(tokens), local(tokens)
        assert (remote_logits.requires_grad, remote_logits.grad_fn) == (False, None)
        assert (local_logits.requires_grad, local_logits.grad_fn) == (False, None)
        torch.testing.assert_close(remote_logits, local_logits, **TOL)
        for model in (local, stand_in):  # (a stand-in's calls are all remote)
            with pytest.raises(ValueError, match="grad_fn"):
                model.run_with_cache(tokens, return_type="loss", names_filter=names,
                                     incl_bwd=True)
    finally:
        for p in params:
            p.requires_grad_(True)
