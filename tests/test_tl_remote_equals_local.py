"""Remote ``run_with_hooks`` must give exactly what local TransformerLens gives.

Every test runs the same hook functions twice -- once on the local TL 4 bridge the server
hosts, once remotely -- and compares with ``torch.testing.assert_close`` at its default
(tight) float32 tolerances. Hooks that keep state (dicts, lists) are built fresh for each run
by a small ``make()`` factory, so the two runs cannot share anything but the weights.

Remote runs go through three front doors (``front``):
  * ``stand_in``     -- ``hookwire.transformerlens.RemoteModel(name).run_with_hooks(...)``;
  * ``bridge_true``  -- the local bridge, ``run_with_hooks(..., remote=True, remote_model=name)``
                        (server from ``hookwire.configure``);
  * ``bridge_url``   -- the local bridge, ``run_with_hooks(..., remote="ws://...")``.
"""
from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch.testing import assert_close

from conftest import MODEL_NAMES
from engines import ALSO_OUT_OF_PROCESS, EVERY_ENGINE

pytestmark = pytest.mark.filterwarnings("ignore:.*gated-off hook name.*")

FRONTS = ("stand_in", "bridge_true", "bridge_url")
# On the Ray and sharded engines (tests/engines.py) the local bridge runs through the URL
# spelling only: ``remote=True`` differs from it just in how the client finds the server.
FRONTS_ON_EMBEDDED_ONLY = ("bridge_true",)


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture(params=FRONTS)
def front(request):
    return request.param


@pytest.fixture
def local(local_models, name):
    return local_models[name]


@pytest.fixture
def remote_run(front, name, local_models, remote_models, server):
    """A function with run_with_hooks' signature that runs remotely via ``front``."""
    if front == "stand_in":
        model = remote_models[name]
        return model.run_with_hooks
    model = local_models[name]
    if front == "bridge_true":
        return functools.partial(model.run_with_hooks, remote=True, remote_model=name)
    return functools.partial(model.run_with_hooks, remote=server.url, remote_model=name)


@pytest.fixture
def remote_model(front, name, local_models, remote_models):
    """The model object whose hook points a remote run uses."""
    return remote_models[name] if front == "stand_in" else local_models[name]


def assert_plain_tensor(value):
    assert type(value) is torch.Tensor, f"expected a plain torch.Tensor, got {type(value)}"
    assert value.device.type == "cpu"


def assert_same_tensor_dict(remote: dict, local: dict):
    assert list(remote.keys()) == list(local.keys())
    for key in local:
        assert_plain_tensor(remote[key])
        assert_close(remote[key], local[key], msg=lambda m, key=key: f"{key}: {m}")


# ---- baseline ------------------------------------------------------------------------------

@EVERY_ENGINE
def test_no_hooks_gives_local_logits(remote_run, local, tokens):
    remote = remote_run(tokens, fwd_hooks=[])
    expected = local(tokens)
    assert_plain_tensor(remote)
    assert remote.shape == (tokens.shape[0], tokens.shape[1], local.cfg.d_vocab)
    assert_close(remote, expected)


# ---- 1. head ablation in place on hook_z -----------------------------------------------------

@EVERY_ENGINE
@pytest.mark.parametrize("layer,head", [(0, 0), (0, 2), (1, 3)])
def test_head_ablation_in_place_hook_z(remote_run, local, tokens, layer, head):
    def ablate_head(z, hook):
        z[:, :, head, :] = 0

    hooks = [(f"blocks.{layer}.attn.hook_z", ablate_head)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    remote = remote_run(tokens, fwd_hooks=hooks)
    assert_plain_tensor(remote)
    assert_close(remote, expected)
    # The ablation must actually change something, or the comparison proves nothing.
    assert not torch.allclose(expected, local(tokens))


def test_several_heads_ablated_with_index_list_and_local_mask(remote_run, local, tokens):
    mask = torch.tensor([True, False, True, False])

    def ablate_list(z, hook):
        z[:, :, [1, 3], :] = 0

    def ablate_mask(z, hook):
        z[:, :, mask] = 0.0

    hooks = [("blocks.0.attn.hook_z", ablate_list), ("blocks.1.attn.hook_z", ablate_mask)]
    assert_close(remote_run(tokens, fwd_hooks=hooks), local.run_with_hooks(tokens, fwd_hooks=hooks))


# ---- 2. hooks returning a new tensor -------------------------------------------------------

def test_return_scaled_resid_pre(remote_run, local, tokens):
    def halve(act, hook):
        return act * 0.5

    hooks = [("blocks.1.hook_resid_pre", halve)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)
    assert not torch.allclose(expected, local(tokens))


def test_return_zeroed_q(remote_run, local, tokens):
    def kill_q(q, hook):
        return q * 0

    hooks = [("blocks.0.attn.hook_q", kill_q)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)
    assert not torch.allclose(expected, local(tokens))


def test_return_new_tensor_on_every_layer_resid_post(remote_run, local, tokens):
    def shift(act, hook):
        return act - act.mean(dim=-1, keepdim=True) + 0.1

    hooks = [(lambda n: n.endswith("hook_resid_post"), shift)]
    assert_close(remote_run(tokens, fwd_hooks=hooks), local.run_with_hooks(tokens, fwd_hooks=hooks))


# ---- 3. results land in the user's own containers ------------------------------------------

def _make_storing_hooks():
    cache: dict = {}
    acts: list = []

    def store(act, hook):
        cache[hook.name] = act.detach()

    def append_mean(act, hook):
        acts.append(act.mean(0))

    hooks = [("blocks.0.hook_resid_pre", store), ("blocks.1.attn.hook_pattern", store),
             ("blocks.0.hook_resid_post", append_mean), ("blocks.1.mlp.hook_post", append_mean),
             ("ln_final.hook_normalized", store)]
    return hooks, cache, acts


@EVERY_ENGINE
def test_store_in_outer_dict_and_list(remote_run, local, tokens):
    hooks_l, cache_l, acts_l = _make_storing_hooks()
    logits_l = local.run_with_hooks(tokens, fwd_hooks=hooks_l)
    hooks_r, cache_r, acts_r = _make_storing_hooks()
    logits_r = remote_run(tokens, fwd_hooks=hooks_r)

    assert_close(logits_r, logits_l)
    assert len(cache_l) == 3 and len(acts_l) == 2
    assert_same_tensor_dict(cache_r, cache_l)
    assert len(acts_r) == len(acts_l)
    for got, want in zip(acts_r, acts_l):
        assert_plain_tensor(got)
        assert_close(got, want)


def test_store_before_and_after_an_in_place_edit(remote_run, local, tokens):
    def make():
        store: dict = {}

        def hook(act, hook):
            store["before"] = act.clone()
            act[:, 1] = 0  # (position 0 is BOS = pad id: all zeros in tiny-llama)
            store["after"] = act
            store["slice_view"] = act[:, 1:3]

        return [("blocks.1.hook_resid_pre", hook)], store

    hooks_l, store_l = make()
    hooks_r, store_r = make()
    assert_close(remote_run(tokens, fwd_hooks=hooks_r), local.run_with_hooks(tokens, fwd_hooks=hooks_l))
    assert_same_tensor_dict(store_r, store_l)
    assert not torch.equal(store_l["before"], store_l["after"])


class _Box:
    pass


def _run_pair(remote_run, local, tokens, make, site="blocks.0.hook_resid_post"):
    """Run a factory's hook locally and remotely; return (local_state, remote_state)."""
    hook_l, state_l = make()
    hook_r, state_r = make()
    logits_l = local.run_with_hooks(tokens, fwd_hooks=[(site, hook_l)])
    logits_r = remote_run(tokens, fwd_hooks=[(site, hook_r)])
    assert_close(logits_r, logits_l)
    return state_l, state_r


def test_store_on_an_object_attribute(remote_run, local, tokens):
    def make():
        box = _Box()

        def hook(act, hook):
            box.value = act.sum(-1)

        return hook, box

    box_l, box_r = _run_pair(remote_run, local, tokens, make)
    assert_plain_tensor(box_r.value)
    assert_close(box_r.value, box_l.value)


def test_store_tuples_inside_a_list_inside_a_dict(remote_run, local, tokens):
    def make():
        nested = {"pairs": []}

        def hook(act, hook):
            nested["pairs"].append((act[:, 1], act[:, -1]))

        return hook, nested

    nested_l, nested_r = _run_pair(remote_run, local, tokens, make)
    (a_r, b_r), = nested_r["pairs"]
    (a_l, b_l), = nested_l["pairs"]
    for got, want in ((a_r, a_l), (b_r, b_l)):
        assert_plain_tensor(got)
        assert_close(got, want)


def test_store_in_a_closure_variable(remote_run, local, tokens):
    def make():
        saved = None

        def hook(act, hook):
            nonlocal saved
            saved = act.max(dim=-1).values

        return hook, lambda: saved

    get_l, get_r = _run_pair(remote_run, local, tokens, make)
    assert_plain_tensor(get_r())
    assert_close(get_r(), get_l())


# ---- 4. activation patching with functools.partial -------------------------------------------

def patch_position(act, hook, pos, cache):
    act[:, pos, :] = cache[hook.name][:, pos, :]


def patch_position_return(act, hook, pos, cache):
    out = act.clone()
    out[:, pos] = cache[hook.name][:, pos]
    return out


@EVERY_ENGINE
@pytest.mark.parametrize("cache_kind", ["activation_cache", "plain_dict"])
@pytest.mark.parametrize("patch_fn", [patch_position, patch_position_return])
def test_activation_patching_with_partial(remote_run, local, clean_corrupt_tokens, cache_kind,
                                          patch_fn):
    clean, corrupt = clean_corrupt_tokens
    _, clean_cache = local.run_with_cache(clean)
    if cache_kind == "plain_dict":
        clean_cache = {k: v.clone() for k, v in clean_cache.items()}
    else:
        assert type(clean_cache).__name__ == "ActivationCache"
    hooks = [(f"blocks.{layer}.hook_resid_pre", functools.partial(patch_fn, pos=pos,
                                                                  cache=clean_cache))
             for layer, pos in ((0, 3), (1, 5))]
    expected = local.run_with_hooks(corrupt, fwd_hooks=hooks)
    remote = remote_run(corrupt, fwd_hooks=hooks)
    assert_close(remote, expected)
    assert not torch.allclose(expected, local(corrupt))


def test_patching_a_whole_layer_from_a_dict_built_by_a_caching_hook(remote_run, local,
                                                                      clean_corrupt_tokens):
    clean, corrupt = clean_corrupt_tokens
    clean_cache: dict = {}

    def cache_hook(act, hook):
        clean_cache[hook.name] = act.detach().clone()

    local.run_with_hooks(clean, fwd_hooks=[("blocks.0.hook_resid_post", cache_hook)])
    assert list(clean_cache) == ["blocks.0.hook_out"]

    def replace(act, hook, cache):
        return cache[hook.name]

    hooks = [("blocks.0.hook_resid_post", functools.partial(replace, cache=clean_cache))]
    expected = local.run_with_hooks(corrupt, fwd_hooks=hooks)
    assert_close(remote_run(corrupt, fwd_hooks=hooks), expected)
    # Patching the whole residual stream after block 0 makes block 1 see the clean run's.
    assert_close(expected[:, -1], local(clean)[:, -1], atol=1e-4, rtol=1e-4)


# ---- 5. names filters ----------------------------------------------------------------------

def _make_caching_hook():
    cache: dict = {}
    calls: list = []

    def cache_hook(act, hook):
        calls.append(hook.name)
        cache[hook.name] = act.detach()

    return cache_hook, cache, calls


FILTERS = {
    "string_alias": "blocks.0.hook_resid_post",
    "string_canonical": "blocks.1.hook_in",
    "string_hook_z": "blocks.1.attn.hook_z",
    "list": ["blocks.0.hook_resid_pre", "blocks.1.attn.hook_pattern", "hook_embed",
             "ln_final.hook_normalized", "blocks.0.mlp.hook_post"],
    "callable_resid_post": lambda n: n.endswith("hook_resid_post"),
    "callable_pattern": lambda n: "attn.hook_pattern" in n,
    "callable_alias_and_canonical": lambda n: n in ("blocks.0.hook_resid_pre", "blocks.0.hook_in"),
    "callable_layer_1": lambda n: n.startswith("blocks.1."),
    "callable_everything": lambda n: True,
}


def _hooks_for_filter(flt, hook_fn):
    if isinstance(flt, list):
        return [(n, hook_fn) for n in flt]
    return [(flt, hook_fn)]


@pytest.mark.parametrize("filter_id", list(FILTERS))
def test_names_filter_keys_and_values(remote_run, local, tokens, filter_id):
    flt = FILTERS[filter_id]
    hook_l, cache_l, calls_l = _make_caching_hook()
    logits_l = local.run_with_hooks(tokens, fwd_hooks=_hooks_for_filter(flt, hook_l))
    hook_r, cache_r, calls_r = _make_caching_hook()
    logits_r = remote_run(tokens, fwd_hooks=_hooks_for_filter(flt, hook_r))

    assert cache_l, "the filter matched nothing locally: the test would prove nothing"
    assert set(cache_r) == set(cache_l)
    assert list(cache_r) == list(cache_l)
    assert sorted(calls_r) == sorted(calls_l)  # each hook point once, however many aliases
    assert_same_tensor_dict(cache_r, cache_l)
    assert_close(logits_r, logits_l)


def test_names_seen_by_hooks_are_tl_canonical_names(remote_run, tokens):
    hook_r, cache_r, _ = _make_caching_hook()
    remote_run(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", hook_r),
                                  ("blocks.0.hook_resid_post", hook_r),
                                  ("hook_embed", hook_r)])
    assert set(cache_r) == {"blocks.0.hook_in", "blocks.0.hook_out", "embed.hook_out"}


# ---- 6. hook_pattern, several hooks on a site, hook.name / hook.layer(), return types --------

@pytest.mark.parametrize("edit", ["zero_head", "scale", "uniform_last_row"])
def test_edit_hook_pattern_in_place(remote_run, local, tokens, edit):
    def edit_pattern(pattern, hook):
        if edit == "zero_head":
            pattern[:, 1] = 0
        elif edit == "scale":
            pattern *= 0.5
        else:
            seq = pattern.shape[-1]
            pattern[:, :, -1, :] = 1.0 / seq

    hooks = [(f"blocks.{layer}.attn.hook_pattern", edit_pattern) for layer in (0, 1)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)
    assert not torch.allclose(expected, local(tokens))


def _ordered_hooks():
    def double_in_place(act, hook):
        act.mul_(2)

    def add_one(act, hook):
        return act + 1

    def zero_first_position(act, hook):
        act[:, 0] = 0

    def triple(act, hook):
        return act * 3

    return [double_in_place, add_one, zero_first_position, triple]


@pytest.mark.parametrize("order", ["forward", "reversed", "interleaved"])
def test_several_hooks_on_one_site_run_in_order(remote_run, local, tokens, order):
    fns = _ordered_hooks()
    if order == "reversed":
        fns = fns[::-1]
    elif order == "interleaved":
        fns = [fns[1], fns[0], fns[3], fns[2]]
    hooks = [("blocks.1.hook_resid_pre", fn) for fn in fns]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)


def test_hook_order_matters_locally(local, tokens):
    """Sanity check of the previous test: the orders really give different results."""
    fns = _ordered_hooks()
    a = local.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", f) for f in fns])
    b = local.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", f) for f in fns[::-1]])
    assert not torch.allclose(a, b)


def test_hook_name_and_layer_inside_hook_bodies(remote_run, local, tokens):
    def make():
        seen: list = []

        def hook(act, hook):
            seen.append((hook.name, hook.layer()))
            return act * (hook.layer() + 1) if hook.name.endswith("hook_in") else act - hook.layer()

        return [(lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_post"),
                 hook)], seen

    hooks_l, seen_l = make()
    hooks_r, seen_r = make()
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks_l)
    remote = remote_run(tokens, fwd_hooks=hooks_r)
    assert sorted(seen_r) == sorted(seen_l)
    assert ("blocks.1.hook_in", 1) in seen_l
    assert_close(remote, expected)


def test_hook_name_used_as_a_branch(remote_run, local, tokens):
    def hook(act, hook):
        if hook.name == "blocks.0.hook_out":
            act[:, :, :8] = 0
        elif hook.layer() == 1:
            return act.flip(-1)

    hooks = [(lambda n: n.endswith("hook_resid_post"), hook)]
    assert_close(remote_run(tokens, fwd_hooks=hooks), local.run_with_hooks(tokens, fwd_hooks=hooks))


def _halve_z(z, hook):
    z[:, :, 0] = z[:, :, 0] * 0.5


@EVERY_ENGINE
@pytest.mark.parametrize("return_type", ["logits", "loss", "both", None])
def test_return_types(remote_run, local, tokens, return_type):
    def make():
        store: dict = {}

        def save(act, hook):
            store[hook.name] = act.detach()

        return [("blocks.0.attn.hook_z", _halve_z), ("blocks.0.hook_resid_post", save)], store

    hooks_l, store_l = make()
    hooks_r, store_r = make()
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks_l, return_type=return_type)
    remote = remote_run(tokens, fwd_hooks=hooks_r, return_type=return_type)
    if return_type is None:
        assert expected is None and remote is None
    elif return_type == "both":
        assert isinstance(remote, tuple) and len(remote) == 2
        assert_close(remote[0], expected[0])
        assert_close(remote[1], expected[1])
        assert remote[1].dim() == 0
    else:
        assert_plain_tensor(remote)
        assert_close(remote, expected)
        if return_type == "loss":
            assert remote.dim() == 0
    assert_same_tensor_dict(store_r, store_l)


@ALSO_OUT_OF_PROCESS
def test_loss_per_token(remote_run, local, tokens):
    hooks = [("blocks.0.attn.hook_z", _halve_z)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks, return_type="loss",
                                    loss_per_token=True)
    remote = remote_run(tokens, fwd_hooks=hooks, return_type="loss", loss_per_token=True)
    assert remote.shape == expected.shape == (tokens.shape[0], tokens.shape[1] - 1)
    assert_close(remote, expected)


# ---- text input, in-place ops, captured tensors, reductions -----------------------------------

@pytest.mark.parametrize("text", ["hello world", ["hello world", "goodbye moon"]])
def test_text_input(remote_run, local, text):
    def ablate(z, hook):
        z[:, :, 1, :] = 0

    hooks = [("blocks.0.attn.hook_z", ablate)]
    expected = local.run_with_hooks(text, fwd_hooks=hooks)
    remote = remote_run(text, fwd_hooks=hooks)
    assert remote.shape == expected.shape
    assert_close(remote, expected)


def _ip_add(act, hook):
    act += 1


def _ip_mul(act, hook):
    act.mul_(2)


def _ip_copy_position(act, hook):
    act[:, -1] = act[:, 0]


def _ip_sub_mean(act, hook):
    act -= act.mean(-1, keepdim=True)


def _ip_normalize(act, hook):
    act /= act.norm(dim=-1, keepdim=True) + 1e-6


def _ip_clamp(act, hook):
    act.clamp_(-0.05, 0.05)


def _ip_add_alpha(act, hook):
    act.add_(torch.ones_like(act), alpha=0.25)


def _ip_zero(act, hook):
    act[:, 2:4].zero_()


def _ip_masked_fill(act, hook):
    act.masked_fill_(act > 0, 0.0)


def _ip_copy_from_local(act, hook):
    act[0].copy_(torch.full(act[0].shape, 0.01))


def _ip_view_edit(act, hook):
    v = act.view(act.shape[0], act.shape[1], 4, -1)
    v[:, :, 2] = 0


def _ip_transpose_edit(act, hook):
    t = act.transpose(0, 1)
    t[1] *= 3


IN_PLACE = [_ip_add, _ip_mul, _ip_copy_position, _ip_sub_mean, _ip_normalize, _ip_clamp,
            _ip_add_alpha, _ip_zero, _ip_masked_fill, _ip_copy_from_local, _ip_view_edit,
            _ip_transpose_edit]


@ALSO_OUT_OF_PROCESS
@pytest.mark.parametrize("fn", IN_PLACE, ids=lambda f: f.__name__)
def test_in_place_ops(remote_run, local, tokens, fn):
    hooks = [("blocks.1.hook_resid_pre", fn)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)
    assert not torch.allclose(expected, local(tokens))


def test_einsum_and_matmul_with_captured_local_tensors(remote_run, local, tokens):
    g = torch.Generator().manual_seed(1234)
    d_model = local.cfg.d_model
    direction = torch.randn(d_model, generator=g)
    direction = direction / direction.norm()
    W = torch.eye(d_model) + 0.05 * torch.randn(d_model, d_model, generator=g)

    def project_out(act, hook):
        coef = torch.einsum("bsd,d->bs", act, direction)
        return act - coef[..., None] * direction

    def rotate(act, hook):
        return act @ W

    def einsum_rotate(act, hook):
        return torch.einsum("bsd,de->bse", act, W.T)

    def matmul_fn(act, hook):
        act[:] = torch.matmul(act, W)

    hooks = [("blocks.0.hook_resid_pre", project_out), ("blocks.0.hook_resid_post", rotate),
             ("blocks.1.hook_resid_pre", einsum_rotate), ("blocks.1.hook_resid_post", matmul_fn)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)
    assert not torch.allclose(expected, local(tokens))


def test_fresh_local_tensors_built_inside_hooks(remote_run, local, tokens):
    """Each freshly built local tensor is its own constant, even after the previous one was
    freed (so Python may hand its id() to the next one)."""
    d_model = local.cfg.d_model

    def hook(act, hook):
        for i in range(8):
            act = act + torch.full((d_model,), 0.01 * (i + 1))
        return act

    hooks = [(lambda n: n.endswith("hook_resid_pre"), hook)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)


def test_topk_argmax_softmax_saved_to_dict(remote_run, local, tokens):
    def make():
        store: dict = {}

        def hook(act, hook):
            vals, idx = act.topk(3, dim=-1)
            store["topk_values"] = vals
            store["topk_indices"] = idx
            store["argmax"] = act.argmax(dim=-1)
            store["softmax"] = torch.softmax(act, -1)
            store["log_softmax"] = act.log_softmax(-1)
            store["max"] = act.max(dim=1).values
            store["sum_sq"] = act.pow(2).sum(-1)
            store["where"] = torch.where(act > 0, act, torch.zeros_like(act))

        return [("ln_final.hook_normalized", hook)], store

    hooks_l, store_l = make()
    hooks_r, store_r = make()
    local.run_with_hooks(tokens, fwd_hooks=hooks_l)
    remote_run(tokens, fwd_hooks=hooks_r)
    assert_same_tensor_dict(store_r, store_l)
    assert store_r["topk_indices"].dtype == torch.int64
    assert store_r["argmax"].shape == tokens.shape


# ---- hooks are removed after the call --------------------------------------------------------

HOOKED_POINTS = ["blocks.0.hook_in", "blocks.0.attn.hook_pattern", "blocks.1.hook_out"]


def test_hooks_reset_after_call(remote_run, remote_model, tokens):
    def noop(act, hook):
        return None

    hooks = [("blocks.0.hook_resid_pre", noop), ("blocks.0.attn.hook_pattern", noop),
             (lambda n: n == "blocks.1.hook_resid_post", noop)]
    remote_run(tokens, fwd_hooks=hooks)
    for point in HOOKED_POINTS:
        assert len(remote_model.hook_dict[point]._forward_hooks) == 0, point
    assert len(remote_model.hook_dict["blocks.0.hook_resid_pre"]._forward_hooks) == 0


@ALSO_OUT_OF_PROCESS
def test_hooks_reset_after_a_failed_trace(remote_run, remote_model, tokens):
    from hookwire.errors import TraceError

    def bad(act, hook):
        return act.tolist()

    with pytest.raises(TraceError):
        remote_run(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", bad)])
    assert len(remote_model.hook_dict["blocks.0.hook_in"]._forward_hooks) == 0


def test_same_hooks_run_twice_give_same_result(remote_run, local, tokens):
    """Nothing from one remote run leaks into the next (stale proxies, cached graphs)."""
    cache1: dict = {}
    cache2: dict = {}

    def make(cache):
        def hook(act, hook):
            cache[hook.name] = act * 2
            act[:, 1] = 0
        return [("blocks.0.hook_resid_pre", hook)]

    r1 = remote_run(tokens, fwd_hooks=make(cache1))
    r2 = remote_run(tokens, fwd_hooks=make(cache2))
    assert_close(r1, r2)
    assert_close(cache1["blocks.0.hook_in"], cache2["blocks.0.hook_in"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(r1, local.run_with_hooks(tokens, fwd_hooks=make({})))


# ---- everyday spellings: keyword arguments and norms -----------------------------------------

SPELLINGS = {
    "softmax_dim_kw": lambda a: torch.softmax(a, dim=-1),
    "method_softmax_dim_kw": lambda a: a.softmax(dim=-1),
    "F_softmax_dim_kw": lambda a: torch.nn.functional.softmax(a, dim=-1),
    "log_softmax_dim_kw": lambda a: a.log_softmax(dim=-1),
    "unsqueeze_dim_kw": lambda a: a.unsqueeze(dim=0)[0],
    "transpose_kw": lambda a: a.transpose(dim0=0, dim1=1).transpose(0, 1),
    "topk_k_kw": lambda a: a + a.topk(k=3, dim=-1).values.sum(-1, keepdim=True),
    "norm_method": lambda a: a / (a.norm(dim=-1, keepdim=True) + 1e-6),
    "norm_full": lambda a: a / a.norm(),
    "torch_norm": lambda a: a / (torch.norm(a, dim=-1, keepdim=True) + 1e-6),
    "norm_p1": lambda a: a / (a.norm(p=1, dim=-1, keepdim=True) + 1e-6),
}


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_everyday_spellings(remote_run, local, tokens, spelling):
    """Keyword spellings TL users write every day must trace and validate."""
    fn = SPELLINGS[spelling]

    def hook(act, hook):
        return fn(act)

    hooks = [("blocks.1.hook_resid_pre", hook)]
    expected = local.run_with_hooks(tokens, fwd_hooks=hooks)
    assert_close(remote_run(tokens, fwd_hooks=hooks), expected)


# ---- every commonly hooked site, both families -----------------------------------------------

COMMON_SITES = ["hook_embed", "blocks.0.ln1.hook_normalized",
                "blocks.0.ln1.hook_scale", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k",
                "blocks.0.attn.hook_v", "blocks.0.attn.hook_attn_scores",
                "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z", "blocks.0.hook_attn_out",
                "blocks.0.hook_resid_mid", "blocks.0.mlp.hook_pre", "blocks.1.mlp.hook_post",
                "blocks.1.hook_mlp_out", "blocks.1.hook_resid_post", "ln_final.hook_normalized",
                "blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"]


@pytest.mark.parametrize("site", COMMON_SITES)
def test_edit_and_cache_at_common_sites(remote_run, local, tokens, site):
    def make():
        store: dict = {}

        def hook(act, hook):
            store[hook.name] = act.clone()
            act[..., 0] = act[..., 0] * 0.5 + 0.01

        return [(site, hook)], store

    hooks_l, store_l = make()
    hooks_r, store_r = make()
    try:
        expected = local.run_with_hooks(tokens, fwd_hooks=hooks_l)
    except KeyError:  # the site does not exist on this family: remote must say the same
        with pytest.raises(KeyError):
            remote_run(tokens, fwd_hooks=hooks_r)
        return
    remote = remote_run(tokens, fwd_hooks=hooks_r)
    assert store_l, f"{site} never fired locally"
    assert_same_tensor_dict(store_r, store_l)
    assert_close(remote, expected)


# ---- the weightless stand-in looks like the local model ----------------------------------------

def test_stand_in_matches_local_model(remote_models, local_models, name, tokens):
    remote, local = remote_models[name], local_models[name]
    assert all(p.device.type == "meta" for p in remote.parameters())
    assert list(remote.hook_dict) == list(local.hook_dict)
    assert {k: hp.name for k, hp in remote.hook_dict.items()} == \
        {k: hp.name for k, hp in local.hook_dict.items()}
    for key in ("d_model", "n_layers", "n_heads", "d_head", "d_vocab", "n_ctx"):
        assert getattr(remote.cfg, key) == getattr(local.cfg, key), key
    assert torch.equal(remote.to_tokens(["hello world", "abcdefghij!"]), tokens)
    assert remote.to_string(tokens[0, 1:]) == local.to_string(tokens[0, 1:])


# ---- streaming: tensors bigger than one 1 MiB chunk, both directions ---------------------------

@ALSO_OUT_OF_PROCESS
def test_large_constants_and_saves_stream_in_chunks(remote_run, local):
    g = torch.Generator().manual_seed(7)
    toks = torch.randint(0, 256, (8, 160), generator=g)
    d_model = local.cfg.d_model
    big = torch.randn(160, d_model, generator=g) * 0.01  # plus logits 8x160x257 fp32 > 1 MiB
    big_w = torch.randn(d_model, 4500, generator=g)  # 1.1 MiB captured constant

    def make():
        store: dict = {}

        def hook(act, hook):
            store["pattern"] = act  # 8 x heads x 160 x 160 fp32 = 3.3 MiB

        def add_big(act, hook):
            return act + big + big_w[:, 7]

        return [("blocks.0.attn.hook_pattern", hook), ("blocks.1.hook_resid_pre", add_big)], store

    hooks_l, store_l = make()
    hooks_r, store_r = make()
    expected = local.run_with_hooks(toks, fwd_hooks=hooks_l)
    remote = remote_run(toks, fwd_hooks=hooks_r)
    assert expected.numel() * 4 > (1 << 20)
    assert_close(remote, expected)
    assert_same_tensor_dict(store_r, store_l)


# ---- errors on the server come back typed; the next run is fine ----------------------------------

@ALSO_OUT_OF_PROCESS
def test_out_of_range_index_fails_typed_not_silently(remote_run, local, tokens):
    from hookwire.errors import HookwireError
    bad_index = torch.tensor([1000])

    def hook(act, hook):
        return act + act[:, bad_index].mean()

    with pytest.raises(IndexError):
        local.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", hook)])
    with pytest.raises((HookwireError, IndexError)):
        remote_run(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", hook)])
    assert_close(remote_run(tokens, fwd_hooks=[]), local(tokens))


# ---- threads: several users of one process at once ----------------------------------------------

@ALSO_OUT_OF_PROCESS
def test_concurrent_remote_runs_from_threads(name, local_models, server, tokens):
    """Each thread has its own stand-in (TL hooks live on the model object, so sharing one model
    between threads is unsafe locally too); connection and tracing are shared machinery."""
    from concurrent.futures import ThreadPoolExecutor

    import hookwire.transformerlens as htl

    local = local_models[name]
    stand_ins = [htl.RemoteModel(name) for _ in range(4)]

    def job(k):
        store: dict = {}

        def hook(act, hook):
            store["x"] = act[:, 1] * (k + 1)
            return act * (0.5 + 0.1 * k)

        model = stand_ins[k % len(stand_ins)]
        return k, model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", hook)]), store

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(job, range(4)))
    for k, logits, store in results:
        seen: dict = {}

        def hook(act, hook, k=k):
            seen["x"] = act[:, 1] * (k + 1)
            return act * (0.5 + 0.1 * k)

        expected = local.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", hook)])
        assert_close(logits, expected)
        assert_plain_tensor(store["x"])
        assert_close(store["x"], seen["x"])
