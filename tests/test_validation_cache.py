"""The server's cache of validated graphs (server/validation_cache.py): a repeated graph is
not validated again, and nothing validation depends on can be changed under a cached entry --
constants' shapes, dtypes and strides, the values of the small integer and boolean constants
whose values decide shapes (a mask), the input's size. Results equal local TL on every call,
hits and misses alike, and a graph that fails validation fails every time with its own
error."""
from __future__ import annotations

import pytest
import torch

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.errors import GraphValidationError
from hookwire.graph import Graph
from hookwire.server.validation_cache import ValidationCache

SITE = "blocks.0.hook_resid_post"
FULL = {"slice": [None, None, None]}


def masked_graph(model: str = "tiny-gpt2") -> dict:
    """Save the residual at the positions a boolean mask picks, and add a constant there."""
    index = [FULL, {"const": "mask"}]
    nodes = [{"id": 0, "op": "site.read", "args": [0]},
             {"id": 1, "op": "getitem", "args": [{"ref": 0}, index]},
             {"id": 2, "op": "add", "args": [{"ref": 1}, {"const": "delta"}]},
             {"id": 3, "op": "setitem", "args": [{"ref": 0}, index, {"ref": 2}]},
             {"id": 4, "op": "site.write", "args": [0, {"ref": 3}],
              "kwargs": {"mode": "replace"}}]
    return {"model": model, "inputs": {"input_ids": "input_ids"}, "constants": ["mask", "delta"],
            "sites": [{"name": SITE}], "nodes": nodes, "saves": {"picked": 1},
            "forward": {"return_type": "logits"}}


def local(bridge, tokens, mask, delta):
    seen = {}

    def hook(act, hook):
        seen["picked"] = act[:, mask].clone()
        act[:, mask] = act[:, mask] + delta
        return act
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(SITE, hook)])
    return logits, seen["picked"]


def test_keys_cover_what_validation_reads():
    graph = Graph.model_validate(masked_graph())
    cache = ValidationCache()
    mask = torch.tensor([True, False, True, False])
    delta = torch.randn(1, 2, 64)
    outputs = {"logits": ((1, 4, 100), torch.float32)}
    base = cache.key(graph, {"mask": mask, "delta": delta}, 1, 4, outputs)
    assert base is not None
    # Float values do not change what validation computes: same key (a sweep hits).
    assert cache.key(graph, {"mask": mask, "delta": torch.randn(1, 2, 64)}, 1, 4,
                     outputs) == base
    others = [
        cache.key(graph, {"mask": torch.tensor([True, True, True, False]), "delta": delta},
                  1, 4, outputs),                                        # mask values
        cache.key(graph, {"mask": mask, "delta": torch.randn(1, 3, 64)}, 1, 4, outputs),
        cache.key(graph, {"mask": mask, "delta": delta.double()}, 1, 4, outputs),
        cache.key(graph, {"mask": mask, "delta": torch.randn(64, 2, 1).permute(2, 1, 0)},
                  1, 4, outputs),                                        # strides
        cache.key(graph, {"mask": mask, "delta": delta}, 2, 4, outputs),  # batch
        cache.key(graph, {"mask": mask, "delta": delta}, 1, 5, outputs),  # sequence
        cache.key(graph, {"mask": mask, "delta": delta}, 1, 4,
                  {"logits": ((1, 4, 101), torch.float32)}),             # output shapes
        cache.key(Graph.model_validate({**masked_graph(), "saves": {"other": 1}}),
                  {"mask": mask, "delta": delta}, 1, 4, outputs),        # the graph
    ]
    assert None not in others and base not in others and len(set(others)) == len(others)
    # Real constants too large to hash cheaply: not cached at all.
    assert ValidationCache(max_real_bytes=2).key(graph, {"mask": mask, "delta": delta}, 1, 4,
                                                 outputs) is None
    # Bounded: the least recently used entry goes.
    small = ValidationCache(max_entries=2)
    tables = ({}, {})
    for k in (b"a", b"b", b"c"):
        small.put(k, object(), tables)
    assert small.get(b"a", tables) is None and small.get(b"c", tables) is not None
    # Validated against other site tables (other TL hook switches): not this entry.
    assert small.get(b"c", ({}, {})) is None


@pytest.fixture(scope="module")
def server(hosted):
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    yield srv
    srv.stop()


def test_a_sweep_hits_the_cache_and_every_call_equals_local(server, hosted):
    bridge = hosted["tiny-gpt2"].bridge
    cache = server.server.worker.validated
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    d = bridge.cfg.d_model
    conn = Connection(server.url)
    try:
        masks = [torch.tensor([True, False, True, False, False, True]),
                 torch.tensor([True, False, True, False, False, True]),   # a repeat: a hit
                 torch.tensor([False, True, True, True, False, True])]    # more positions
        hits = []
        for i, mask in enumerate(masks):
            delta = torch.randn(1, int(mask.sum()), d, generator=torch.Generator().manual_seed(i))
            before = cache.hits
            result = conn.run(masked_graph(), {"input_ids": tokens, "mask": mask,
                                               "delta": delta})
            hits.append(cache.hits - before)
            logits, picked = local(bridge, tokens, mask, delta)
            torch.testing.assert_close(result.values["picked"], picked)
            torch.testing.assert_close(result.values["__logits__"], logits)
        assert hits == [0, 1, 0], hits
        # The cached graph met a delta of the wrong shape: validation runs (a new key) and
        # refuses it, every time, naming the node.
        for _ in range(2):
            with pytest.raises(GraphValidationError, match="node 2"):
                conn.run(masked_graph(), {"input_ids": tokens, "mask": masks[0],
                                          "delta": torch.randn(1, 4, d)})
        # And the cached entry still serves the right shapes afterwards.
        delta = torch.randn(1, 3, d)
        result = conn.run(masked_graph(), {"input_ids": tokens, "mask": masks[0],
                                           "delta": delta})
        torch.testing.assert_close(result.values["picked"], local(bridge, tokens, masks[0],
                                                                  delta)[1])
    finally:
        conn.close()
