"""Shared weights never change: hash every parameter and buffer of the served models (the TL
bridge and the HF tree module sites run on), then send the whole hostile corpus, in-place
and replacing writes of NaN into every site of both models, a backward pass, and a fuzzing
batch through the server -- and check the hashes, that no weight got a ``.grad``, that no
hook was left on any module, and that a clean request's result is bit-identical before and
after."""
from __future__ import annotations

import hashlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing as fz
from hookwire.client import Connection
from hookwire.errors import ExecutionError, HookwireError
from hookwire.frames import tensor_bytes
from hostile.runner import PAYLOAD_MARKER, load_corpus, resident_ids, run_case
from known_good import good_graph
from weight_memory import sites_sharing_weight_memory

from conftest import MODEL_NAMES


# A view expanded over the batch: torch refuses in-place writes into it (tested below).
BROADCAST_SITE = "pos_embed.hook_out"


def _modules(server):
    for name, entry in server.server.entries.items():
        yield f"{name}/bridge", entry.hosted.bridge
        if entry.hf_model is not None:
            yield f"{name}/hf", entry.hf_model


def weight_state(server) -> dict:
    """name -> (sha256 of dtype, shape and bytes; requires_grad; grad is None)."""
    out = {}
    for prefix, module in _modules(server):
        for kind, named in (("param", module.named_parameters(remove_duplicate=False)),
                            ("buffer", module.named_buffers(remove_duplicate=False))):
            for name, t in named:
                h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(tensor_bytes(t))
                out[f"{prefix}:{kind}:{name}"] = (h.hexdigest(), t.requires_grad, t.grad is None)
    return out


def hooks_on_modules(server) -> dict:
    """Hooks torch holds on every module (the model's own, e.g. HF output capturing, and
    whatever a request left behind)."""
    return {f"{prefix}:{name}": (len(m._forward_hooks), len(m._forward_pre_hooks),
                                 len(m._backward_hooks))
            for prefix, module in _modules(server) for name, m in module.named_modules()}


def clean_results(conn, tokens) -> dict:
    return {model: conn.run(good_graph(model), {"input_ids": tokens}).values
            for model in MODEL_NAMES}


def write_everywhere(model: str, sites: list, module_sites: bool, mode: str,
                     skip_broadcast: bool = True) -> dict:
    """Read every site of one kind and write NaN (zeros for integer sites) back into it."""
    chosen = [s for s in sites if s.name.startswith("hf:") == module_sites and
              not (skip_broadcast and mode == "inplace" and s.name == BROADCAST_SITE)]
    nodes = []
    for k, s in enumerate(chosen):
        read = len(nodes)
        fill = 0 if not s.dtype.is_floating_point else {"float": "nan"}
        nodes += [{"id": read, "op": "site.read", "args": [k]},
                  {"id": read + 1, "op": "full_like", "args": [{"ref": read}, fill]},
                  {"id": read + 2, "op": "site.write", "args": [k, {"ref": read + 1}],
                   "kwargs": {"mode": mode}}]
    return {"version": 1, "model": model, "inputs": {"input_ids": "input_ids"},
            "sites": [{"name": s.name, "call": s.call} for s in chosen], "nodes": nodes,
            "saves": {}, "forward": {"return_type": "logits"}}


def backward_graph(model: str) -> dict:
    """The gradient of the logits' sum at one residual stream site."""
    return {"version": 1, "model": model, "inputs": {"input_ids": "input_ids"},
            "sites": [{"name": "blocks.0.hook_out"}],
            "nodes": [{"id": 0, "op": "site.read", "args": [0]},
                      {"id": 1, "op": "output.read", "args": ["logits"]},
                      {"id": 2, "op": "sum", "args": [{"ref": 1}]},
                      {"id": 3, "op": "site.grad", "args": [0]}],
            "saves": {"grad": 3}, "backward": 2, "forward": {"return_type": "logits"}}


@pytest.fixture
def conns(server):
    mine, other = Connection(server.url), Connection(server.url)
    yield mine, other
    other.close()
    mine.close()


def test_weights_unchanged_after_hostile_traffic(server, conns, tokens):
    conn, other = conns
    before, hooks_before = weight_state(server), hooks_on_modules(server)
    assert len(before) > 100 and all(grad_none for _, _, grad_none in before.values())
    clean_before = clean_results(conn, tokens)

    # 1. the whole hostile corpus
    ids = resident_ids(conn, other, good_graph("tiny-gpt2"), tokens)
    for case in load_corpus():
        run_case(conn, case, tokens, ids)
    assert not PAYLOAD_MARKER.exists()

    # 2. NaN written into every site of both models, in place and as a replacement
    ran = 0
    for model in MODEL_NAMES:
        sites = conn.model_info(model).sites
        for module_sites in (False, True):
            for mode in ("inplace", "replace"):
                result = conn.run(write_everywhere(model, sites, module_sites, mode),
                                  {"input_ids": tokens})
                assert result.values["__logits__"].isnan().any()
                ran += 1
        grad = conn.run(backward_graph(model), {"input_ids": tokens}).values["grad"]
        assert grad.shape[:2] == tokens.shape and grad.abs().sum() > 0
    assert ran == 8

    # 3. a fuzzing batch through the same server
    outcomes = []

    @settings(max_examples=150, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data(), st.integers(0, 10 ** 6))
    def fuzz_batch(data, seed):
        graph = data.draw(fz.graphs(server.server.entries["tiny-gpt2"].sites))
        outcomes.append(fz.through_server(conn, graph, fz.tensors_for(seed, graph["constants"])))
    fuzz_batch()
    assert len(outcomes) == 150 and "ok" in outcomes

    after = weight_state(server)
    changed = [name for name in before if before[name] != after[name]]
    assert changed == [] and set(after) == set(before)
    assert hooks_on_modules(server) == hooks_before
    clean_after = clean_results(conn, tokens)
    for model in MODEL_NAMES:
        for name, value in clean_before[model].items():
            assert torch.equal(clean_after[model][name], value), (model, name)


def test_a_site_value_never_aliases_a_weight(server, tokens):
    """No site hands a graph a tensor that shares memory with a parameter or buffer (so an
    in-place write can only ever touch activations)."""
    for name, entry in server.server.entries.items():
        # (the table the server protects: every parameter and buffer of both trees)
        own = [t for model in (entry.hosted.bridge, entry.hf_model)
               for t in list(model.parameters()) + list(model.buffers()) if t.numel()]
        assert {t.untyped_storage().data_ptr() for t in own} <= entry.weight_storages
        shared, seen = sites_sharing_weight_memory(entry, tokens)
        assert len(seen) > 10, seen
        assert shared == [], f"{name}: sites aliasing weights: {shared}"


def test_hostile_errors_are_typed(server, conns, tokens):
    """Every corpus case is answered by a HookwireError subclass or a result (never an
    internal error), on a connection that then still works."""
    conn, other = conns
    ids = resident_ids(conn, other, good_graph("tiny-gpt2"), tokens)
    for case in load_corpus()[:20]:
        outcome = run_case(conn, case, tokens, ids)
        assert outcome.error != "internal_error"
    with pytest.raises(HookwireError):
        conn.run(good_graph("no-such-model"), {"input_ids": tokens})


def test_in_place_write_into_a_broadcast_site_is_a_typed_error(server, tokens):
    """GPT-2's position embeddings reach the residual stream as a view expanded over the
    batch: torch refuses to write into it in place, so the request gets an ExecutionError
    (not an internal error), like a local hook would, and the connection goes on."""
    conn = Connection(server.url)
    try:
        sites = [s for s in conn.model_info("tiny-gpt2").sites if s.name == "pos_embed.hook_out"]
        with pytest.raises(ExecutionError):
            conn.run(write_everywhere("tiny-gpt2", sites, False, "inplace", False),
                     {"input_ids": tokens})
        assert conn.run(good_graph("tiny-gpt2"), {"input_ids": tokens}).values["resid"].shape
    finally:
        conn.close()


def _parameter_graph(model: str, seq: int) -> dict:
    """Reads the model's own position embeddings ("@" constant) and puts a view of them where
    the model goes on: as the replacement of the position embedding's output, in place into
    the residual stream, and through a functional setitem of the parameter itself."""
    wpe = {"const": "@transformer.wpe.weight"}
    return {"version": 1, "model": model, "inputs": {"input_ids": "input_ids"},
            "constants": ["@transformer.wpe.weight"],
            "sites": [{"name": "hf:transformer.wpe:output"}, {"name": "hf:transformer.drop:output"}],
            "nodes": [{"id": 0, "op": "getitem", "args": [wpe, [{"slice": [0, seq, None]}]]},
                      {"id": 1, "op": "unsqueeze", "args": [{"ref": 0}, 0]},
                      {"id": 2, "op": "site.read", "args": [0]},
                      {"id": 3, "op": "site.write", "args": [0, {"ref": 1}],
                       "kwargs": {"mode": "replace"}},
                      {"id": 4, "op": "setitem", "args": [wpe, [0], {"float": "nan"}]},
                      {"id": 5, "op": "site.read", "args": [1]},
                      {"id": 6, "op": "expand_as", "args": [{"ref": 1}, {"ref": 5}]},
                      {"id": 9, "op": "site.write", "args": [1, {"ref": 6}],
                       "kwargs": {"mode": "inplace"}},
                      {"id": 7, "op": "getitem", "args": [{"ref": 4}, [0]]}],
            "saves": {"nan_row": 7, "wpe": 0}, "forward": {"return_type": "logits"}}


def test_graphs_reading_parameters_cannot_change_them(server, tokens):
    """"@<name>" constants are the served tensors themselves: every op is functional, and a
    value sharing a parameter's storage is copied before the model goes on with it."""
    conn = Connection(server.url)
    try:
        before = weight_state(server)
        values = conn.run(_parameter_graph("tiny-gpt2", tokens.shape[1]),
                          {"input_ids": tokens}).values
        assert values["nan_row"].isnan().all()          # computed on a copy...
        wpe = server.server.entries["tiny-gpt2"].parameters["transformer.wpe.weight"]
        torch.testing.assert_close(values["wpe"], wpe[:tokens.shape[1]])
        assert weight_state(server) == before           # ...the served weights unchanged
        graph = _parameter_graph("tiny-gpt2", tokens.shape[1])
        graph["nodes"].append({"id": 10, "op": "const.grad",
                               "args": [{"const": "@transformer.wpe.weight"}]})
        graph["backward"] = 1
        with pytest.raises(HookwireError, match="never differentiated"):
            conn.run(graph, {"input_ids": tokens})
        graph = _parameter_graph("tiny-gpt2", tokens.shape[1])
        graph["constants"] = ["@transformer.no_such.weight"]
        graph["nodes"][0]["args"][0] = {"const": "@transformer.no_such.weight"}
        with pytest.raises(HookwireError, match="no parameter"):
            conn.run(graph, {"input_ids": tokens})
        assert weight_state(server) == before
    finally:
        conn.close()
