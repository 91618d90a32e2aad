"""Review of held saves (hookwire.held_saves): co-batched members, memory, retries."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import hookwire.server as hs
from graphs import FULL, graph, node, ref
from pipelined import PipelinedClient, record_retries, run_pair

R1 = "blocks.1.hook_resid_pre"
P0 = "blocks.0.hook_resid_post"
KEY_A, KEY_B = "review-key-a-0123456789abcdef", "review-key-b-0123456789abcdef"


@pytest.fixture(scope="module")
def pair_server(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=0.05)
    yield srv
    srv.stop()


def solo_answer(client: PipelinedClient, g: dict, tokens):
    """``g`` run alone (nothing else in flight): its answer."""
    rid = client.send(g, {"input_ids": tokens})
    answer = client.collect([rid])[rid]
    assert answer.error is None and answer.batch_size == 1, answer.error
    return answer


def keep_then_scale(scale: float) -> dict:
    """Keep resid_post(0), then scale resid_pre(1) (the same tensor) in place."""
    return graph("tiny-gpt2", sites=[P0, R1],
                 nodes=[node(0, "site.read", 0), node(1, "site.read", 1),
                        node(2, "mul", ref(1), scale),
                        node(3, "site.write", 1, ref(2), mode="inplace")],
                 saves={"p0": 0})


def replace_at_p0() -> dict:
    """Replace resid_post(0) (a new tensor from there on for the whole batch)."""
    return graph("tiny-gpt2", sites=[P0],
                 nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 3.0),
                        node(2, "site.write", 0, ref(1), mode="replace")],
                 saves={})


def test_a_batch_mates_replacement_does_not_change_what_a_member_kept(pair_server,
                                                                       local_models):
    tokens = local_models["tiny-gpt2"].to_tokens(["the same tensor at two sites"])
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        ga = keep_then_scale(0.5)
        solo = solo_answer(a, ga, tokens)
        wb, wa = run_pair(b, a, replace_at_p0(), ga, tokens, expect_batched=True)
        assert wa.error is None and wb.error is None and wa.batch_size == 2
        assert torch.equal(wa.values["__logits__"], solo.values["__logits__"])
        assert torch.equal(wa.values["p0"], solo.values["p0"])
    finally:
        a.close()
        b.close()


MiB = 1 << 20


def big_save(copies: int, write: bool) -> dict:
    """Save resid_post(0) repeated ``copies`` times; with ``write``, scale resid_pre(1)
    in place after it (so the save is held until then)."""
    nodes = [node(0, "site.read", 0), node(1, "repeat", ref(0), copies, 1, 1),
             node(2, "site.read", 1), node(3, "mul", ref(2), 0.5)]
    if write:
        nodes.append(node(4, "site.write", 1, ref(3), mode="inplace"))
    return graph("tiny-gpt2", sites=[P0, R1], nodes=nodes, saves={"big": 1})


@pytest.fixture
def small_memory_server(hosted):
    from hookwire.validate import Limits
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A], limits=Limits(max_pending_bytes_per_user=8 * MiB))
    yield srv
    srv.stop()


def test_a_held_save_is_not_counted_twice_when_it_is_sent(small_memory_server, local_models):
    """A ~5 MiB save fits an 8 MiB share when sent at once; held until the graph's
    in-place write, it must fit too (its held bytes are given back as it is sent, not
    counted beside it)."""
    tokens = local_models["tiny-gpt2"].to_tokens(["what is held is counted once"])
    seq, width = tokens.shape[1], local_models["tiny-gpt2"].cfg.d_model
    copies = -(-5 * MiB // (seq * width * 4))
    client = PipelinedClient(small_memory_server.url, KEY_A)
    try:
        for write in (False, True):
            rid = client.send(big_save(copies, write), {"input_ids": tokens})
            answer = client.collect([rid])[rid]
            assert answer.error is None, (write, answer.error)
            assert answer.values["big"].shape[0] == copies
    finally:
        client.close()


@pytest.fixture
def small_pair_server(hosted):
    from hookwire.validate import Limits
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=0.3,
                   limits=Limits(max_pending_bytes_per_user=8 * MiB))
    yield srv
    srv.stop()


def test_a_retried_batch_does_not_count_a_members_held_saves_twice(small_pair_server,
                                                                    local_models,
                                                                    monkeypatch):
    """A batch the model fails on goes again without each other (_run_again): the held
    copies of the first attempt are given back, or a member that fits its share alone
    (3 MiB uploaded + 3 MiB held) is refused on the retry (3 + 3 + 3 > 8 MiB)."""
    entry = small_pair_server.server.entries["tiny-gpt2"]
    tokens = local_models["tiny-gpt2"].to_tokens(["held once, retried"])
    c = torch.randn(3 * MiB // 4 // 64, 64)
    held = graph("tiny-gpt2", sites=[R1], constants=["c"],
                 nodes=[node(0, "mul", {"const": "c"}, 1.0), node(1, "site.read", 0),
                        node(2, "mul", ref(1), 0.5),
                        node(3, "site.write", 0, ref(2), mode="inplace")],
                 saves={"c": 0})
    # (over LIGHT_NODES, as the other is over LIGHT_BYTES: both run in one group)
    chain = [node(k, "add", ref(k - 1), 0) for k in range(1, 300)]
    bad = graph("tiny-gpt2", sites=["embed.hook_in"],
                nodes=[node(0, "site.read", 0), *chain, node(300, "add", ref(299), 10_000),
                       node(301, "site.write", 0, ref(300), mode="replace")])
    a, b = PipelinedClient(small_pair_server.url, KEY_A), \
        PipelinedClient(small_pair_server.url, KEY_B)
    from hookwire.server.worker import ModelWorker
    retries = []
    run_again = ModelWorker._run_again

    def counted(self, ready, crash):
        retries.append(len(ready))
        return run_again(self, ready, crash)
    monkeypatch.setattr(ModelWorker, "_run_again", counted)
    saved = dict(entry.value_ranges)
    entry.value_ranges.clear()  # the bad ids reach the model: the batch fails, goes again
    try:
        rid = a.send(held, {"input_ids": tokens, "c": c})
        alone = a.collect([rid])[rid]
        assert alone.error is None and torch.equal(alone.values["c"], c)
        for _ in range(6):
            ra = a.send(held, {"input_ids": tokens, "c": c})
            rb = b.send(bad, {"input_ids": tokens})
            wb, wa = b.collect([rb])[rb], a.collect([ra])[ra]
            assert wb.error is not None
            if retries:
                break
        assert retries, "the pair never shared a forward"
        assert wa.error is None, wa.error
        assert torch.equal(wa.values["c"], c)
    finally:
        entry.value_ranges.update(saved)
        a.close()
        b.close()


def test_other_users_unread_results_do_not_fail_a_graph_that_holds_its_saves(hosted,
                                                                             local_models):
    """A save sent at once is checked against its own user's share only (then counted):
    other users' unread results never fail a running request. Held until the graph's
    in-place write, it must not either -- it was reserved like a new submit, against the
    server-wide budget too, so a co-tenant whose results pile up failed it mid-forward."""
    from hookwire.validate import Limits
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A], limits=Limits(max_pending_bytes_per_user=16 * MiB,
                                                   max_pending_bytes_total=24 * MiB))
    client = PipelinedClient(srv.url, KEY_A)
    memory = srv.server.memory
    memory.force("a co-tenant", 20 * MiB)  # its results, unread
    try:
        tokens = local_models["tiny-gpt2"].to_tokens(["others' results are theirs"])
        seq, width = tokens.shape[1], local_models["tiny-gpt2"].cfg.d_model
        copies = -(-5 * MiB // (seq * width * 4))
        for write in (False, True):
            rid = client.send(big_save(copies, write), {"input_ids": tokens})
            answer = client.collect([rid])[rid]
            assert answer.error is None, (write, answer.error)
            assert answer.values["big"].shape[0] == copies
    finally:
        memory.release("a co-tenant", 20 * MiB)
        client.close()
        srv.stop()


def keep_replacement_then_scale() -> dict:
    """Replace resid_post(0) by y = 2x and keep y; scale resid_pre(1) -- y itself, as the
    model goes on with it -- in place: locally the kept y shows the edit."""
    return graph("tiny-gpt2", sites=[P0, R1],
                 nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 2.0),
                        node(2, "site.write", 0, ref(1), mode="replace"),
                        node(3, "site.read", 1), node(4, "mul", ref(3), 0.5),
                        node(5, "site.write", 1, ref(4), mode="inplace")],
                 saves={"y": 1})


def test_a_kept_replacement_follows_the_batch_rows_it_was_copied_into(pair_server,
                                                                      local_models):
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["the same tensor at two sites"])
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        ga = keep_replacement_then_scale()
        solo = solo_answer(a, ga, tokens)
        kept = {}

        def replace(x, hook):
            kept["y"] = x * 2.0
            return kept["y"]

        def halve(x, hook):
            x.mul_(0.5)
        with torch.no_grad():
            local = bridge.run_with_hooks(tokens, fwd_hooks=[(P0, replace), (R1, halve)])
        torch.testing.assert_close(solo.values["y"], kept["y"])
        torch.testing.assert_close(solo.values["__logits__"], local)
        reader = graph("tiny-gpt2", sites=[P0], nodes=[node(0, "site.read", 0)],
                       saves={"r": 0})
        wa, wb = run_pair(a, b, ga, reader, tokens, expect_batched=True)
        assert wa.error is None and wb.error is None and wa.batch_size == 2
        assert torch.equal(wa.values["__logits__"], solo.values["__logits__"])
        assert torch.equal(wa.values["y"], solo.values["y"])
    finally:
        a.close()
        b.close()


def keep_parts_of_replacement_then_scale() -> dict:
    """Replace resid_post(0) by y = 2x and keep parts of y (a position slice, a transposed
    stepped slice, one row's position, a broadcast): views of it, as ``cache[k] = y[:, 1:3]``
    keeps one; then scale resid_pre(1) (y itself) in place: locally each kept part shows it."""
    every = {"slice": [None, None, None]}
    return graph("tiny-gpt2", sites=[P0, R1],
                 nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 2.0),
                        node(2, "site.write", 0, ref(1), mode="replace"),
                        node(3, "getitem", ref(1), [every, {"slice": [1, 3, None]}]),
                        node(4, "getitem", ref(1), [every, {"slice": [0, 7, 2]},
                                                    {"slice": [3, 40, 3]}]),
                        node(5, "transpose", ref(4), 1, 2),
                        node(6, "select", ref(1), 1, 4),
                        node(7, "expand", ref(6), 3, -1),
                        node(8, "site.read", 1), node(9, "mul", ref(8), 0.5),
                        node(10, "site.write", 1, ref(9), mode="inplace")],
                 saves={"y": 1, "part": 3, "stepped": 5, "row": 6, "wide": 7})


def test_kept_parts_of_a_replacement_follow_the_batch_rows_it_was_copied_into(pair_server,
                                                                             local_models):
    """Views of a member's replacement followed it into the batch only when whole: a part
    (``y[:, 1:3]``) stayed on the replacement, which the batched forward no longer uses, so a
    later in-place edit showed solo (and locally) but not co-batched."""
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["the same tensor at two sites"])
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        ga = keep_parts_of_replacement_then_scale()
        solo = solo_answer(a, ga, tokens)
        kept = {}

        def replace(x, hook):
            y = kept["y"] = x * 2.0
            kept["part"] = y[:, 1:3]
            kept["stepped"] = y[:, 0:7:2, 3:40:3].transpose(1, 2)
            kept["row"] = y.select(1, 4)
            kept["wide"] = kept["row"].expand(3, -1)
            return y

        def halve(x, hook):
            x.mul_(0.5)
        with torch.no_grad():
            local = bridge.run_with_hooks(tokens, fwd_hooks=[(P0, replace), (R1, halve)])
        assert_close(solo.values["__logits__"], local)
        for k in ("y", "part", "stepped", "row", "wide"):
            assert_close(solo.values[k], kept[k], msg=k)
        reader = graph("tiny-gpt2", sites=[P0], nodes=[node(0, "site.read", 0)],
                       saves={"r": 0})
        wa, wb = run_pair(a, b, ga, reader, tokens, expect_batched=True)
        assert wa.error is None and wb.error is None and wa.batch_size == 2
        for k in ("__logits__", "y", "part", "stepped", "row", "wide"):
            assert torch.equal(wa.values[k], solo.values[k]), k
    finally:
        a.close()
        b.close()


def keep_view_then_scale(scale: float) -> dict:
    """Keep a view of resid_post(0) (positions 1:3, transposed), then scale resid_pre(1)."""
    return graph("tiny-gpt2", sites=[P0, R1],
                 nodes=[node(0, "site.read", 0),
                        node(1, "getitem", ref(0), [{"slice": [None, None, None]},
                                                    {"slice": [1, 3, None]}]),
                        node(2, "transpose", ref(1), 1, 2),
                        node(3, "site.read", 1), node(4, "mul", ref(3), scale),
                        node(5, "site.write", 1, ref(4), mode="inplace")],
                 saves={"p0": 0, "v": 2})


def test_right_padded_members_re_read_only_their_own_rows_and_positions(pair_server,
                                                                        local_models):
    bridge = local_models["tiny-gpt2"]
    short = bridge.to_tokens(["a short one"])
    long = bridge.to_tokens(["a longer request, right-padded beside the short one"])
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        ga, gb = keep_view_then_scale(0.5), keep_view_then_scale(-3.0)
        solo = {}
        for client, g, toks, tag in ((a, ga, short, "a"), (b, gb, long, "b")):
            rid = client.send(g, {"input_ids": toks})
            solo[tag] = client.collect([rid])[rid]
            assert solo[tag].error is None
        for _ in range(6):
            ra = a.send(ga, {"input_ids": short})
            rb = b.send(gb, {"input_ids": long})
            wa, wb = a.collect([ra])[ra], b.collect([rb])[rb]
            if wa.batch_size == 2:
                break
        assert wa.batch_size == 2, "never co-batched"
        for tag, w in (("a", wa), ("b", wb)):
            assert w.error is None
            for k in ("p0", "v", "__logits__"):
                assert_close(w.values[k], solo[tag].values[k], msg=f"{tag} {k}")
    finally:
        a.close()
        b.close()


def test_held_copies_count_in_what_batch_mates_may_hold_together(hosted, local_models):
    """Members share a forward while what they hold together fits max_total_value_bytes.
    A save of a site read is no op's value (vg.value_bytes leaves it out): sent at once it
    costs nothing there, but held until the graph's in-place write it is a device copy.
    Two graphs that each hold an attention pattern of ~0.6 of the limit no longer share a
    forward (solo each fits; both read-only ones still share one)."""
    from hookwire.validate import Limits
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["held copies are memory too"] * 2)
    cfg = bridge.cfg
    pattern = tokens.shape[0] * cfg.n_heads * tokens.shape[1] ** 2 * 4
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0,
                   api_keys=[KEY_A, KEY_B], batch_window_s=0.3,
                   limits=Limits(max_total_value_bytes=int(pattern / 0.6)))
    a, b = PipelinedClient(srv.url, KEY_A), PipelinedClient(srv.url, KEY_B)
    try:
        def pattern_graph(write: bool) -> dict:
            nodes = [node(0, "site.read", 0), node(1, "site.read", 1),
                     node(2, "mul", ref(1), 0.5)]
            if write:
                nodes.append(node(3, "site.write", 1, ref(2), mode="inplace"))
            return graph("tiny-gpt2", sites=["blocks.0.attn.hook_pattern", R1], nodes=nodes,
                         saves={"pattern": 0})
        wa, wb = run_pair(a, b, pattern_graph(False), pattern_graph(False), tokens,
                          expect_batched=True)
        assert wa.batch_size == 2 and wa.error is None and wb.error is None
        for _ in range(3):
            ra = a.send(pattern_graph(True), {"input_ids": tokens})
            rb = b.send(pattern_graph(True), {"input_ids": tokens})
            wa, wb = a.collect([ra])[ra], b.collect([rb])[rb]
            assert wa.error is None and wb.error is None
            assert wa.batch_size == 1 and wb.batch_size == 1
    finally:
        a.close()
        b.close()
        srv.stop()


def test_held_saves_of_one_tensor_still_arrive_as_one_value(pair_server, local_models):
    """resid_post(0) and resid_pre(1) are one tensor: sent at once, the second goes as a
    reference to the first (alias_result), so the client's two values alias as locally.
    Held (the graph edits a later site in place), they must too."""
    tokens = local_models["tiny-gpt2"].to_tokens(["one tensor, two names"])
    client = PipelinedClient(pair_server.url, KEY_A)
    try:
        for write_at in (None, 2):  # none; resid_post(1) (a later tensor)
            nodes = [node(0, "site.read", 0), node(1, "site.read", 1),
                     node(2, "site.read", 2), node(3, "mul", ref(2), 0.5)]
            if write_at is not None:
                nodes += [node(4, "mul", ref(write_at), 0.5),
                          node(5, "site.write", write_at, ref(4), mode="inplace")]
            g = graph("tiny-gpt2", sites=[P0, R1, "blocks.1.hook_resid_post"], nodes=nodes,
                      saves={"p0": 0, "r1": 1})
            rid = client.send(g, {"input_ids": tokens})
            answer = client.collect([rid])[rid]
            assert answer.error is None
            assert answer.values["r1"] is answer.values["p0"], write_at
    finally:
        client.close()


def test_a_batch_mates_replacement_of_a_view_site_does_not_change_what_a_member_kept(
        pair_server, local_models):
    """The same, where the site's activation is itself a view of a larger tensor (an MLP's
    output projection, handed on to the next hook point as it is)."""
    s0, s1 = "blocks.0.mlp.out.hook_out", "blocks.0.mlp.hook_out"
    tokens = local_models["tiny-gpt2"].to_tokens(["the same tensor at two sites"])
    ga = graph("tiny-gpt2", sites=[s0, s1],
               nodes=[node(0, "site.read", 0), node(1, "getitem", ref(0),
                                                    [{"slice": [None, None, None]},
                                                     {"slice": [1, 4, None]}]),
                      node(2, "site.read", 1), node(3, "mul", ref(2), 0.5),
                      node(4, "site.write", 1, ref(3), mode="inplace")],
               saves={"kept": 0, "part": 1})
    gb = graph("tiny-gpt2", sites=[s0],
               nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 3.0),
                      node(2, "site.write", 0, ref(1), mode="replace")],
               saves={})
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        solo = solo_answer(a, ga, tokens)
        kept = {}

        def keep(x, hook):
            kept["kept"], kept["part"] = x, x[:, 1:4]

        def halve(x, hook):
            x.mul_(0.5)
        with torch.no_grad():
            local = local_models["tiny-gpt2"].run_with_hooks(
                tokens, fwd_hooks=[(s0, keep), (s1, halve)])
        assert_close(solo.values["__logits__"], local)
        assert_close(solo.values["kept"], kept["kept"])
        assert_close(solo.values["part"], kept["part"])
        wb, wa = run_pair(b, a, gb, ga, tokens, expect_batched=True)
        assert wa.error is None and wb.error is None and wa.batch_size == 2
        for k in ("__logits__", "kept", "part"):
            assert torch.equal(wa.values[k], solo.values[k]), k
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kept, later", [
    # The model hands one tensor to three sites: a batch mate replacing q's input gives the
    # q projection a copy, while k's and v's inputs (edited here) are still the original.
    ("blocks.0.attn.q.hook_in", ["blocks.0.attn.k.hook_in", "blocks.0.attn.v.hook_in"]),
    # The copy the forward went on with is freed after ln_final; the saves are re-read only
    # after the last write (the unembedding's output): solo, the read keeps the tensor alive.
    ("blocks.1.hook_out", ["ln_final.hook_in", "unembed.hook_out"]),
])
def test_what_a_member_kept_shows_its_later_edits_beside_a_replacing_batch_mate(
        pair_server, local_models, kept, later):
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["the same tensor at two sites"])
    nodes = [node(0, "site.read", 0)]
    for k in range(1, len(later) + 1):
        nodes += [node(10 * k, "site.read", k), node(10 * k + 1, "mul", ref(10 * k), 0.5),
                  node(10 * k + 2, "site.write", k, ref(10 * k + 1), mode="inplace")]
    ga = graph("tiny-gpt2", sites=[kept] + later, nodes=nodes, saves={"kept": 0})
    gb = graph("tiny-gpt2", sites=[kept],
               nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 3.0),
                      node(2, "site.write", 0, ref(1), mode="replace")], saves={})
    local_kept = {}

    def keep(x, hook):
        local_kept["kept"] = x

    def halve(x, hook):
        x.mul_(0.5)
    with torch.no_grad():
        local = bridge.run_with_hooks(tokens, fwd_hooks=[(kept, keep)] +
                                      [(name, halve) for name in later])
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        solo = solo_answer(a, ga, tokens)
        assert_close(solo.values["__logits__"], local)
        assert_close(solo.values["kept"], local_kept["kept"])
        wb, wa = run_pair(b, a, gb, ga, tokens, expect_batched=True)
        assert wa.error is None and wb.error is None and wa.batch_size == 2
        for k in ("__logits__", "kept"):
            assert torch.equal(wa.values[k], solo.values[k]), k
    finally:
        a.close()
        b.close()


def test_a_replacing_members_read_of_a_broadcast_site_is_not_overwritten_by_its_replacement(
        pair_server, local_models):
    """GPT-2's position embeddings are one row expanded over the batch (stride 0): a batch
    mate writing them in place gets a copy of its own rows, which every member then reads.
    A member replacing the same site had its replacement written into that very copy, so
    what it kept of its read showed its replacement (3x) -- only when co-batched with an
    in-place writer; solo (and locally) the replacement is a tensor of its own."""
    s0, s1 = "pos_embed.hook_out", "blocks.0.hook_resid_pre"
    tokens = local_models["tiny-gpt2"].to_tokens(["the same tensor at two sites"])
    # The victim keeps its read of the position embeddings (used after a later site) and
    # replaces them with 3x.
    victim = graph("tiny-gpt2", sites=[s0, s1],
                   nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 3.0),
                          node(2, "site.write", 0, ref(1), mode="replace"),
                          node(3, "site.read", 1), node(4, "mul", ref(3), 0.0),
                          node(5, "add", ref(4), ref(0))],
                   saves={"kept": 5})
    # The co-tenant writes the position embeddings in place (hook_pos_embed: the same
    # tensor, the copy once the victim has replaced it).
    writer = graph("tiny-gpt2", sites=["hook_pos_embed"],
                   nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), -7.0),
                          node(2, "site.write", 0, ref(1), mode="inplace")], saves={})
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        solo = solo_answer(a, victim, tokens)
        for order in ((a, b, victim, writer), (b, a, writer, victim)):
            first, second, g1, g2 = order
            w1, w2 = run_pair(first, second, g1, g2, tokens, expect_batched=True)
            got = w1 if first is a else w2
            assert got.error is None and got.batch_size == 2, got.error
            for k in ("__logits__", "kept"):
                assert torch.equal(got.values[k], solo.values[k]), k
    finally:
        a.close()
        b.close()


def test_flat_views_of_a_replacement_follow_the_batch_rows_it_was_copied_into(pair_server,
                                                                             local_models):
    """A flat view of a member's replacement (``y.view(-1)``, a slice of it that runs from one
    position into the next, ``y.view(1, -1)``) is no view with a step per dimension: it was not
    followed into the batch rows the replacement was copied into, so the member's later
    in-place edit of the same tensor showed solo (and locally) but not co-batched."""
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["the same tensor at two sites"])
    ga = graph("tiny-gpt2", sites=[P0, R1, "ln_final.hook_in"],
               nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 2.0),
                      node(2, "site.write", 0, ref(1), mode="replace"),
                      node(3, "view", ref(1), -1),
                      node(4, "getitem", ref(3), {"slice": [60, 70, None]}),
                      node(5, "view", ref(1), 1, -1),
                      node(8, "site.read", 1), node(9, "mul", ref(8), 0.5),
                      node(10, "site.write", 1, ref(9), mode="inplace"),
                      # a value of the part used after the write (at a later site)
                      node(11, "site.read", 2), node(12, "mul", ref(11), 0.0),
                      node(13, "getitem", ref(12), [FULL, 0, {"slice": [0, 10, None]}]),
                      node(14, "add", ref(4), ref(13))],
               saves={"flat": 3, "across": 4, "row": 5, "later": 14})
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        rid = a.send(ga, {"input_ids": tokens})
        solo = a.collect([rid])[rid]
        assert solo.error is None and solo.batch_size == 1, solo.error
        kept = {}

        def replace(x, hook):
            y = x * 2.0
            kept["flat"], kept["row"] = y.view(-1), y.view(1, -1)
            kept["across"] = kept["flat"][60:70]
            return y

        def halve(x, hook):
            x.mul_(0.5)
        with torch.no_grad():
            local = bridge.run_with_hooks(tokens, fwd_hooks=[(P0, replace), (R1, halve)])
        assert_close(solo.values["__logits__"], local)
        for k in ("flat", "across", "row"):
            assert_close(solo.values[k], kept[k], msg=k)
        assert_close(solo.values["later"], kept["across"].unsqueeze(0))
        reader = graph("tiny-gpt2", sites=[P0], nodes=[node(0, "site.read", 0)],
                       saves={"r": 0})
        wa, wb = run_pair(a, b, ga, reader, tokens, expect_batched=True)
        assert wa.error is None and wb.error is None and wa.batch_size == 2
        for k in ("__logits__", "flat", "across", "row", "later"):
            assert torch.equal(wa.values[k], solo.values[k]), k
    finally:
        a.close()
        b.close()


def broadcast_then_scale() -> dict:
    """Replace resid_post(0) with its first position broadcast over the sequence (one row
    of memory: ``x[:, :1].expand_as(x)``), then scale resid_pre(1) -- the same tensor -- in
    place: torch refuses the write into a tensor whose elements share memory."""
    first = [{"slice": [None, None, None]}, {"slice": [0, 1, None]},
             {"slice": [None, None, None]}]
    return graph("tiny-gpt2", sites=[P0, R1],
                 nodes=[node(0, "site.read", 0), node(1, "getitem", ref(0), first),
                        node(2, "expand_as", ref(1), ref(0)),
                        node(3, "site.write", 0, ref(2), mode="replace"),
                        node(4, "site.read", 1), node(5, "mul", ref(4), 2.0),
                        node(6, "site.write", 1, ref(5), mode="inplace")],
                 saves={})


def test_a_write_into_a_broadcast_replacement_fails_co_batched_as_solo(pair_server,
                                                                       local_models,
                                                                       monkeypatch):
    """Solo (and locally in TL) the forward goes on with the broadcast replacement, and the
    later in-place write into it fails; a batch copied the replacement into the member's
    rows, where the write succeeded -- co-batched a value came back where solo an error
    did. (The shared forward now stops at such a replacement and its members run again
    without each other, hookwire.batching.LayoutNotShared; a member left alone in its batch
    goes on with the copy, and its write fails there as solo: Interleaver.copied.)"""
    bridge = local_models["tiny-gpt2"]
    tokens = bridge.to_tokens(["a row broadcast, then written"])

    def expand(x, hook):
        return x[:, :1].expand_as(x)

    def scale(x, hook):
        x.mul_(2.0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="single memory location"):
        bridge.run_with_hooks(tokens, fwd_hooks=[(P0, expand), (R1, scale)])
    bridge.reset_hooks(including_permanent=True)
    retries = record_retries(monkeypatch)
    a, b = PipelinedClient(pair_server.url, KEY_A), PipelinedClient(pair_server.url, KEY_B)
    try:
        g = broadcast_then_scale()
        rid = a.send(g, {"input_ids": tokens})
        solo = a.collect([rid])[rid]
        assert solo.error is not None and "single memory location" in solo.error.message
        reader = graph("tiny-gpt2", sites=[P0], nodes=[node(0, "site.read", 0)],
                       saves={"p0": 0})
        rid = b.send(reader, {"input_ids": tokens})
        reader_solo = b.collect([rid])[rid]
        for _ in range(4):
            wa, ra = run_pair(a, b, g, reader, tokens, expect_batched=False)
            assert wa.error is not None, "co-batched, the write into the broadcast succeeded"
            assert wa.error.message == solo.error.message
            assert ra.error is None
            assert torch.equal(ra.values["p0"], reader_solo.values["p0"])
            assert torch.equal(ra.values["__logits__"], reader_solo.values["__logits__"])
            assert wa.batch_size in (0, 1) and ra.batch_size == 1
        # Validation traced the broadcast replacement: the member runs alone from the start,
        # no shared forward is begun and stopped (LayoutNotShared) for it.
        assert not retries, retries
    finally:
        a.close()
        b.close()
