"""run_with_cache of everything: TL stores each activation under every alias of its hook
point, and one tensor often *is* the next hook point's input too, so local caches hold far
fewer storages than names. Remotely each storage travels once, and cache entries that alias
locally alias remotely too."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import hookwire.server as hs
import hookwire.transformerlens as htl
from hookwire.protocol import Result
from hookwire.validate import Limits

MODELS = ("tiny-gpt2", "tiny-llama")


def alias_groups(cache) -> list[list[str]]:
    """Cache keys grouped by the exact view they hold (same storage, offset, shape, stride)."""
    groups: dict = {}
    for key in cache.keys():
        t = cache[key]
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                tuple(t.stride()))
        groups.setdefault(view, []).append(key)
    return sorted(sorted(keys) for keys in groups.values())


@pytest.mark.parametrize("name", MODELS)
def test_each_storage_travels_once_and_aliases_stay_aliases(local_models, remote_models,
                                                            name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    run = remote.run_with_cache(tokens, blocking=False)
    events = list(run.events())
    got_logits, got = run.result(timeout=120)
    want_logits, want = local.run_with_cache(tokens)
    assert_close(got_logits, want_logits)
    assert list(got.keys()) == list(want.keys())
    for key in want.keys():
        assert type(got[key]) is torch.Tensor
        assert_close(got[key], want[key])
    sent = [e for e in events if isinstance(e, Result) and e.name.startswith("__escaped_")
            and e.alias_of is None]
    storages = {want[k].untyped_storage().data_ptr() for k in want.keys()}
    assert len(sent) == len(storages) < len(want.keys())
    assert alias_groups(got) == alias_groups(want)
    # an in-place edit through one alias shows through the others, as locally
    group = next(g for g in alias_groups(want) if len(g) > 1)
    got[group[0]].add_(1.0)
    want[group[0]].add_(1.0)
    assert_close(got[group[-1]], want[group[-1]])


@pytest.mark.parametrize("name", MODELS)
def test_cache_of_everything_fits_a_limit_the_aliases_would_exceed(hosted, name):
    """Saved bytes are counted once per storage: a cache whose names add up to more than
    ``max_saved_bytes`` (but whose distinct activations do not) runs, as locally."""
    bridge = hosted[name].bridge
    tokens = bridge.to_tokens(["hello world", "abcdefghij!"])
    _, cache = bridge.run_with_cache(tokens)
    by_point: dict = {}
    for key in cache.keys():
        by_point[bridge.hook_dict[key].name or key] = cache[key].nbytes
    every_name = sum(cache[k].nbytes for k in cache.keys())
    distinct = sum(by_point.values())
    assert distinct < every_name
    limit = (distinct + every_name) // 2
    srv = hs.start(models={name: bridge}, port=0,
                   limits=Limits(max_saved_bytes=limit))
    try:
        remote = htl.RemoteModel(name, url=srv.url)
        logits, got = remote.run_with_cache(tokens)
        assert list(got.keys()) == list(cache.keys())
        for key in cache.keys():
            assert_close(got[key], cache[key])
    finally:
        import hookwire.client
        hookwire.client.close_connections()
        srv.stop()
    assert math.isfinite(float(logits.abs().max()))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("pos_slice", [-1, (1, 4)])
def test_sliced_caches_alias_as_locally(local_models, remote_models, name, pos_slice):
    """With ``pos_slice`` every entry is a slice; each alias name cuts the same slice of one
    activation, and the remote cache shares those slices as the local one does."""
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    _, got = remote.run_with_cache(tokens, pos_slice=pos_slice)
    _, want = local.run_with_cache(tokens, pos_slice=pos_slice)
    assert list(got.keys()) == list(want.keys())
    for key in want.keys():
        assert_close(got[key], want[key])
    assert alias_groups(got) == alias_groups(want)
