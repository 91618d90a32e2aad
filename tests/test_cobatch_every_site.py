"""Co-batching equals solo at every site: for every site of every model the server serves
(read from the server's own manifest, so families added later are covered without touching
this file), a request that writes that site (replacing it, and in place) shares a forward
with a request that reads every site, and the reader's every value and its logits are
bit-equal to the reader's solo run. Sites that are not batch-major (GPT-2's position ids,
Llama's rotary tables, anything else whose shape does not put the batch in its own dim) must
not let a write reach the batch mate: the writer then runs alone (batch size 1), as does a
writer that replaces a site where that changes the code path of the whole forward. Every
other writer of a batch-major site must really have shared the forward (batch size 2), and
its own logits equal a local TransformerLens run with the same hook."""
from __future__ import annotations

import pytest
import torch

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.module_sites import is_module_site
from hookwire.batching import is_batch_major

from conftest import MODEL_NAMES
from graphs import graph, node, read_graph, ref, write_graph
from pipelined import PipelinedClient, equal_values, run_pair

WRITER_KEY, READER_KEY = "writer-key-0123456789abcdef", "reader-key-0123456789abcdef"
TEXT = "hello world, again"


@pytest.fixture(scope="module")
def pair_server(hosted):
    """Two users (two keys), a short batch window: a pair sent back to back shares a batch."""
    srv = hs.start(models={n: h.bridge for n, h in hosted.items()}, port=0,
                   api_keys=[WRITER_KEY, READER_KEY], batch_window_s=0.05)
    yield srv
    srv.stop()


def writer_graph(model: str, name: str, call: int, dtype: str, mode: str) -> dict:
    """Overwrite the site with a different value of its own shape, dtype and range (see
    graphs.write_graph)."""
    return write_graph(model, [(name, call, dtype)], mode)


def local_writer_logits(bridge, tokens, name: str, call: int, mode: str):
    """The same write with a TL hook, locally: logits, or the exception TL raises."""
    calls = [0]

    def hook(act, hook):
        k = calls[0]
        calls[0] += 1
        if k != call:
            return None
        new = act.flip(-1) if not act.is_floating_point() else act * -3.0 + 1.0
        if mode == "inplace":
            act.copy_(new)
            return None
        return new
    try:
        with torch.no_grad():
            # A copy: an in-place write into the token ids would change the caller's tensor.
            return bridge.run_with_hooks(tokens.clone(), fwd_hooks=[(name, hook)])
    except RuntimeError as exc:
        return exc


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_cobatching_equals_solo_at_every_site(pair_server, local_models, model):
    info = Connection(pair_server.url, WRITER_KEY).model_info(model)
    bridge = local_models[model]
    tokens = bridge.to_tokens([TEXT])
    writer = PipelinedClient(pair_server.url, WRITER_KEY)
    reader = PipelinedClient(pair_server.url, READER_KEY)
    # Sites where a *replacing* write changes the forward's code path for every row (TL's
    # normalization bridges recompute from hooked values): found by the server at start-up
    # (server/batch_probe.py); such a writer runs alone too.
    solo_replace = pair_server.server.entries[model].solo_replace_sites
    assert len(solo_replace) < len(info.sites) // 10, solo_replace
    checked = {"batched": 0, "alone": 0}
    try:
        for kind in ("tl", "hf"):
            sites = [s for s in info.sites if is_module_site(s.name) == (kind == "hf")]
            rgraph = read_graph(model, [(s.name, s.call) for s in sites])
            rid = reader.send(rgraph, {"input_ids": tokens})
            solo = reader.collect([rid])[rid]
            assert solo.error is None and solo.batch_size == 1, solo.error
            for site in sites:
                dtype = str(site.dtype).removeprefix("torch.")
                batch_major = is_batch_major(site.shape)
                for mode in ("replace", "inplace"):
                    # Module-site graphs (pyvene, hookwire.hf) never share a forward.
                    expect_batched = batch_major and kind == "tl" and not (
                        mode == "replace" and (site.name, site.call) in solo_replace)
                    wgraph = writer_graph(model, site.name, site.call, dtype, mode)
                    wa, ra = run_pair(writer, reader, wgraph, rgraph, tokens, expect_batched)
                    where = f"{model} {site.name} (call {site.call}) {mode}"
                    assert ra.error is None, f"{where}: the reader failed: {ra.error}"
                    assert equal_values(ra.values, solo.values), \
                        f"{where}: a batch mate's write changed the reader's values"
                    if not expect_batched:
                        assert wa.batch_size in (0, 1) and ra.batch_size == 1, where
                    checked["batched" if expect_batched else "alone"] += 1
                    if kind == "hf":
                        continue
                    local = local_writer_logits(bridge, tokens, site.name, site.call, mode)
                    if isinstance(local, Exception):
                        assert wa.error is not None, f"{where}: TL raised {local}, remote not"
                    else:
                        assert wa.error is None, f"{where}: {wa.error}"
                        torch.testing.assert_close(wa.values["__logits__"], local,
                                                   rtol=1e-5, atol=1e-5, equal_nan=True,
                                                   msg=where)
    finally:
        writer.close()
        reader.close()
    # Both kinds of site exist on both built-in families: the test covered both rules.
    assert checked["batched"] > 0 and checked["alone"] > 0, checked


def keep_then_edit_later_graph(model: str, kept, later) -> dict:
    """Keep the value at site ``kept`` ((name, call)), then halve every site of ``later``
    in place: where a later site is handed the kept tensor (or a view of it), the kept value
    shows the edit, as it does locally."""
    nodes = [node(0, "site.read", 0)]
    for k in range(1, len(later) + 1):
        nodes += [node(10 * k, "site.read", k), node(10 * k + 1, "mul", ref(10 * k), 0.5),
                  node(10 * k + 2, "site.write", k, ref(10 * k + 1), mode="inplace")]
    return graph(model, nodes=nodes, sites=[kept] + list(later), saves={"kept": 0})


def local_keep_then_edit_later(bridge, tokens, kept, later):
    """The same with TL hooks, locally: (logits, the kept value)."""
    out, seen = {}, {}

    def keep(act, hook):
        seen[kept[0]] = seen.get(kept[0], -1) + 1
        if seen[kept[0]] == kept[1]:
            out["kept"] = act

    def halve(act, hook):
        act.mul_(0.5)
    hooks = [(kept[0], keep)] + [(name, halve) for name, _ in later if name != kept[0]]
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens.clone(), fwd_hooks=hooks)
    return logits, out["kept"]


def as_tl_shows(raw, shape):
    """A raw site's value as TL's hook shows it: split into heads (q, k, v, z: a reshape),
    or heads before positions (Llama's rotated q and k: a transpose)."""
    if raw.shape == shape:
        return raw
    if raw.dim() == len(shape) == 4 and raw.transpose(1, 2).shape == shape:
        return raw.transpose(1, 2)
    return raw.reshape(shape)


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_a_kept_value_shows_later_edits_beside_a_batch_mate_that_replaces_its_site(
        pair_server, local_models, model):
    """Held saves at every site: a member keeps site S and halves every later site in place
    (so a later site handed S's tensor edits what it kept), while a batch mate replaces S
    (the forward goes on with a copy). The member's kept value and logits equal its solo run,
    which equals local TL. On 72548a0 this found 22 sites of GPT-2 and more of Llama where
    the kept value missed the edits: the copy the forward went on with died before the saves
    were re-read (solo, the graph's own value of the read keeps it alive); a site whose
    activation is a view (an MLP's output projection) was not followed at all; and where the
    model hands one tensor to several sites (an attention's q, k and v inputs, an MLP's gate
    and up inputs), an edit through the sites still given the replaced tensor did not reach
    the copy."""
    info = Connection(pair_server.url, WRITER_KEY).model_info(model)
    bridge = local_models[model]
    tokens = bridge.to_tokens([TEXT])
    solo_replace = pair_server.server.entries[model].solo_replace_sites
    sites = [s for s in info.sites if not is_module_site(s.name) and
             is_batch_major(s.shape) and str(s.dtype).startswith("torch.float")]
    writer = PipelinedClient(pair_server.url, WRITER_KEY)
    reader = PipelinedClient(pair_server.url, READER_KEY)
    batched, diffs = 0, []
    try:
        for i, site in enumerate(sites):
            # Later hook points, each by one of its names: calls beyond the first are left
            # out (TL hooks see them all), and so are other names of the kept site's own
            # hook point (it fires once: there the graph's read means the value before its
            # edits, see hookwire.held_saves).
            points = {id(bridge.hook_dict[site.name])}
            later = []
            for s in sites[i + 1:]:
                point = id(bridge.hook_dict[s.name])
                if s.call == 0 and point not in points:
                    points.add(point)
                    later.append((s.name, s.call))
            kept = (site.name, site.call)
            rgraph = keep_then_edit_later_graph(model, kept, later)
            rid = reader.send(rgraph, {"input_ids": tokens})
            solo = reader.collect([rid])[rid]
            where = f"{model} {site.name} (call {site.call})"
            assert solo.error is None and solo.batch_size == 1, (where, solo.error)
            if site.call == 0:
                logits, value = local_keep_then_edit_later(bridge, tokens, kept, later)
                torch.testing.assert_close(solo.values["__logits__"], logits, msg=where)
                torch.testing.assert_close(as_tl_shows(solo.values["kept"], value.shape),
                                           value, msg=where)
            dtype = str(site.dtype).removeprefix("torch.")
            expect_batched = (site.name, site.call) not in solo_replace
            wa, ra = run_pair(writer, reader,
                              writer_graph(model, site.name, site.call, dtype, "replace"),
                              rgraph, tokens, expect_batched)
            assert ra.error is None, f"{where}: {ra.error}"
            for key in ("kept", "__logits__"):
                if not torch.equal(ra.values[key], solo.values[key]):
                    diffs.append((where, key, ra.batch_size))
            batched += ra.batch_size == 2
    finally:
        writer.close()
        reader.close()
    assert batched > len(sites) // 2, (batched, len(sites))
    assert not diffs, "a batch mate's replacement changed what the member kept:\n" + \
        "\n".join(map(str, diffs))
