"""The core's adapter pipeline (``hookwire.remote_call``) without a server: which values a
trace keeps, under which names, and how the values that come back are made into the tensors
the user's code stored -- views of one value included, as torch makes them locally.

The pipeline's submit, progress, non-blocking and rebind steps run in every adapter's tests
against a real server (tests/test_tl_*, test_hf_*, test_pyvene_*, test_nnsight_*)."""
from __future__ import annotations

import functools

import torch
from torch.testing import assert_close

from hookwire.generation import step_name
from hookwire.remote_call import Destinations
from hookwire.trace import Tracer, tracing


def _trace_cache(tracer: Tracer, cache: dict) -> None:
    """What ``run_with_cache`` does with one hook point known under two names."""
    with tracing(tracer):
        act = tracer.read_site("blocks.0.hook_in", 0, (2, 3, 4), torch.float32)
        cache["blocks.0.hook_in"] = act.detach()
        cache["blocks.0.hook_resid_pre"] = act.detach()
        cache["mean"] = act.mean(-1)
        del act


def test_views_of_one_value_travel_once_and_come_back_as_views():
    tracer, cache = Tracer(), {}
    _trace_cache(tracer, cache)
    dest = Destinations.keep_escaped(tracer, share_views=True)
    assert sorted(tracer.saves) == ["__escaped_0", "__escaped_1"]  # 3 stored, 2 sent
    assert len(dest) == 3 and sorted(dest.names()) == ["__escaped_0", "__escaped_1"]
    value = torch.arange(24.0).reshape(2, 3, 4)
    olds, news = [], []
    for name in dest.names():
        dest.replacements(name, value if name == "__escaped_0" else value.mean(-1),
                          olds, news)
    by_id = dict(zip(map(id, olds), news))
    got = {key: by_id[id(proxy)] for key, proxy in cache.items()}
    assert_close(got["blocks.0.hook_in"], value)
    assert_close(got["mean"], value.mean(-1))
    # The two names hold one storage, as locally (``act.detach()`` twice).
    assert got["blocks.0.hook_in"].data_ptr() == got["blocks.0.hook_resid_pre"].data_ptr()
    assert got["blocks.0.hook_resid_pre"] is not got["blocks.0.hook_in"]


def test_without_shared_views_each_value_is_its_own_save():
    tracer, cache = Tracer(), {}
    _trace_cache(tracer, cache)
    dest = Destinations.keep_escaped(tracer)
    assert len(tracer.saves) == 3 and len(dest) == 3
    assert [id(p) for p in dest.proxies()] == [id(p) for p in cache.values()]
    assert dest.expected == tracer.user_refs and all(
        dest.expected[id(p)] == 1 for p in cache.values())


def test_a_generation_rekeys_each_forwards_values_by_step():
    whole = Destinations()
    caches = []
    for k in range(2):
        tracer, cache = Tracer(), {}
        _trace_cache(tracer, cache)
        whole.extend(Destinations.keep_escaped(tracer), functools.partial(step_name, k))
        caches.append(cache)
    assert sorted(whole.names()) == sorted(step_name(k, f"__escaped_{i}")
                                           for k in range(2) for i in range(3))
    olds, news = [], []
    whole.replacements(step_name(1, "__escaped_2"), torch.ones(2, 3), olds, news)
    assert [id(p) for p in olds] == [id(caches[1]["mean"])]
    assert torch.equal(news[0], torch.ones(2, 3))
    olds.clear()
    whole.replacements("__escaped_2", torch.ones(2, 3), olds, news)  # not a step's name
    assert olds == []
