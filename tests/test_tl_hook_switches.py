"""TL's hook switches (``set_use_split_qkv_input``, ``set_use_attn_result``,
``set_use_attn_in``, ``set_use_hook_mlp_in``) travel with a remote request: the gated hook
points fire on the server as they do locally, and results equal TL's local run."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hookwire.errors import GraphValidationError
from hookwire.graph import TL_HOOK_FLAGS

MODELS = ("tiny-gpt2", "tiny-llama")

# switch -> hook names it makes fire, and a patch that changes the output through it
GATED = {
    "use_split_qkv_input": ("blocks.0.attn.hook_q_input", "blocks.1.attn.hook_k_input",
                            "blocks.1.attn.hook_v_input"),
    "use_attn_result": ("blocks.0.attn.hook_result", "blocks.1.attn.hook_result"),
    "use_attn_in": ("blocks.0.attn.hook_attn_in", "blocks.1.attn.hook_attn_in"),
    "use_hook_mlp_in": ("blocks.0.hook_mlp_in", "blocks.1.hook_mlp_in"),
}


@pytest.fixture
def switches_off(local_models, remote_models):
    yield
    for models in (local_models, remote_models):
        for model in models.values():
            for flag in TL_HOOK_FLAGS:
                getattr(model, f"set_{flag}")(False)


def _store(cache):
    def hook(act, hook):
        cache[hook.name] = act.detach().clone()
    return hook


def _zero_head(act, hook):
    act[:, :, 1] = 0  # in place, head 1 (these points are [batch, pos, head, ...])


def _scale(act, hook):
    return act * 0.5


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("flag", sorted(GATED))
@pytest.mark.parametrize("which", ["stand_in", "local_bridge"])
def test_gated_hooks_fire_and_patch_remotely(local_models, remote_models, switches_off,
                                             name, flag, which):
    local = local_models[name]
    model = remote_models[name] if which == "stand_in" else local
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    names = GATED[flag]
    patch = _zero_head if flag != "use_hook_mlp_in" else _scale
    getattr(model, f"set_{flag}")(True)
    got, want = {}, {}
    kwargs = {} if which == "stand_in" else {"remote": True}
    out = model.run_with_hooks(tokens, fwd_hooks=[(names[0], patch)] +
                               [(n, _store(got)) for n in names], **kwargs)
    if which == "stand_in":
        getattr(local, f"set_{flag}")(True)
    expected = local.run_with_hooks(tokens, fwd_hooks=[(names[0], patch)] +
                                    [(n, _store(want)) for n in names])
    assert sorted(got) == sorted(want) == sorted(names)  # every gated hook fired remotely
    for key in want:
        assert type(got[key]) is torch.Tensor
        assert_close(got[key], want[key])
    assert_close(out, expected)
    # the patch changed the output, so a hook that silently did nothing would be caught
    getattr(local, f"set_{flag}")(False)
    assert not torch.allclose(expected, local(tokens))


@pytest.mark.parametrize("name", MODELS)
def test_run_with_cache_with_every_compatible_switch(local_models, remote_models,
                                                     switches_off, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world"])
    for model in (local, remote):
        model.set_use_attn_result(True)
        model.set_use_split_qkv_input(True)
        model.set_use_hook_mlp_in(True)
    got_out, got = remote.run_with_cache(tokens)
    want_out, want = local.run_with_cache(tokens)
    assert_close(got_out, want_out)
    assert list(got.keys()) == list(want.keys())
    assert any(k.endswith("hook_q_input") for k in want.keys())
    for key in want.keys():
        assert_close(got[key], want[key])


@pytest.mark.parametrize("name", MODELS)
def test_switches_are_the_requests_own(local_models, remote_models, switches_off, name):
    """A request with switches on, then one without: the second sees the model as it is by
    default (the server put its switches back), and both equal local runs."""
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["abc def"])
    remote.set_use_attn_in(True)
    seen = {}
    remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_attn_in", _store(seen))])
    remote.set_use_attn_in(False)
    assert not local.cfg.use_attn_in  # the hosted object is back as it was
    _, got = remote.run_with_cache(tokens)
    _, want = local.run_with_cache(tokens)
    assert list(got.keys()) == list(want.keys())
    assert not any(k.endswith("hook_attn_in") for k in got.keys())
    assert seen["blocks.0.attn.hook_attn_in"].shape[2] == local.cfg.n_heads


def test_unknown_switch_combination_is_refused_with_a_typed_error(server):
    """The server refuses what TL refuses (both q/k/v splits and attn_in on)."""
    from hookwire.client import get_connection

    conn = get_connection(server.url)
    with pytest.raises(GraphValidationError, match="use_attn_in"):
        conn.model_info("tiny-gpt2", ("use_attn_in", "use_split_qkv_input"))
    # the connection is still usable
    assert conn.model_info("tiny-gpt2", ("use_attn_in",)).tl_flags == {"use_attn_in"}
