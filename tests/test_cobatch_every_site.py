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
from graphs import read_graph, write_graph
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
