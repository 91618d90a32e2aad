"""Remote ``run_with_cache``, persistent hooks, ``hook.ctx`` and progress, each compared with
the same call run locally by TL 4 on the same weights.

Two front doors (``front``):
  * ``stand_in``    -- ``hookwire.transformerlens.RemoteModel(name)``: every call goes remote,
                       including a plain ``model(tokens)``;
  * ``bridge_true`` -- the local bridge the server hosts, with ``remote=True,
                       remote_model=name`` on ``run_with_hooks`` / ``run_with_cache``. (A plain
                       ``model(tokens)`` on it is local, so "a plain remote call" there is
                       ``run_with_hooks(tokens, remote=True, remote_model=name)`` with no hooks
                       of its own.)

On ``bridge_true`` the local and the remote model are the *same object*: hooks and ``ctx``
live on the same hook points, so every test finishes the local run (and resets) before the
remote one starts.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close
from transformer_lens import ActivationCache

from conftest import MODEL_NAMES
from engines import ALSO_OUT_OF_PROCESS, EVERY_ENGINE

pytestmark = pytest.mark.filterwarnings("ignore:.*gated-off hook name.*")

FRONTS = ("stand_in", "bridge_true")


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture(params=FRONTS)
def front(request):
    return request.param


@pytest.fixture
def local(local_models, name):
    return local_models[name]


class Front:
    """One way of running things remotely, with TL's method names.

    ``model`` is the object whose hook points remote calls use (add_hook, hooks(), ctx)."""

    def __init__(self, kind, model, name):
        self.kind, self.model, self.name = kind, model, name
        self.kw = {} if kind == "stand_in" else {"remote": True, "remote_model": name}

    def __call__(self, tokens, **kwargs):
        """A plain forward: ``model(tokens)`` on the stand-in."""
        if self.kind == "stand_in":
            return self.model(tokens, **kwargs)
        return self.model.run_with_hooks(tokens, **self.kw, **kwargs)

    def run_with_hooks(self, tokens, **kwargs):
        return self.model.run_with_hooks(tokens, **self.kw, **kwargs)

    def run_with_cache(self, tokens, **kwargs):
        return self.model.run_with_cache(tokens, **self.kw, **kwargs)

    def hooks(self, **kwargs):
        return self.model.hooks(**kwargs)


@pytest.fixture
def remote(front, name, local_models, remote_models):
    model = remote_models[name] if front == "stand_in" else local_models[name]
    return Front(front, model, name)


def assert_plain_tensor(value):
    assert type(value) is torch.Tensor, f"expected a plain torch.Tensor, got {type(value)}"
    assert value.device.type == "cpu"


def assert_same_cache(got, want):
    assert type(got) is type(want), (type(got), type(want))
    assert list(got.keys()) == list(want.keys())
    for key in want.keys():
        assert_plain_tensor(got[key])
        assert got[key].shape == want[key].shape, key
        assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


def assert_no_hooks(model):
    for point, hp in model.hook_dict.items():
        assert len(hp._forward_hooks) == 0, point
        assert not hp.fwd_hooks, point


# ---- 1. run_with_cache ----------------------------------------------------------------------

@EVERY_ENGINE
def test_run_with_cache_everything(remote, local, tokens):
    logits_l, cache_l = local.run_with_cache(tokens)
    logits_r, cache_r = remote.run_with_cache(tokens)
    assert isinstance(cache_l, ActivationCache)
    assert len(cache_l) > 20
    assert_plain_tensor(logits_r)
    assert_close(logits_r, logits_l)
    assert_same_cache(cache_r, cache_l)
    assert_no_hooks(remote.model)


CACHE_FILTERS = {
    "string_canonical": "blocks.0.hook_in",
    "string_alias": "blocks.0.hook_resid_pre",
    "string_alias_resid_post": "blocks.1.hook_resid_post",
    "string_pattern": "blocks.1.attn.hook_pattern",
    "list": ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z", "hook_embed",
             "ln_final.hook_normalized", "blocks.1.hook_out"],
    "callable_resid_post": lambda n: n.endswith("hook_resid_post"),
    "callable_canonical_out": lambda n: n.endswith(".hook_out") and n.startswith("blocks."),
    "callable_layer_0_attn": lambda n: n.startswith("blocks.0.attn."),
}


@ALSO_OUT_OF_PROCESS
@pytest.mark.parametrize("filter_id", list(CACHE_FILTERS))
def test_run_with_cache_names_filter(remote, local, tokens, filter_id):
    flt = CACHE_FILTERS[filter_id]
    logits_l, cache_l = local.run_with_cache(tokens, names_filter=flt)
    logits_r, cache_r = remote.run_with_cache(tokens, names_filter=flt)
    assert len(cache_l) >= 1
    assert_close(logits_r, logits_l)
    assert_same_cache(cache_r, cache_l)


@pytest.mark.parametrize("return_type", ["logits", "loss", None])
def test_run_with_cache_return_type(remote, local, tokens, return_type):
    flt = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    out_l, cache_l = local.run_with_cache(tokens, names_filter=flt, return_type=return_type)
    out_r, cache_r = remote.run_with_cache(tokens, names_filter=flt, return_type=return_type)
    if return_type is None:
        assert out_l is None and out_r is None
    else:
        assert_plain_tensor(out_r)
        assert out_r.shape == out_l.shape
        assert_close(out_r, out_l)
    assert_same_cache(cache_r, cache_l)


def test_run_with_cache_remove_batch_dim(remote, local, tokens):
    one = tokens[:1]
    logits_l, cache_l = local.run_with_cache(one, remove_batch_dim=True)
    logits_r, cache_r = remote.run_with_cache(one, remove_batch_dim=True)
    assert cache_l["blocks.0.hook_resid_pre"].dim() == 2
    assert_close(logits_r, logits_l)
    assert_same_cache(cache_r, cache_l)


def test_run_with_cache_return_cache_object_false(remote, local, tokens):
    flt = ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern"]
    logits_l, cache_l = local.run_with_cache(tokens, names_filter=flt, return_cache_object=False)
    logits_r, cache_r = remote.run_with_cache(tokens, names_filter=flt,
                                              return_cache_object=False)
    assert type(cache_l) is dict
    assert_close(logits_r, logits_l)
    assert_same_cache(cache_r, cache_l)


def test_run_with_cache_cache_object_methods(remote, local, tokens):
    """The remote cache is a real ActivationCache: its TL helpers work and agree with local."""
    _, cache_l = local.run_with_cache(tokens)
    _, cache_r = remote.run_with_cache(tokens)
    resid_l, labels_l = cache_l.accumulated_resid(return_labels=True)
    resid_r, labels_r = cache_r.accumulated_resid(return_labels=True)
    assert labels_r == labels_l
    assert_close(resid_r, resid_l)
    assert_close(cache_r["resid_pre", 1], cache_l["resid_pre", 1])
    assert_close(cache_r["pattern", 0], cache_l["pattern", 0])


def _ablate_head_1(z, hook):
    z[:, :, 1, :] = 0.0


def test_run_with_cache_inside_hooks_context_ablation(remote, local, tokens):
    hooks = [("blocks.0.attn.hook_z", _ablate_head_1)]
    with local.hooks(fwd_hooks=hooks):
        logits_l, cache_l = local.run_with_cache(tokens)
    _, clean_l = local.run_with_cache(tokens)
    assert_no_hooks(local)
    with remote.hooks(fwd_hooks=hooks):
        logits_r, cache_r = remote.run_with_cache(tokens)
    assert_no_hooks(remote.model)
    # The ablation shows in the cache (the ablated head's z is zero) and downstream.
    assert torch.all(cache_l["blocks.0.attn.hook_z"][:, :, 1] == 0)
    assert not torch.allclose(cache_l["blocks.1.hook_resid_pre"],
                              clean_l["blocks.1.hook_resid_pre"])
    assert_close(logits_r, logits_l)
    assert_same_cache(cache_r, cache_l)


# ---- 2. persistent hooks ---------------------------------------------------------------------

def _scale_resid(act, hook):
    return act * 0.5


def _add_one_resid(act, hook):
    act += 1.0


def test_add_hook_plain_call_and_run_with_hooks_then_reset(remote, local, tokens):
    site = "blocks.1.hook_resid_pre"
    clean = local(tokens)

    local.add_hook(site, _scale_resid)
    plain_l = local(tokens)
    both_l = local.run_with_hooks(tokens, fwd_hooks=[(site, _add_one_resid)])
    after_rwh_l = local(tokens)  # the persistent hook is still there
    local.reset_hooks()
    reset_l = local(tokens)
    assert_no_hooks(local)
    assert not torch.allclose(plain_l, clean)
    assert not torch.allclose(both_l, plain_l)
    assert_close(after_rwh_l, plain_l)
    assert_close(reset_l, clean)

    remote.model.add_hook(site, _scale_resid)
    plain_r = remote(tokens)
    both_r = remote.run_with_hooks(tokens, fwd_hooks=[(site, _add_one_resid)])
    after_rwh_r = remote(tokens)
    remote.model.reset_hooks()
    reset_r = remote(tokens)
    assert_no_hooks(remote.model)

    assert_close(plain_r, plain_l)
    assert_close(both_r, both_l)
    assert_close(after_rwh_r, after_rwh_l)
    assert_close(reset_r, reset_l)


def test_add_hook_order_matters_like_local(remote, local, tokens):
    """add_hook first, run_with_hooks' second: (x * 0.5) + 1, not (x + 1) * 0.5."""
    site = "blocks.0.hook_resid_post"
    local.add_hook(site, _scale_resid)
    expected = local.run_with_hooks(tokens, fwd_hooks=[(site, _add_one_resid)])
    local.reset_hooks()
    other_order = local.run_with_hooks(tokens, fwd_hooks=[(site, _add_one_resid),
                                                          (site, _scale_resid)])
    assert not torch.allclose(expected, other_order)

    remote.model.add_hook(site, _scale_resid)
    got = remote.run_with_hooks(tokens, fwd_hooks=[(site, _add_one_resid)])
    remote.model.reset_hooks()
    assert_close(got, expected)


def test_add_hook_with_filter_and_store(remote, local, tokens):
    def make():
        store: dict = {}

        def save(act, hook):
            store[hook.name] = act.detach()

        return save, store

    flt = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    save_l, store_l = make()
    local.add_hook(flt, save_l)
    logits_l = local(tokens)
    local.reset_hooks()

    save_r, store_r = make()
    remote.model.add_hook(flt, save_r)
    logits_r = remote(tokens)
    remote.model.reset_hooks()
    assert_no_hooks(remote.model)
    assert len(store_l) == local.cfg.n_layers
    assert_close(logits_r, logits_l)
    assert_same_cache(store_r, store_l)


def test_hooks_context_applies_only_inside(remote, local, tokens):
    hooks = [("blocks.0.attn.hook_z", _ablate_head_1)]
    clean_l = local(tokens)
    with local.hooks(fwd_hooks=hooks):
        inside_l = local(tokens)
        loss_inside_l = local(tokens, return_type="loss")
    assert not torch.allclose(inside_l, clean_l)

    with remote.hooks(fwd_hooks=hooks):
        inside_r = remote(tokens)
        loss_inside_r = remote(tokens, return_type="loss")
        hooked = remote.model.hook_dict["blocks.0.attn.hook_z"]
        assert len(hooked._forward_hooks) == 1
    after_r = remote(tokens)
    assert_no_hooks(remote.model)
    assert_close(inside_r, inside_l)
    assert_close(loss_inside_r, loss_inside_l)
    assert_close(after_r, clean_l)


def test_hooks_context_with_run_with_hooks_inside(remote, local, tokens):
    outer = [("blocks.0.hook_resid_post", _scale_resid)]
    inner = [("blocks.0.hook_resid_post", _add_one_resid),
             ("blocks.1.attn.hook_z", _ablate_head_1)]
    with local.hooks(fwd_hooks=outer):
        expected = local.run_with_hooks(tokens, fwd_hooks=inner)
    with remote.hooks(fwd_hooks=outer):
        got = remote.run_with_hooks(tokens, fwd_hooks=inner)
    assert_no_hooks(remote.model)
    assert_close(got, expected)


def test_permanent_hook_survives_reset(remote, local, tokens):
    site = "blocks.1.hook_resid_pre"
    local.add_perma_hook(site, _scale_resid)
    local.reset_hooks()
    expected = local(tokens)
    local.reset_hooks(including_permanent=True)

    remote.model.add_perma_hook(site, _scale_resid)
    remote.model.reset_hooks()
    got = remote(tokens)
    remote.model.reset_hooks(including_permanent=True)
    assert_no_hooks(remote.model)
    assert_close(got, expected)
    assert not torch.allclose(expected, local(tokens))


# ---- 3. hook.ctx -------------------------------------------------------------------------------

def _counting_hook(act, hook):
    hook.ctx["n"] = hook.ctx.get("n", 0) + 1
    hook.ctx["last"] = act.mean()


def _ctx_snapshot(model, point):
    return dict(model.hook_dict[point].ctx)


def test_ctx_counts_and_stores_across_two_calls(remote, local, tokens):
    site, point = "blocks.0.hook_resid_post", "blocks.0.hook_out"
    other = tokens.flip(1)
    for t in (tokens, other):
        local.run_with_hooks(t, fwd_hooks=[(site, _counting_hook)])
    ctx_l = _ctx_snapshot(local, point)
    local.reset_hooks()  # clears contexts
    assert _ctx_snapshot(local, point) == {}

    for t in (tokens, other):
        remote.run_with_hooks(t, fwd_hooks=[(site, _counting_hook)])
    ctx_r = _ctx_snapshot(remote.model, point)
    assert ctx_l["n"] == 2
    assert ctx_r["n"] == 2
    assert set(ctx_r) == set(ctx_l)
    assert_plain_tensor(ctx_r["last"])
    assert ctx_r["last"].dim() == 0
    assert_close(ctx_r["last"], ctx_l["last"])
    remote.model.reset_hooks()
    assert _ctx_snapshot(remote.model, point) == {}


def _subtract_previous_hook(act, hook):
    if "prev" in hook.ctx:
        act = act - hook.ctx["prev"]
    hook.ctx["prev"] = act[:, -1].mean(0)
    return act


@ALSO_OUT_OF_PROCESS
def test_ctx_tensor_from_previous_call_is_used(remote, local, tokens):
    site, point = "blocks.1.hook_resid_pre", "blocks.1.hook_in"
    other = tokens.flip(1)
    hooks = [(site, _subtract_previous_hook)]
    outs_l = [local.run_with_hooks(t, fwd_hooks=hooks) for t in (tokens, other, tokens)]
    prev_l = _ctx_snapshot(local, point)["prev"]
    local.reset_hooks()
    assert not torch.allclose(outs_l[0], outs_l[2])  # the stored value changed the result

    outs_r = [remote.run_with_hooks(t, fwd_hooks=hooks) for t in (tokens, other, tokens)]
    prev_r = _ctx_snapshot(remote.model, point)["prev"]
    remote.model.reset_hooks()
    for got, want in zip(outs_r, outs_l):
        assert_close(got, want)
    assert_plain_tensor(prev_r)
    assert_close(prev_r, prev_l)


def test_ctx_with_plain_calls_under_add_hook(remote, local, tokens):
    site, point = "blocks.1.hook_resid_pre", "blocks.1.hook_in"
    local.add_hook(site, _subtract_previous_hook)
    outs_l = [local(tokens) for _ in range(2)]
    prev_l = _ctx_snapshot(local, point)["prev"]
    local.reset_hooks()

    remote.model.add_hook(site, _subtract_previous_hook)
    outs_r = [remote(tokens) for _ in range(2)]
    prev_r = _ctx_snapshot(remote.model, point)["prev"]
    remote.model.reset_hooks()
    for got, want in zip(outs_r, outs_l):
        assert_close(got, want)
    assert_plain_tensor(prev_r)
    assert_close(prev_r, prev_l)


def test_clear_contexts_true(remote, local, tokens):
    site, point = "blocks.0.hook_resid_post", "blocks.0.hook_out"
    local.run_with_hooks(tokens, fwd_hooks=[(site, _counting_hook)])
    kept_l = _ctx_snapshot(local, point)
    local.run_with_hooks(tokens, fwd_hooks=[(site, _counting_hook)], clear_contexts=True)
    cleared_l = _ctx_snapshot(local, point)
    local.reset_hooks()
    assert kept_l["n"] == 1 and cleared_l == {}

    remote.run_with_hooks(tokens, fwd_hooks=[(site, _counting_hook)])
    kept_r = _ctx_snapshot(remote.model, point)
    remote.run_with_hooks(tokens, fwd_hooks=[(site, _counting_hook)], clear_contexts=True)
    cleared_r = _ctx_snapshot(remote.model, point)
    remote.model.reset_hooks()
    assert kept_r["n"] == 1
    assert_plain_tensor(kept_r["last"])
    assert_close(kept_r["last"], kept_l["last"])
    assert cleared_r == {}


def test_clear_contexts_on_run_with_cache(remote, local, tokens):
    site, point = "blocks.0.hook_resid_post", "blocks.0.hook_out"
    with local.hooks(fwd_hooks=[(site, _counting_hook)]):
        _, cache_l = local.run_with_cache(tokens, names_filter=site)
        n_inside_l = _ctx_snapshot(local, point)["n"]
    local.run_with_hooks(tokens, fwd_hooks=[(site, _counting_hook)])
    local.run_with_cache(tokens, names_filter=site, clear_contexts=True)
    cleared_l = _ctx_snapshot(local, point)
    local.reset_hooks()

    with remote.hooks(fwd_hooks=[(site, _counting_hook)]):
        _, cache_r = remote.run_with_cache(tokens, names_filter=site)
        n_inside_r = _ctx_snapshot(remote.model, point)["n"]
    remote.run_with_hooks(tokens, fwd_hooks=[(site, _counting_hook)])
    remote.run_with_cache(tokens, names_filter=site, clear_contexts=True)
    cleared_r = _ctx_snapshot(remote.model, point)
    remote.model.reset_hooks()
    assert n_inside_r == n_inside_l == 1
    assert cleared_r == cleared_l
    assert_same_cache(cache_r, cache_l)


def test_reset_hooks_end_false_keeps_hook(remote, local, tokens):
    site, point = "blocks.1.hook_resid_pre", "blocks.1.hook_in"
    first_l = local.run_with_hooks(tokens, fwd_hooks=[(site, _scale_resid)],
                                   reset_hooks_end=False)
    n_hooks_l = len(local.hook_dict[point]._forward_hooks)
    still_l = local(tokens)
    local.reset_hooks()
    assert n_hooks_l == 1
    assert_close(still_l, first_l)

    first_r = remote.run_with_hooks(tokens, fwd_hooks=[(site, _scale_resid)],
                                    reset_hooks_end=False)
    n_hooks_r = len(remote.model.hook_dict[point]._forward_hooks)
    still_r = remote(tokens)
    remote.model.reset_hooks()
    after_r = remote(tokens)
    assert n_hooks_r == n_hooks_l
    assert_close(first_r, first_l)
    assert_close(still_r, still_l)
    assert_close(after_r, local(tokens))
    assert_no_hooks(remote.model)


def test_reset_hooks_end_false_on_run_with_cache(remote, local, tokens):
    flt = "blocks.0.hook_resid_post"
    _, cache_l = local.run_with_cache(tokens, names_filter=flt, reset_hooks_end=False)
    n_l = len(local.hook_dict["blocks.0.hook_out"]._forward_hooks)
    local.reset_hooks()

    _, cache_r = remote.run_with_cache(tokens, names_filter=flt, reset_hooks_end=False)
    n_r = len(remote.model.hook_dict["blocks.0.hook_out"]._forward_hooks)
    remote.model.reset_hooks()
    assert n_r == n_l
    assert_same_cache(cache_r, cache_l)


# ---- 4. progress -------------------------------------------------------------------------------

@pytest.mark.parametrize("progress", [True, False])
def test_progress_flag(remote, local, tokens, progress, capfd):
    hooks = [("blocks.0.attn.hook_z", _ablate_head_1)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    _, cache_l = local.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post")
    capfd.readouterr()
    got = remote.run_with_hooks(tokens, fwd_hooks=hooks, progress=progress)
    _, cache_r = remote.run_with_cache(tokens, names_filter="blocks.1.hook_resid_post",
                                       progress=progress)
    captured = capfd.readouterr()
    assert_close(got, expected)
    assert_same_cache(cache_r, cache_l)
    if progress:
        assert "hookwire" in captured.err
    else:
        assert "hookwire" not in captured.err
        assert "hookwire" not in captured.out


# ---- 5. plain calls on the stand-in ------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{}, {"return_type": "loss"}, {"return_type": "logits"}],
                         ids=["default", "loss", "logits"])
def test_stand_in_plain_call(remote_models, local, name, tokens, kwargs):
    got = remote_models[name](tokens, **kwargs)
    expected = local(tokens, **kwargs)
    assert_plain_tensor(got)
    assert got.shape == expected.shape
    assert_close(got, expected)


def test_stand_in_plain_call_on_text(remote_models, local, name):
    text = ["hello world", "goodbye moon"]
    assert_close(remote_models[name](text), local(text))
    assert_close(remote_models[name](text, return_type="loss"), local(text, return_type="loss"))


# ---- patching from a remote cache --------------------------------------------------------------

def _patch_pos(act, hook, pos, cache, key):
    act[:, pos] = cache[key][:, pos]


@ALSO_OUT_OF_PROCESS
def test_patch_from_a_remote_cache(remote, local, clean_corrupt_tokens):
    """The remote cache is usable as the clean cache of a remote patching run. (A callable
    filter matching only the legacy spelling keys the cache by it, locally too, so the patch
    reads ``cache[key]`` rather than ``cache[hook.name]``.)"""
    clean, corrupt = clean_corrupt_tokens
    _, cache_l = local.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    _, cache_r = remote.run_with_cache(clean,
                                       names_filter=lambda n: n.endswith("hook_resid_pre"))
    hooks_l = [("blocks.1.hook_resid_pre", functools.partial(_patch_pos, pos=4, cache=cache_l,
                                                          key="blocks.1.hook_resid_pre"))]
    hooks_r = [("blocks.1.hook_resid_pre", functools.partial(_patch_pos, pos=4, cache=cache_r,
                                                          key="blocks.1.hook_resid_pre"))]
    expected = local.run_with_hooks(corrupt, fwd_hooks=hooks_l)
    assert_close(remote.run_with_hooks(corrupt, fwd_hooks=hooks_r), expected)
    assert not torch.allclose(expected, local(corrupt))


# ---- more spellings of the same features --------------------------------------------------------

def test_run_with_cache_filter_list_with_alias_and_canonical_of_one_point(remote, local, tokens):
    flt = ["blocks.0.hook_resid_pre", "blocks.0.hook_in", "blocks.1.hook_resid_post"]
    _, cache_l = local.run_with_cache(tokens, names_filter=flt)
    _, cache_r = remote.run_with_cache(tokens, names_filter=flt)
    assert_same_cache(cache_r, cache_l)


def test_run_with_cache_text_input(remote, local):
    text = ["hello world", "goodbye moon"]
    logits_l, cache_l = local.run_with_cache(text, names_filter="blocks.1.hook_resid_post")
    logits_r, cache_r = remote.run_with_cache(text, names_filter="blocks.1.hook_resid_post")
    assert_close(logits_r, logits_l)
    assert_same_cache(cache_r, cache_l)


def test_ctx_list_of_tensors_grows_across_calls(remote, local, tokens):
    def hook(act, hook):
        hook.ctx.setdefault("means", []).append(act.mean(0))

    site, point = "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_pattern"
    for _ in range(2):
        local.run_with_hooks(tokens, fwd_hooks=[(site, hook)])
    means_l = list(_ctx_snapshot(local, point)["means"])
    local.reset_hooks()
    for _ in range(2):
        remote.run_with_hooks(tokens, fwd_hooks=[(site, hook)])
    means_r = list(_ctx_snapshot(remote.model, point)["means"])
    remote.model.reset_hooks()
    assert len(means_r) == len(means_l) == 2
    for got, want in zip(means_r, means_l):
        assert_plain_tensor(got)
        assert_close(got, want)


def test_ctx_running_sum_built_from_previous_ctx_tensor(remote, local, tokens):
    def hook(act, hook):
        total = act.sum(0)
        if "total" in hook.ctx:
            total = total + hook.ctx["total"]
        hook.ctx["total"] = total

    site, point = "blocks.1.mlp.hook_post", "blocks.1.mlp.hook_post"
    for t in (tokens, tokens.flip(1), tokens):
        local.run_with_hooks(t, fwd_hooks=[(site, hook)])
    total_l = _ctx_snapshot(local, point)["total"]
    local.reset_hooks()
    for t in (tokens, tokens.flip(1), tokens):
        remote.run_with_hooks(t, fwd_hooks=[(site, hook)])
    total_r = _ctx_snapshot(remote.model, point)["total"]
    remote.model.reset_hooks()
    assert_plain_tensor(total_r)
    assert_close(total_r, total_l)


def test_hooks_context_reset_hooks_end_false_and_clear_contexts(remote, local, tokens):
    site, point = "blocks.0.hook_resid_post", "blocks.0.hook_out"
    with local.hooks(fwd_hooks=[(site, _counting_hook)], reset_hooks_end=False):
        local(tokens)
    kept_l = len(local.hook_dict[point]._forward_hooks)
    out_l = local(tokens)
    ctx_l = _ctx_snapshot(local, point)
    with local.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _ablate_head_1)], clear_contexts=True):
        ablated_l = local(tokens)
    local.reset_hooks()

    with remote.hooks(fwd_hooks=[(site, _counting_hook)], reset_hooks_end=False):
        remote(tokens)
    kept_r = len(remote.model.hook_dict[point]._forward_hooks)
    out_r = remote(tokens)
    ctx_r = _ctx_snapshot(remote.model, point)
    with remote.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _ablate_head_1)],
                      clear_contexts=True):
        ablated_r = remote(tokens)
    remote.model.reset_hooks()
    assert_no_hooks(remote.model)
    assert kept_r == kept_l == 1
    assert ctx_r["n"] == ctx_l["n"] == 2
    assert_close(ctx_r["last"], ctx_l["last"])
    assert_close(out_r, out_l)
    assert_close(ablated_r, ablated_l)


def test_nested_hooks_contexts(remote, local, tokens):
    with local.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _scale_resid)]):
        with local.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _ablate_head_1)]):
            both_l = local(tokens)
        outer_l = local(tokens)
    with remote.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _scale_resid)]):
        with remote.hooks(fwd_hooks=[("blocks.1.attn.hook_z", _ablate_head_1)]):
            both_r = remote(tokens)
        outer_r = remote(tokens)
    assert_no_hooks(remote.model)
    assert_close(both_r, both_l)
    assert_close(outer_r, outer_l)


def test_run_with_hooks_remove_batch_dim(remote, local, tokens):
    def make():
        store: dict = {}

        def hook(act, hook):
            store["shape"] = tuple(act.shape)
            store["act"] = act.clone()
            return act * 0.5

        return [("blocks.1.hook_resid_pre", hook)], store

    one = tokens[:1]
    hooks_l, store_l = make()
    expected = local.run_with_hooks(one, fwd_hooks=hooks_l, remove_batch_dim=True)
    hooks_r, store_r = make()
    got = remote.run_with_hooks(one, fwd_hooks=hooks_r, remove_batch_dim=True)
    assert store_r["shape"] == store_l["shape"] == (one.shape[1], local.cfg.d_model)
    assert_plain_tensor(store_r["act"])
    assert_close(store_r["act"], store_l["act"])
    assert_close(got, expected)


@ALSO_OUT_OF_PROCESS
@pytest.mark.parametrize("stop_at_layer", [1, -1])
def test_run_with_cache_stop_at_layer(remote, local, tokens, stop_at_layer):
    flt = lambda n: n.endswith(("hook_resid_pre", "hook_resid_post"))  # noqa: E731
    out_l, cache_l = local.run_with_cache(tokens, names_filter=flt, stop_at_layer=stop_at_layer)
    out_r, cache_r = remote.run_with_cache(tokens, names_filter=flt, stop_at_layer=stop_at_layer)
    assert_plain_tensor(out_r)
    assert out_r.shape == out_l.shape == (*tokens.shape, local.cfg.d_model)
    assert_close(out_r, out_l)
    assert_same_cache(cache_r, cache_l)
    assert_no_hooks(remote.model)


# ---- known failures (library bugs; see the report) ------------------------------------------------

@pytest.mark.parametrize("pos_slice", [-1, 2, [0, 3], (1, 4)], ids=["int_neg", "int", "list", "tuple"])
def test_run_with_cache_pos_slice(remote, local, tokens, pos_slice):
    """TL turns an int pos_slice into ``[int]`` and a list into a numpy array, then indexes the
    activation with it; the remote cache must keep the same shapes and values."""
    flt = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
    _, cache_l = local.run_with_cache(tokens, names_filter=flt, pos_slice=pos_slice)
    _, cache_r = remote.run_with_cache(tokens, names_filter=flt, pos_slice=pos_slice)
    assert_same_cache(cache_r, cache_l)


@pytest.mark.parametrize("index", [[-1], [0, 2]], ids=["one", "two"])
def test_numpy_array_index_in_a_hook(remote, local, tokens, index):
    """``act[:, np.array([...])]`` is advanced indexing (keeps the dim), not ``act[:, int]``."""
    import numpy as np

    def make():
        store: dict = {}

        def hook(act, hook):
            store["x"] = act[:, np.array(index)]

        return [("blocks.0.hook_resid_post", hook)], store

    hooks_l, store_l = make()
    local.run_with_hooks(tokens, fwd_hooks=hooks_l)
    hooks_r, store_r = make()
    remote.run_with_hooks(tokens, fwd_hooks=hooks_r)
    assert store_r["x"].shape == store_l["x"].shape
    assert_close(store_r["x"], store_l["x"])


def test_ctx_after_a_failed_remote_run_holds_no_proxy(remote, local, tokens):
    """A run that fails on the server must not leave tracing proxies in ``hook.ctx``: the next
    call reading the stored value must work (locally the value is a real tensor)."""
    from hookwire.errors import HookwireError
    from hookwire.trace import Proxy

    bad = torch.tensor([1000])

    def remember(act, hook):
        if "x" in hook.ctx:
            act = act - hook.ctx["x"]
        hook.ctx["x"] = act.mean()
        return act

    def fail(act, hook):
        return act + act[:, bad].mean()

    hooks = [("blocks.0.hook_resid_post", remember), ("blocks.1.hook_resid_post", fail)]
    with pytest.raises((HookwireError, IndexError)):
        remote.run_with_hooks(tokens, fwd_hooks=hooks)
    ctx = remote.model.hook_dict["blocks.0.hook_out"].ctx
    leaked = {k: type(v).__name__ for k, v in ctx.items() if isinstance(v, Proxy)}
    try:
        assert not leaked, f"proxies left in hook.ctx after a failed run: {leaked}"
        # and the next call (which reads ctx["x"] if it is there) runs
        remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", remember)])
    finally:
        remote.model.reset_hooks()
