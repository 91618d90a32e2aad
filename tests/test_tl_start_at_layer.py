"""start_at_layer in remote runs equals TL's local run: the input is the residual entering
block k; TL's own methods decide which hooks are added (run_with_hooks / run_with_cache skip
blocks below k and the embedding stage), the server runs TL's own forward from that residual.
And stop_at_layer on a plain forward inside ``hooks(..., remote=True)`` returns the residual,
as TL's forward does."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

MODELS = ("tiny-gpt2", "tiny-llama")


def _double(act, hook):
    return act * 2


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("start", [0, 1, -1])
@pytest.mark.parametrize("which", ["stand_in", "local_bridge"])
def test_run_with_cache_from_a_residual(local_models, remote_models, name, start, which):
    local = local_models[name]
    model = remote_models[name] if which == "stand_in" else local
    kwargs = {} if which == "stand_in" else {"remote": True}
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    full_logits, full_cache = local.run_with_cache(tokens)
    k = start % local.cfg.n_layers
    resid = full_cache[f"blocks.{k}.hook_in"]
    got_logits, got = model.run_with_cache(resid, start_at_layer=start, **kwargs)
    want_logits, want = local.run_with_cache(resid, start_at_layer=start)
    assert_close(got_logits, want_logits)
    assert_close(got_logits, full_logits, atol=1e-5, rtol=1e-5)  # the round trip TL promises
    assert list(got.keys()) == list(want.keys())
    assert not any(key.startswith(f"blocks.{b}.") for b in range(k) for key in got.keys())
    for key in want.keys():
        assert_close(got[key], want[key])


@pytest.mark.parametrize("name", MODELS)
def test_run_with_hooks_from_a_residual_with_hooks_on_later_blocks(local_models,
                                                                   remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["abc def ghi"])
    _, cache = local.run_with_cache(tokens)
    resid = cache["blocks.1.hook_in"]
    seen = {"remote": [], "local": []}

    def spy(key):
        def hook(act, hook):
            seen[key].append(hook.name)
        return hook
    fwd = lambda key: [("blocks.1.hook_resid_mid", _double),  # noqa: E731
                       ("blocks.0.hook_resid_post", _double),  # below the start: TL skips it
                       (lambda n: n.endswith("hook_out"), spy(key))]
    got = remote.run_with_hooks(resid, start_at_layer=1, fwd_hooks=fwd("remote"))
    want = local.run_with_hooks(resid, start_at_layer=1, fwd_hooks=fwd("local"))
    assert_close(got, want)
    assert seen["remote"] == seen["local"] and seen["local"]
    # the hook on block 1 changed the output: a hook that did nothing would be caught
    assert not torch.allclose(want, local(resid, start_at_layer=1))


@pytest.mark.parametrize("name", MODELS)
def test_start_and_stop_bound_a_subrange(local_models, remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello"])
    _, cache = local.run_with_cache(tokens)
    resid = cache["blocks.0.hook_in"]
    got = remote.run_with_hooks(resid, start_at_layer=0, stop_at_layer=1,
                                fwd_hooks=[("blocks.0.hook_resid_mid", _double)])
    want = local.run_with_hooks(resid, start_at_layer=0, stop_at_layer=1,
                                fwd_hooks=[("blocks.0.hook_resid_mid", _double)])
    assert_close(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_start_at_layer_errors_as_local(local_models, remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello"])
    _, cache = local.run_with_cache(tokens)
    resid = cache["blocks.1.hook_in"]
    with pytest.raises(ValueError, match="out of range"):
        local(resid, start_at_layer=5)
    with pytest.raises(ValueError, match="out of range"):
        remote(resid, start_at_layer=5)
    with pytest.raises(ValueError, match="residual-stream tensor"):
        remote(tokens, start_at_layer=1)
    with pytest.raises(ValueError):
        local(resid, start_at_layer=1, return_type="loss")
    with pytest.raises(ValueError, match="token IDs required"):
        remote(resid, start_at_layer=1, return_type="loss")


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stop", [1, -1])
def test_stop_at_layer_in_a_remote_hooks_context(local_models, name, stop):
    """A plain forward inside ``hooks(..., remote=True)`` returns the residual, as locally
    (it used to raise TL's internal StopAtLayerException)."""
    local = local_models[name]
    tokens = local.to_tokens(["hello world"])
    hooks = [("blocks.0.hook_resid_mid", _double)]
    with local.hooks(fwd_hooks=hooks, remote=True, remote_model=name):
        got = local(tokens, stop_at_layer=stop)
    with local.hooks(fwd_hooks=hooks):
        want = local(tokens, stop_at_layer=stop)
    assert type(got) is torch.Tensor
    assert_close(got, want)
