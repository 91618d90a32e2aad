"""Unit checks of the mechanisms SECURITY.md names that the corpus reaches only from outside:
sizing on meta before real work, the flops budget, frame sizes torch cannot represent, and
the node-count precheck."""
from __future__ import annotations

import json
import resource

import pytest
import torch

from pydantic import ValidationError

from hookwire.errors import FrameError, LimitExceeded, ProtocolError
from hookwire.frames import MAX_ELEMENTS, TensorAssembler, TensorHeader, numel
from hookwire.graph import Graph
from hookwire.ops import OPS
from hookwire.protocol import parse_client_message_bounded, request_id_of
from hookwire.shape_probe import run_for_shape
from hookwire.validate import Limits, infer_shapes, validate_structure


def constant_graph(nodes, constants=("c0",)):
    g = Graph.model_validate({"model": "m", "inputs": {"input_ids": "i"},
                              "constants": list(constants), "nodes": nodes})
    return validate_structure(g, {}, {}, Limits())


def test_real_int_constants_are_sized_on_meta_before_any_allocation():
    vg = constant_graph([{"id": 0, "op": "repeat", "args": [{"const": "c0"}, [40000, 40000]]}])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(LimitExceeded) as info:
        infer_shapes(vg, 1, 1, {"c0": torch.ones(1, dtype=torch.int64)}, Limits())
    assert info.value.details["rule"] == "max_value_bytes"
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 1 << 20, f"validation grew the process by {grown_kib} KiB"


def test_data_dependent_shapes_still_use_the_real_mask():
    vg = constant_graph([{"id": 0, "op": "getitem", "args": [{"const": "c0"}, {"const": "m"}]}],
                        constants=("c0", "m"))
    infer_shapes(vg, 1, 1, {"c0": torch.arange(6), "m": torch.tensor([1, 0, 1, 1, 0, 0]).bool()},
                 Limits())
    assert tuple(vg.shapes[0].shape) == (3,)
    out, cost = run_for_shape(OPS["repeat"], (torch.ones(2, dtype=torch.int64), (3,)), {},
                              1 << 20)
    assert torch.equal(out, torch.ones(6, dtype=torch.int64)) and cost.flops == 6


def test_contractions_are_held_to_the_flops_budget():
    nodes = [{"id": 0, "op": "expand", "args": [{"const": "c0"}, [3000, 3000]]},
             {"id": 1, "op": "matmul", "args": [{"ref": 0}, {"ref": 0}]}]
    c0 = {"c0": torch.ones(1, 1)}
    infer_shapes(constant_graph(nodes), 1, 1, c0, Limits())  # 5.4e10 flops: fine by default
    with pytest.raises(LimitExceeded) as info:
        infer_shapes(constant_graph(nodes), 1, 1, c0, Limits(max_flops=10 ** 10))
    assert info.value.details["rule"] == "max_flops"
    _, cost = run_for_shape(OPS["einsum"], ("ij,jk->ik", torch.empty(
        20, 30, device="meta"), torch.empty(30, 40, device="meta")), {}, 1 << 30)
    assert cost.flops == 2 * 20 * 30 * 40


@pytest.mark.parametrize("shape", [[0, 2 ** 70], [0, 2 ** 62, 2 ** 62], [2 ** 49], [-1]])
def test_shapes_torch_cannot_represent_are_frame_errors(shape):
    with pytest.raises(FrameError):
        numel(shape)
    with pytest.raises(FrameError):
        TensorAssembler([TensorHeader(tid="x", dtype="float32", shape=shape)], 1 << 20)
    assert numel([0, MAX_ELEMENTS]) == 0


def test_structure_is_capped_before_anything_is_parsed():
    """The server's one parse of a control message refuses a message of too many, or too
    densely packed, arrays/objects before json builds a single one; a refusal still names the
    submit it refuses; JSON nested 100,000 deep is a ProtocolError, not a RecursionError."""
    msg = json.dumps({"type": "submit", "graph": {"nodes": [{}] * 101}})
    with pytest.raises(LimitExceeded, match="more than 100"):
        parse_client_message_bounded(msg, 100)
    with pytest.raises(ProtocolError, match="too dense"):
        parse_client_message_bounded("[" + ",".join(["[]"] * 50_000) + "]", 10 ** 9)
    with pytest.raises(ProtocolError):
        parse_client_message_bounded("[" * 5000 + "]" * 5000, 10 ** 9)
    with pytest.raises(ProtocolError) as info:
        parse_client_message_bounded(json.dumps({"type": "submit", "request_id": "r7",
                                                 "graph": {"nodes": [{"id": -1}] * 3000}}),
                                     10 ** 9)
    assert info.value.request_id == "r7" and "graph.nodes.0.id" in info.value.message
    assert request_id_of({"type": "submit", "request_id": "x" * 65}) is None


def test_save_and_constant_names_are_bounded():
    base = {"model": "m", "inputs": {"input_ids": "i"}}
    with pytest.raises(ValidationError) as info:
        Graph.model_validate({**base, "saves": {"x" * 1000: 0}})
    assert "saves" in str(info.value)
    with pytest.raises(ValidationError):
        Graph.model_validate({**base, "constants": ["c" * 65]})
    assert Graph.model_validate({**base, "saves": {"résumé 🙂": 0}}).saves


def test_validation_keeps_only_small_cheap_results_real():
    """Results of ops on real constants stay real only while small and cheap (8 MiB, 1e8
    flops): a 1000x1000 integer matmul is sized, not computed, during validation."""
    ints = torch.ones(1000, 1000, dtype=torch.int64)
    out, cost = run_for_shape(OPS["matmul"], (ints, ints), {}, 1 << 31)
    assert out.device.type == "meta" and cost.flops == 2 * 1000 ** 3
    out, _ = run_for_shape(OPS["repeat"], (ints, (2, 1)), {}, 1 << 31)
    assert out.device.type == "meta" and tuple(out.shape) == (2000, 1000)
    out, _ = run_for_shape(OPS["add"], (ints[:10], 1), {}, 1 << 31)
    assert out.device.type == "cpu" and int(out.sum()) == 20000


def test_a_long_parse_gives_way_at_short_intervals():
    """A big control message's parse calls ``pause`` every few hundred objects and between
    pydantic slices (a server's large intake lane waits there while a batch runs: parsing
    10 MB beside a forward made a co-tenant's 10 ms request exceed a 1 s deadline), and the
    message it returns is the one parsed without pauses."""
    nodes = [{"id": 0, "op": "site.read", "args": [0]}] + [
        {"id": i, "op": "getitem", "args": [{"ref": i - 1}, [{"slice": [None, None, None]}, -1]]}
        for i in range(1, 4000)]
    msg = json.dumps({"type": "submit", "request_id": "big", "graph": {
        "model": "m", "inputs": {"input_ids": "input_ids"}, "sites": [{"name": "s"}],
        "nodes": nodes, "forward": {"return_type": None}}})
    calls = []
    rid, paused = parse_client_message_bounded(msg, 10 ** 9, pause=lambda: calls.append(1))
    _, plain = parse_client_message_bounded(msg, 10 ** 9)
    assert rid == "big" and paused == plain
    objects = msg.count("{")
    assert len(calls) >= objects // 256 > 30
