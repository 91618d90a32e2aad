"""Tensors hooks store come back into the user's containers, found near the hooks first.

``hookwire.rebind`` looks where the hooks can reach (closures, defaults, the globals their code
names, hook points' ``ctx``) and walks the whole heap (``gc.get_referrers``) only when reference
counts show a holder is still missing. Each test runs the same hooks locally and remotely
(``remote=True`` on the very bridge the server hosts) and compares the stored tensors; the
count of heap walks is observed by wrapping ``rebind._holders``.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import hookwire.rebind as rebind_module

SITE = "blocks.0.hook_resid_post"
GLOBAL_CACHE: dict = {}


class Store:
    data: dict = {}  # reachable only through the class: not searched near the hooks


class Holder:
    def __init__(self):
        self.values = []


@pytest.fixture
def heap_walks(monkeypatch):
    count = [0]
    original = rebind_module._holders

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(rebind_module, "_holders", counting)
    return count


def _run_twice(model, tokens, make_hooks):
    """(local stores, remote stores): the same hooks, run locally then remotely."""
    out = []
    for remote in (False, True):
        stores, hooks = make_hooks()
        model.run_with_hooks(tokens, fwd_hooks=hooks, remote=remote, progress=False)
        out.append(stores)
    return out


def test_stores_near_the_hooks_need_no_heap_walk(local_models, tokens, heap_walks):
    model = local_models["tiny-gpt2"]

    def make_hooks():
        closure_list, holder = [], Holder()
        GLOBAL_CACHE.clear()

        def store(act, hook, into):  # a partial's keyword, a closure, a global, hook.ctx
            into["partial"] = act[:, 0]
            closure_list.append([act.mean(-1), [act[:, -1]]])
            GLOBAL_CACHE[hook.name] = act * 2
            holder.values.append(act.sum())
            hook.ctx["mean"] = act.mean()
        partial_dict = {}
        stores = lambda: {"partial": partial_dict["partial"],  # noqa: E731
                          "list_mean": closure_list[0][0], "nested": closure_list[0][1][0],
                          "global": next(iter(GLOBAL_CACHE.values())),
                          "attribute": holder.values[0],
                          "ctx": model.hook_dict[SITE].ctx["mean"]}
        return stores, [(SITE, functools.partial(store, into=partial_dict))]

    local, remote = _run_twice(model, tokens, make_hooks)
    got, want = remote(), local()
    assert heap_walks[0] == 0
    model.hook_dict[SITE].ctx.clear()
    for key in want:
        assert type(got[key]) is torch.Tensor, key
        assert_close(got[key], want[key], msg=lambda m: f"{key}: {m}")


def test_store_out_of_reach_falls_back_to_the_heap_walk(local_models, tokens, heap_walks):
    model = local_models["tiny-llama"]

    def make_hooks():
        Store.data.clear()

        def store(act, hook):  # a tuple, too: rebuilt, then put where the old one was
            Store.data["act"] = act[:, 1:]
            Store.data["pair"] = (act[:, 0], act.mean())
        return (lambda: dict(Store.data)), [(SITE, store)]

    local, remote = _run_twice(model, tokens, make_hooks)
    got, want = remote(), local()
    assert heap_walks[0] >= 1
    assert type(got["act"]) is torch.Tensor and type(got["pair"]) is tuple
    assert_close(got["act"], want["act"])
    assert_close(got["pair"], want["pair"])
