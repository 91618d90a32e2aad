"""A value kept at one site shows a later hook's in-place edit of the same tensor, as locally.

TL hands ``blocks.0.hook_resid_post`` and ``blocks.1.hook_resid_pre`` the very same tensor
(``hook_embed``'s output is ``hook_resid_pre`` of block 0 on GPT-2; an HF block's output is
the next block's input): locally a value kept at the first (``cache[name] = x``,
``run_with_cache`` inside a ``hooks()`` context that ablates the second) shows the edit
made at the second. Remote used to send each value as it was at its own site (off by up to
3.1 in a differential test of everyday spellings). The server now holds a graph's saves
until its last in-place write has run (hookwire.held_saves); each case is compared with the
same hooks run locally, co-batched requests with their solo runs.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import hookwire.hf as hhf
from conftest import MODEL_NAMES
from graphs import graph, node, ref
from pipelined import PipelinedClient, assert_memory_given_back, run_pair
import hookwire.server as hs
from test_hf_remote import torch_hooks_run

E, R0, R1 = "hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
P0, P1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def keep(state, key):
    def keep_value(x, hook):
        state[key] = x
    return keep_value


def ablate_position(x, hook):
    x[:, 1] = 0.0


def halve(x, hook):
    x.mul_(0.5)


def keep_then_edit(state):
    def keep_and_edit(x, hook):
        state["kept"] = x
        x[:, 0] = 1.0
    return keep_and_edit


# Each: (hooks built from a fresh state dict). Locally every kept value below is the tensor a
# later hook edits in place -- except "replaced", where the later hook returns a new tensor.
SPELLINGS = {
    "keep resid_post(0), ablate resid_pre(1)":
        lambda st: [(P0, keep(st, "p0")), (R1, ablate_position)],
    "keep hook_embed, halve resid_pre(0)":
        lambda st: [(E, keep(st, "embed")), (R0, halve)],
    "keep and edit at resid_post(0), edit again at resid_pre(1)":
        lambda st: [(P0, keep_then_edit(st)), (R1, ablate_position)],
    "keep at three sites, edits at two":
        lambda st: [(R0, keep(st, "r0")), (P0, keep(st, "p0")), (R1, halve),
                    ("blocks.1.hook_resid_mid", ablate_position), (P1, keep(st, "p1"))],
    "replaced": lambda st: [(P0, keep(st, "p0")), (R1, lambda x, hook: x * 0.0)],
}


def run(model, hooks, tokens, **kw):
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_kept_value_shows_a_later_in_place_edit_of_the_same_tensor(
        local_models, remote_models, name, tokens, spelling):
    local_state, remote_state = {}, {}
    local = run(local_models[name], SPELLINGS[spelling](local_state), tokens)
    remote = run(remote_models[name], SPELLINGS[spelling](remote_state), tokens,
                 progress=False)
    assert_close(remote, local)
    assert local_state.keys() == remote_state.keys()
    for key in local_state:
        assert_close(remote_state[key], local_state[key], msg=key)
    if spelling.startswith("keep resid_post(0)"):
        # The case is real: locally the kept value is not what resid_post(0) was.
        with torch.no_grad():
            _, plain = local_models[name].run_with_cache(tokens, names_filter=[P0])
        assert not torch.equal(local_state["p0"], plain[P0])
    if spelling == "replaced":  # a replacement leaves the kept tensor as it was
        with torch.no_grad():
            _, plain = local_models[name].run_with_cache(tokens, names_filter=[P0])
        assert_close(remote_state["p0"], plain[P0])


def test_run_with_cache_inside_a_hooks_context_that_ablates_in_place(
        local_models, remote_models, name, tokens):
    """The everyday "ablate in place, then inspect the cache": TL's cache keeps
    ``x.detach()``, an alias of the activation."""
    out = []
    for model, kw in ((local_models[name], {}), (remote_models[name], {"progress": False})):
        with torch.no_grad(), model.hooks(fwd_hooks=[(R1, halve)]):
            logits, cache = model.run_with_cache(tokens, names_filter=[R0, P0, R1, P1], **kw)
        out.append((logits, {k: cache[k] for k in (R0, P0, R1, P1)}))
    (ll, lc), (rl, rc) = out
    assert_close(rl, ll)
    for key in lc:
        assert_close(rc[key], lc[key], msg=key)
    assert_close(lc[P0], lc[R1])  # one tensor locally, halved


# ---- co-batched members each keep their own rows' edits ------------------------------------

KEY_A, KEY_B = "alias-key-a-0123456789abcdef", "alias-key-b-0123456789abcdef"


@pytest.fixture(scope="module")
def pair_server(hosted):
    srv = hs.start(models={n: h.bridge for n, h in hosted.items()}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=0.05)
    yield srv
    srv.stop()


def keep_then_scale_graph(model: str, scale: float) -> dict:
    """Keep resid_post(0), then scale resid_pre(1) (the same tensor) in place."""
    return graph(model, sites=[P0, R1],
                 nodes=[node(0, "site.read", 0), node(1, "site.read", 1),
                        node(2, "mul", ref(1), scale),
                        node(3, "site.write", 1, ref(2), mode="inplace")],
                 saves={"p0": 0})


def test_co_batched_members_each_see_their_own_edit_in_what_they_kept(pair_server,
                                                                        local_models, name):
    bridge = local_models[name]
    tokens = bridge.to_tokens(["the same tensor at two sites"])
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        ga, gb = keep_then_scale_graph(name, 0.5), keep_then_scale_graph(name, -2.0)
        solo = {}
        for client, g, tag in ((a, ga, "a"), (b, gb, "b")):
            rid = client.send(g, {"input_ids": tokens})
            solo[tag] = client.collect([rid])[rid]
            assert solo[tag].batch_size == 1 and solo[tag].error is None
        wa, wb = run_pair(a, b, ga, gb, tokens, expect_batched=True)
        assert wa.batch_size == 2 and wa.error is None and wb.error is None
        for tag, together, scale in (("a", wa, 0.5), ("b", wb, -2.0)):
            assert torch.equal(together.values["p0"], solo[tag].values["p0"]), tag
            assert torch.equal(together.values["__logits__"], solo[tag].values["__logits__"])
            kept = {}

            def scale_in_place(x, hook, scale=scale):
                x.mul_(scale)
            with torch.no_grad():
                local = bridge.run_with_hooks(tokens, fwd_hooks=[(P0, keep(kept, "p0")),
                                                                 (R1, scale_in_place)])
            assert_close(together.values["p0"], kept["p0"])
            assert_close(together.values["__logits__"], local)
    finally:
        a.close()
        b.close()


# ---- HF module hooks -------------------------------------------------------------------------

BLOCKS = {"tiny-gpt2": ("transformer.h.0", "transformer.h.1", "transformer.h.1.ln_1"),
          "tiny-llama": ("model.layers.0", "model.layers.1",
                         "model.layers.1.input_layernorm")}
IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def plain(hosted, server):
    from hookwire.server.hf_modules import plain_hf_model
    return {n: plain_hf_model(h.bridge) for n, h in hosted.items()}


def store_output(state, module, args, output):
    state["out"] = output


def double_input(state, module, args):
    args[0].mul_(2.0)


@pytest.mark.parametrize("edited", ["next block", "next block's first norm"])
def test_an_hf_output_kept_by_one_hook_shows_the_next_modules_in_place_edit(plain, name,
                                                                            edited):
    block0, block1, ln1 = BLOCKS[name]
    target = block1 if edited == "next block" else ln1
    states = {"local": {}, "remote": {}}

    def hooks(state):
        return {block0: functools.partial(store_output, state),
                target + ":input": functools.partial(double_input, state)}
    local = torch_hooks_run(plain[name], hooks(states["local"]), IDS)
    remote = hhf.RemoteModel(name).run_with_hooks(IDS, hooks(states["remote"])).logits
    assert_close(remote, local)
    kept_local, kept_remote = states["local"]["out"], states["remote"]["out"]
    if isinstance(kept_local, tuple):
        kept_local, kept_remote = kept_local[0], kept_remote[0]
    assert_close(kept_remote, kept_local)
    plain_out = {}
    torch_hooks_run(plain[name], {block0: functools.partial(store_output, plain_out)}, IDS)
    first = plain_out["out"][0] if isinstance(plain_out["out"], tuple) else plain_out["out"]
    assert not torch.equal(kept_local, first)  # locally the edit shows in the kept value


# ---- what is held is counted -----------------------------------------------------------------

def test_held_saves_count_against_the_users_memory_before_they_are_copied(hosted,
                                                                         local_models):
    """A held save is a copy the server keeps until the graph's last in-place write: it is
    reserved against the user's memory before it is made (refused with the rule that bounds
    queued results), and given back once sent. A graph whose held copies would exceed the
    user's share fails alone; one that fits runs (each copy counted once: held, then as a
    result), equal to local TL, and nothing stays counted."""
    from hookwire.errors import LimitExceeded
    from hookwire.validate import Limits
    MiB = 1 << 20
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A], limits=Limits(max_pending_bytes_per_user=8 * MiB))
    client = PipelinedClient(srv.url, KEY_A)
    try:
        bridge = local_models["tiny-gpt2"]
        tokens = bridge.to_tokens(["what is held is counted"])
        seq, width = tokens.shape[1], bridge.cfg.d_model
        copies = -(-3 * MiB // (seq * width * 4))  # a value of about 3 MiB

        def big_saves(n_names: int) -> dict:
            return graph("tiny-gpt2", sites=[P0, R1],
                         nodes=[node(0, "site.read", 0), node(1, "repeat", ref(0), copies, 1, 1),
                                node(2, "site.read", 1), node(3, "mul", ref(2), 0.5),
                                node(4, "site.write", 1, ref(3), mode="inplace")],
                         saves={f"big{k}": 1 for k in range(n_names)})
        rid = client.send(big_saves(3), {"input_ids": tokens})  # ~9 MiB held: over 8 MiB
        refused = client.collect([rid])[rid].error
        assert refused is not None and refused.code == LimitExceeded.code
        assert refused.details.get("rule") == "max_pending_bytes_per_user"
        assert "held" in refused.message
        # ~6 MiB held, then sent: each copy is counted once (given back as it is sent), or
        # the first send would have counted 9 MiB and been refused
        rid = client.send(big_saves(2), {"input_ids": tokens})
        answer = client.collect([rid])[rid]
        assert answer.error is None, answer.error
        assert torch.equal(answer.values["big0"], answer.values["big1"])
        kept = {}

        def halve_in_place(x, hook):
            x.mul_(0.5)
        with torch.no_grad():
            local = bridge.run_with_hooks(tokens, fwd_hooks=[(P0, keep(kept, "p0")),
                                                             (R1, halve_in_place)])
        # repeat copies resid_post(0) before the edit: locally too it does not show it
        assert_close(answer.values["big0"], (kept["p0"] * 2).repeat(copies, 1, 1))
        assert_close(answer.values["__logits__"], local)
        assert_memory_given_back(srv)
    finally:
        client.close()
        srv.stop()
