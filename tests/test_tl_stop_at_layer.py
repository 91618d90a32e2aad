"""stop_at_layer in remote run_with_hooks / run_with_cache equals local TL: the residual
entering block k comes back (after hooks on that site), hooks on later sites never run."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

MODELS = ("tiny-gpt2", "tiny-llama")


def double(act, hook):
    return act * 2


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stop", [0, 1, -1, 2])
@pytest.mark.parametrize("hook_site", [None, "blocks.0.hook_resid_pre",
                                       "blocks.1.hook_resid_pre"])
def test_run_with_hooks_stop_at_layer(local_models, remote_models, name, stop, hook_site):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    fwd = [] if hook_site is None else [(hook_site, double)]
    got = remote.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=stop)
    want = local.run_with_hooks(tokens, fwd_hooks=fwd, stop_at_layer=stop)
    assert type(got) is torch.Tensor
    assert_close(got, want)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("stop", [0, 1, -1])
def test_run_with_cache_stop_at_layer(local_models, remote_models, name, stop):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world"])
    got_out, got_cache = remote.run_with_cache(tokens, stop_at_layer=stop)
    want_out, want_cache = local.run_with_cache(tokens, stop_at_layer=stop)
    assert_close(got_out, want_out)
    assert list(got_cache.keys()) == list(want_cache.keys())
    for key in want_cache.keys():
        assert type(got_cache[key]) is torch.Tensor
        assert_close(got_cache[key], want_cache[key])


@pytest.mark.parametrize("name", MODELS)
def test_hooks_after_the_stop_never_run(local_models, remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello"])
    seen = {"remote": [], "local": []}

    def spy(key):
        def hook(act, hook):
            seen[key].append(hook.name)
        return hook
    remote.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_in"), spy("remote"))],
                          stop_at_layer=1)
    local.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_in"), spy("local"))],
                         stop_at_layer=1)
    assert seen["remote"] == seen["local"]
    assert not any(n.startswith("blocks.1.attn") for n in seen["remote"])
