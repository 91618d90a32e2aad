"""blocking=False: a RemoteRun handle whose events stream progress and saved values as they
arrive, whose result equals the local run, which can be cancelled; from scripts, threads and
inside a running event loop (as in Jupyter)."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from engines import ALSO_OUT_OF_PROCESS
from torch.testing import assert_close

import hookwire
import hookwire.transformerlens as htl
from hookwire.errors import Cancelled, HookwireError, TraceError
from hookwire.protocol import Accepted, Progress
from hookwire.runs import RemoteRun, SavedValue

MODELS = ("tiny-gpt2", "tiny-llama")


def _caching(store: dict):
    def hook(act, hook):
        store[hook.name] = act.detach()
    return hook


@ALSO_OUT_OF_PROCESS
@pytest.mark.parametrize("name", MODELS)
def test_events_then_result_equal_local(local_models, remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    got, want = {}, {}
    is_resid_post = lambda n: n.endswith("hook_resid_post")  # noqa: E731
    run = remote.run_with_hooks(tokens, fwd_hooks=[(is_resid_post, _caching(got))],
                                blocking=False)
    assert isinstance(run, RemoteRun)
    events = []
    for event in run.events():
        events.append(event)
        if isinstance(event, SavedValue) and event.name.startswith("__escaped_"):
            # usable the moment it arrives: already a real tensor in the user's dict
            assert any(type(v) is torch.Tensor for v in got.values())
    out = run.result(timeout=60)
    expected = local.run_with_hooks(tokens, fwd_hooks=[(is_resid_post, _caching(want))])
    assert_close(out, expected)
    assert list(got) == list(want)
    for key in want:
        assert type(got[key]) is torch.Tensor
        assert_close(got[key], want[key])
    assert isinstance(events[0], Accepted)
    assert any(isinstance(e, Progress) and e.stage == "site" for e in events)
    saved = [e for e in events if isinstance(e, SavedValue)]
    assert len(saved) == len(want) + 1  # every cached activation, then the logits
    assert saved[-1].name == "__logits__"
    assert run.done()


@pytest.mark.parametrize("name", MODELS)
def test_run_with_cache_non_blocking(local_models, remote_models, name):
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["hello world"])
    out, cache = remote.run_with_cache(tokens, blocking=False).result(timeout=60)
    want_out, want_cache = local.run_with_cache(tokens)
    assert_close(out, want_out)
    assert list(cache.keys()) == list(want_cache.keys())
    for key in want_cache.keys():
        assert_close(cache[key], want_cache[key])


def test_local_bridge_non_blocking(local_models):
    local = local_models["tiny-gpt2"]
    tokens = local.to_tokens(["hello"])

    def halve(act, hook):
        return act * 0.5
    run = local.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", halve)],
                               remote=True, remote_model="tiny-gpt2", blocking=False)
    got = run.result(timeout=60)
    assert_close(got, local.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                                halve)]))


def test_trace_errors_surface_at_the_call(remote_models):
    remote = remote_models["tiny-gpt2"]
    tokens = remote.to_tokens(["hello"])

    def data_dependent(act, hook):
        if act.sum() > 0:
            return act
    with pytest.raises(TraceError, match="data_dependent"):
        remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre", data_dependent)],
                              blocking=False)


def test_from_threads(server, local_models):
    """Each thread its own stand-in; all results equal local."""
    local = local_models["tiny-llama"]
    tokens = local.to_tokens(["hello world"])
    results, errors = {}, []

    def worker(i):
        try:
            model = htl.RemoteModel("tiny-llama", url=server.url)

            def scale(act, hook, k=i):
                return act * (1 + k)
            run = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", scale)],
                                       blocking=False)
            results[i] = run.result(timeout=120)
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    for i in range(3):
        def scale(act, hook, k=i):
            return act * (1 + k)
        assert_close(results[i], local.run_with_hooks(
            tokens, fwd_hooks=[("blocks.1.hook_resid_pre", scale)]))


def test_inside_a_running_event_loop(local_models, remote_models):
    """Jupyter runs cells inside an asyncio loop; the client must not need its own."""
    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    tokens = local.to_tokens(["hello"])

    async def cell():
        assert asyncio.get_running_loop() is not None
        blocking = remote.run_with_hooks(tokens, fwd_hooks=[])
        handle = remote.run_with_hooks(tokens, fwd_hooks=[], blocking=False)
        return blocking, handle.result(timeout=60)
    blocking, non_blocking = asyncio.run(cell())
    expected = local(tokens)
    assert_close(blocking, expected)
    assert_close(non_blocking, expected)


@ALSO_OUT_OF_PROCESS
def test_cancel_stops_the_request_and_the_connection_keeps_serving(local_models,
                                                                    remote_models):
    local, remote = local_models["tiny-gpt2"], remote_models["tiny-gpt2"]
    tokens = local.to_tokens(["hello world"])
    gate = torch.randn(64, 64)

    def slow(act, hook):
        # Many real matmuls on the server: long enough to cancel before the later sites.
        x = act
        for _ in range(3000):
            x = torch.tanh(x @ gate)
        return act + 0 * x
    fwd = [("blocks.0.hook_resid_pre", slow),
           (lambda n: n.endswith("hook_resid_post"), lambda a, hook: None)]
    run = remote.run_with_hooks(tokens, fwd_hooks=fwd, blocking=False)
    run.cancel()
    with pytest.raises(Cancelled):
        run.result(timeout=120)
    # the same connection still serves, with the right answer
    assert_close(remote.run_with_hooks(tokens, fwd_hooks=[]), local(tokens))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("which", ["stand_in", "local_bridge"])
def test_consecutive_non_blocking_calls_trace_only_their_own_hooks(local_models,
                                                                   remote_models, name, which):
    """TL removes a call's hooks only when the call ends; a non-blocking call ends after the
    server answered. The next call must still be traced with its own hooks only (it used to
    see the previous call's too, and its result was silently off)."""
    local = local_models[name]
    model = remote_models[name] if which == "stand_in" else local
    kwargs = {} if which == "stand_in" else {"remote": True}
    tokens = local.to_tokens(["hello world", "abcdefghij!"])
    sites = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid",
             "blocks.1.hook_resid_post"]
    traced: list[list[int]] = [[] for _ in sites]

    def make(i):
        def patch(act, hook):
            traced[i].append(i)
            return act * (i + 2)
        return patch
    runs = [model.run_with_hooks(tokens, fwd_hooks=[(site, make(i))], blocking=False,
                                 **kwargs) for i, site in enumerate(sites)]
    results = [run.result(timeout=120) for run in runs]
    assert traced == [[0], [1], [2], [3]]  # each call traced its own hook, once
    for i, site in enumerate(sites):
        want = local.run_with_hooks(tokens, fwd_hooks=[(site, make(i))])
        assert_close(results[i], want)
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())  # all removed at the end


@pytest.mark.parametrize("name", MODELS)
def test_non_blocking_run_with_cache_then_blocking_call(local_models, remote_models, name):
    """A non-blocking run_with_cache, then (while it may still run) a blocking call with
    other hooks: neither sees the other's hooks."""
    local, remote = local_models[name], remote_models[name]
    tokens = local.to_tokens(["abc"])
    run = remote.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"),
                                blocking=False)
    got = remote.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                    lambda act, hook: act * 3)])
    logits, cache = run.result(timeout=120)
    want_logits, want_cache = local.run_with_cache(
        tokens, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert_close(logits, want_logits)
    assert list(cache.keys()) == list(want_cache.keys())
    for key in want_cache.keys():
        assert_close(cache[key], want_cache[key])
    assert_close(got, local.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_pre",
                                                               lambda act, hook: act * 3)]))


@pytest.mark.parametrize("spelling", ["run_with_hooks", "run_with_cache", "hooks"])
def test_one_model_object_from_many_threads(server, local_models, spelling):
    """One stand-in shared by 12 threads, each with its own hook (TL keeps hooks as module
    state): every call's result is its own solo result, in each TL spelling."""
    local = local_models["tiny-gpt2"]
    model = htl.RemoteModel("tiny-gpt2", url=server.url)
    tokens = local.to_tokens(["hello world"])
    site = "blocks.0.hook_resid_post"

    def hook_for(k):
        def scale(act, hook):
            return act * (1 + k)
        return scale

    def call(target, k):
        if spelling == "run_with_hooks":
            return target.run_with_hooks(tokens, fwd_hooks=[(site, hook_for(k))],
                                         **({"remote": True} if target is model else {}))
        if spelling == "run_with_cache":
            with target.hooks(fwd_hooks=[(site, hook_for(k))],
                              **({"remote": True} if target is model else {})):
                logits, cache = target.run_with_cache(
                    tokens, names_filter=lambda n: n == "blocks.1.hook_resid_post")
            return logits, cache["blocks.1.hook_resid_post"]
        with target.hooks(fwd_hooks=[(site, hook_for(k))],
                          **({"remote": True} if target is model else {})):
            return target(tokens)

    results, errors = {}, []

    def worker(k):
        try:
            results[k] = call(model, k)
        except Exception as exc:  # reported below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for k in range(12):
        assert_close(results[k], call(local, k))


def test_waiting_for_a_run_inside_a_hooks_block_raises(server, local_models):
    """A non-blocking run needs the model's hooks to itself at its end; waiting for it inside
    a remote ``hooks()`` block of the same model (which holds them) raises instead of hanging,
    and the same wait after the block returns the run's own result."""
    local = local_models["tiny-gpt2"]
    model = htl.RemoteModel("tiny-gpt2", url=server.url)
    tokens = local.to_tokens(["hello world"])
    hook = ("blocks.0.hook_resid_post", lambda act, hook: act * 2)
    run = model.run_with_hooks(tokens, fwd_hooks=[hook], blocking=False)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda act, hook: act * 3)]):
        # (the run cannot end while the block holds the model: its clean-up needs it)
        assert not run.done()
        with pytest.raises(HookwireError, match="after the block"):
            run.result(timeout=60)
    assert_close(run.result(timeout=120), local.run_with_hooks(tokens, fwd_hooks=[hook]))


def test_a_sweep_of_non_blocking_runs_gathered_equals_each_solo_run(server, local_models):
    """The pipelined sweep spelling (start every call with blocking=False, then
    hookwire.gather): calls from one model object are in flight together on the pool's
    connections and co-batched; each result equals its own local run."""
    local = local_models["tiny-gpt2"]
    model = htl.RemoteModel("tiny-gpt2", url=server.url)
    clean, corrupt = local.to_tokens(["The cat sat on a mat", "The dog sat on a rug"])
    _, cache = local.run_with_cache(clean[None], names_filter=lambda n: "resid_pre" in n)

    def patch_for(layer, pos):
        name = f"blocks.{layer}.hook_resid_pre"
        value = cache[name][:, pos].clone()

        def patch(act, hook):
            act[:, pos] = value
            return act
        return name, patch
    grid = [(layer, pos) for layer in range(2) for pos in range(corrupt.shape[0])]
    runs = [model.run_with_hooks(corrupt[None], fwd_hooks=[patch_for(*lp)], blocking=False)
            for lp in grid]
    results = hookwire.gather(runs, timeout=300)
    for lp, got in zip(grid, results):
        assert_close(got, local.run_with_hooks(corrupt[None], fwd_hooks=[patch_for(*lp)]))
