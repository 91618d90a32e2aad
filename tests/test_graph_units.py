"""Unit tests with no server: tensor frames, the argument vocabulary, schema export, the
tracer on its own, and the in-process interleaving executor against a local TL bridge."""
from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from graphs import FULL, graph
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from hookwire.errors import FrameError, GraphValidationError, LimitExceeded, TraceError
from hookwire.executor import Interleaver
from hookwire.frames import (DTYPES, MAX_HEADER_BYTES, TensorAssembler, TensorHeader,
                             bytes_to_tensor, decode_frame, encode_chunks, header_for, numel)
from hookwire.graph import Const, Graph, Ref, decode_arg, encode_arg, graph_json_schema
from hookwire.protocol import parse_client_message, protocol_json_schema
from hookwire.trace import Tracer, tracing
from hookwire.validate import Limits, infer_shapes, validate_structure

# ---- frames ------------------------------------------------------------------------------------


def make_tensor(dtype: torch.dtype, shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g,
                         dtype=torch.int64).to(dtype)


def round_trip(t: torch.Tensor, chunk_bytes: int = 1 << 20, rid="r1", tid="t1") -> torch.Tensor:
    header = header_for(tid, t)
    header = TensorHeader.model_validate_json(header.model_dump_json())  # as on the wire
    frames = list(encode_chunks(rid, tid, t, chunk_bytes))
    assert len(frames) >= 1
    assert all(isinstance(f, (bytes, bytearray)) for f in frames)
    asm = TensorAssembler([header], max_total_bytes=1 << 30)
    for f in frames:
        head, payload = decode_frame(f)
        assert head["rid"] == rid and head["tid"] == tid
        asm.add(head, payload)
    assert asm.complete
    return asm.tensors()[tid]


SHAPES = [(), (0,), (3, 0, 2), (5,), (2, 3), (2, 3, 4, 5)]


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_frames_round_trip_every_dtype(dtype_name, shape):
    t = make_tensor(DTYPES[dtype_name], shape)
    out = round_trip(t)
    assert out.dtype == t.dtype and tuple(out.shape) == tuple(shape)
    assert torch.equal(out, t)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float64", "bool", "int8"])
def test_frames_round_trip_in_many_small_chunks(dtype_name):
    t = make_tensor(DTYPES[dtype_name], (7, 13), seed=3)
    frames = list(encode_chunks("r", "t", t, chunk_bytes=5))
    assert len(frames) == math.ceil(t.numel() * t.element_size() / 5)
    out = round_trip(t, chunk_bytes=5)
    assert torch.equal(out, t)


def test_bfloat16_bits_survive_exactly():
    t = torch.tensor([1.0, -0.0, float("inf"), float("-inf"), 3.140625, 1e-38],
                     dtype=torch.bfloat16)
    out = round_trip(t)
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))
    nan = round_trip(torch.tensor([float("nan")], dtype=torch.bfloat16))
    assert torch.isnan(nan).all()


def test_non_contiguous_tensor_round_trips_as_its_values():
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).transpose(0, 2)
    assert not t.is_contiguous()
    assert torch.equal(round_trip(t), t)


def test_empty_tensor_still_sends_one_frame():
    frames = list(encode_chunks("r", "t", torch.empty(0, 4)))
    assert len(frames) == 1
    head, payload = decode_frame(frames[0])
    assert head["offset"] == 0 and len(payload) == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype_name=st.sampled_from(sorted(DTYPES)),
       shape=st.lists(st.integers(0, 5), min_size=0, max_size=4),
       chunk=st.integers(1, 64), seed=st.integers(0, 1000))
def test_frames_round_trip_property(dtype_name, shape, chunk, seed):
    t = make_tensor(DTYPES[dtype_name], tuple(shape), seed=seed)
    out = round_trip(t, chunk_bytes=chunk)
    assert out.dtype == t.dtype and out.shape == t.shape and torch.equal(out, t)


# ---- lying frames ------------------------------------------------------------------------------

def frame(head: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(head).encode()
    return struct.pack("<I", len(raw)) + raw + payload


def assembler_for(shape=(2, 3), dtype="float32", tid="t"):
    return TensorAssembler([TensorHeader(tid=tid, dtype=dtype, shape=list(shape))], 1 << 20)


def test_offset_beyond_buffer_refused():
    asm = assembler_for()
    with pytest.raises(FrameError):
        asm.add({"v": 1, "rid": "r", "tid": "t", "offset": 10_000}, memoryview(bytes(4)))


def test_payload_overrunning_buffer_refused():
    asm = assembler_for()  # 24 bytes
    with pytest.raises(FrameError):
        asm.add({"v": 1, "rid": "r", "tid": "t", "offset": 0}, memoryview(bytes(25)))


def test_gap_or_overlap_in_offsets_refused():
    asm = assembler_for()
    asm.add({"v": 1, "rid": "r", "tid": "t", "offset": 0}, memoryview(bytes(8)))
    with pytest.raises(FrameError):
        asm.add({"v": 1, "rid": "r", "tid": "t", "offset": 12}, memoryview(bytes(4)))
    with pytest.raises(FrameError):
        asm.add({"v": 1, "rid": "r", "tid": "t", "offset": 4}, memoryview(bytes(4)))
    assert not asm.complete


def test_frame_for_undeclared_tensor_refused():
    asm = assembler_for()
    with pytest.raises(FrameError):
        asm.add({"v": 1, "rid": "r", "tid": "other", "offset": 0}, memoryview(bytes(4)))


@pytest.mark.parametrize("dtype", ["complex64", "object", "float128", "torch.float32", "",
                                   "__class__"])
def test_unknown_dtype_refused(dtype):
    with pytest.raises(FrameError):
        TensorAssembler([TensorHeader(tid="t", dtype=dtype, shape=[2])], 1 << 20)


def test_sending_a_tensor_of_unlisted_dtype_refused():
    with pytest.raises(FrameError):
        header_for("t", torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("message", [
    b"",
    b"\x01\x00",
    struct.pack("<I", 100) + b"{}",                              # header longer than message
    struct.pack("<I", MAX_HEADER_BYTES + 1) + b"x" * (MAX_HEADER_BYTES + 10),  # too long
    struct.pack("<I", 0xFFFFFFFF) + b"{}",
    struct.pack("<I", 5) + b"notjs",
    struct.pack("<I", 2) + b"\xff\xfe",
    frame([1, 2, 3]),
    frame({"rid": "r", "tid": "t", "offset": 0}),                # no version
    frame({"v": 2, "rid": "r", "tid": "t", "offset": 0}),        # wrong version
    frame({"v": 1, "rid": 5, "tid": "t", "offset": 0}),
    frame({"v": 1, "rid": "r", "tid": "t", "offset": "0"}),
    frame({"v": 1, "rid": "r", "tid": "t", "offset": True}),
    frame({"v": 1, "rid": "r", "offset": 0}),
])
def test_bad_frame_header_refused(message):
    with pytest.raises(FrameError):
        decode_frame(message)


def test_declared_sizes_bounded_before_allocating():
    huge = TensorHeader(tid="t", dtype="float64", shape=[10**6, 10**6])
    with pytest.raises(FrameError):
        TensorAssembler([huge], max_total_bytes=1 << 30)
    with pytest.raises(FrameError):
        TensorAssembler([TensorHeader(tid="a", dtype="int8", shape=[600]),
                         TensorHeader(tid="b", dtype="int8", shape=[600])], max_total_bytes=1000)
    with pytest.raises(FrameError):
        TensorAssembler([TensorHeader(tid="a", dtype="int8", shape=[1]),
                         TensorHeader(tid="a", dtype="int8", shape=[1])], max_total_bytes=1000)


@pytest.mark.parametrize("shape", [[-1], [2, -3], [1] * 9, [1.5], [True]])
def test_bad_shapes_refused(shape):
    with pytest.raises(FrameError):
        numel(shape)


def test_bytes_to_tensor_checks_length():
    with pytest.raises(FrameError):
        bytes_to_tensor(TensorHeader(tid="t", dtype="float32", shape=[4]), bytearray(15))


# ---- argument vocabulary -----------------------------------------------------------------------

ARG_VALUES = [1, -7, 2.5, True, False, None, "bsd,d->bs", (1, 2, 3), [4, 5], slice(1, None, 2),
              slice(None, None, None), Ellipsis, torch.float16, torch.bfloat16, torch.bool,
              math.inf, -math.inf, Ref(3), Const("c0"), (Ref(1), [Const("c1"), slice(0, 2, None)])]


@pytest.mark.parametrize("value", ARG_VALUES, ids=repr)
def test_arg_round_trip(value):
    encoded = encode_arg(value)
    assert json.loads(json.dumps(encoded)) == encoded  # plain JSON
    assert decode_arg(json.loads(json.dumps(encoded)), "test") == value


def test_nan_arg_round_trip():
    assert math.isnan(decode_arg(json.loads(json.dumps(encode_arg(math.nan))), "test"))


@pytest.mark.parametrize("bad", [
    {"ref": True}, {"ref": "1"}, {"const": 3}, {"a": 1, "b": 2}, {"slice": [1.5, None, None]},
    {"slice": [1, 2]}, {"dtype": "object"}, {"dtype": "complex64"}, {"float": "1e999"},
    {"ellipsis": False}, {"__class__": "os"}, "x" * 10_000,
    [[[[[[[[[[[1]]]]]]]]]]],
])
def test_decode_rejects_out_of_vocabulary(bad):
    with pytest.raises(GraphValidationError):
        decode_arg(bad, "test")


def test_encode_refuses_arbitrary_objects():
    with pytest.raises(TypeError):
        encode_arg(object())
    with pytest.raises(TypeError):
        encode_arg(print)


# ---- JSON schema export ------------------------------------------------------------------------

def test_graph_json_schema_is_valid_json_with_expected_keys():
    schema = graph_json_schema()
    again = json.loads(json.dumps(schema))
    assert again == schema
    assert schema.get("type") == "object"
    props = schema["properties"]
    for key in ("version", "model", "inputs", "constants", "sites", "nodes", "saves", "forward"):
        assert key in props, key
    defs = schema["$defs"]
    for key in ("Arg", "TensorHeader", "Node", "Site", "ForwardSpec"):
        assert key in defs, key
    assert set(defs["Node"]["properties"]) >= {"id", "op", "args", "kwargs"}
    assert set(schema["required"]) >= {"model", "inputs"}
    # Every local $ref resolves.
    text = json.dumps(schema)
    for ref in set(part.split('"')[0] for part in text.split('"$ref": "#/$defs/')[1:]):
        assert ref in defs, ref


def test_protocol_json_schema_is_valid_json_with_expected_keys():
    schema = protocol_json_schema()
    again = json.loads(json.dumps(schema))
    assert again == schema
    assert set(schema) >= {"protocol", "client", "server"}
    assert isinstance(schema["protocol"], int)
    client_text = json.dumps(schema["client"])
    server_text = json.dumps(schema["server"])
    for t in ("hello", "model_info", "submit", "cancel"):
        assert f'"{t}"' in client_text, t
    for t in ("hello_ok", "accepted", "progress", "result", "error", "done"):
        assert f'"{t}"' in server_text, t


def test_client_messages_parse_with_the_models():
    msg = parse_client_message(json.dumps({"type": "hello", "protocol": 1,
                                           "client_version": "0.1.0"}))
    assert msg.type == "hello"
    from hookwire.errors import ProtocolError
    with pytest.raises(ProtocolError):
        parse_client_message(json.dumps({"type": "hello", "protocol": 1, "client_version": "x",
                                         "pickle": "..."}))


# ---- the tracer on its own ---------------------------------------------------------------------

def test_each_fresh_local_tensor_gets_its_own_constant():
    """Constants must not be identified by id() of tensors that may have been freed."""
    tracer = Tracer()
    with tracing(tracer):
        x = tracer.read_site("s", 0, (2, 3), torch.float32)
        for i in range(10):
            x = x + torch.full((3,), float(i))
        tracer.save("x", x)
    add_nodes = [n for n in tracer.nodes if n["op"] == "add"]
    consts = [n["args"][1]["const"] for n in add_nodes]
    values = [float(tracer.constants[c][0]) for c in consts]
    assert values == [float(i) for i in range(10)]


def test_same_local_tensor_used_twice_is_sent_once():
    tracer = Tracer()
    w = torch.ones(3)
    with tracing(tracer):
        x = tracer.read_site("s", 0, (2, 3), torch.float32)
        y = x * w + w
        tracer.save("y", y)
    assert len(tracer.constants) == 1
    assert torch.equal(next(iter(tracer.constants.values())), w)


def test_trace_error_outside_a_hook_names_this_file():
    tracer = Tracer()
    with tracing(tracer):
        x = tracer.read_site("s", 0, (2, 3), torch.float32)
        with pytest.raises(TraceError) as info:
            x.sum().item()
    assert "test_graph_units.py" in str(info.value)


def test_in_place_edit_through_a_view_rewrites_the_base():
    tracer = Tracer()
    with tracing(tracer):
        x = tracer.read_site("s", 0, (2, 4, 6), torch.float32)
        v = x.view(2, 4, 2, 3)
        v[:, :, 1] = 0
        tracer.write_site(0, x, "inplace")
    assert any(n["op"] == "site.write" for n in tracer.nodes)
    # Run the traced program on a real tensor and compare with eager torch.
    real = torch.randn(2, 4, 6)
    want = real.clone()
    want.view(2, 4, 2, 3)[:, :, 1] = 0
    got = _run_trace_locally(tracer, {0: real.clone()})
    assert_close(got, want)


def _run_trace_locally(tracer: Tracer, site_values: dict) -> torch.Tensor:
    """Evaluate a traced node list eagerly (reference interpreter for the tests)."""
    from hookwire.ops import OPS
    from hookwire.validate import resolve
    values = {}
    written = None
    for node in tracer.nodes:
        args = tuple(decode_arg(a, "t") for a in node["args"])
        kwargs = {k: decode_arg(v, "t") for k, v in node.get("kwargs", {}).items()}
        if node["op"] == "site.read":
            values[node["id"]] = site_values[args[0]]
        elif node["op"] == "site.write":
            written = resolve(args[1], values, tracer.constants)
        else:
            values[node["id"]] = OPS[node["op"]].fn(*resolve(args, values, tracer.constants),
                                                      **{k: resolve(v, values, tracer.constants)
                                                         for k, v in kwargs.items()})
    return written


# ---- the in-process executor against a local bridge --------------------------------------------

@pytest.fixture(scope="module")
def bridges():
    from hookwire.server.models import load_model
    return {name: load_model(name).bridge for name in ("tiny-gpt2", "tiny-llama")}


@pytest.fixture(scope="module")
def site_tables(bridges):
    from hookwire.server.manifest import probe_sites, site_lookup
    return {name: site_lookup(bridge, probe_sites(bridge)[0]) for name, bridge in bridges.items()}


@pytest.fixture(scope="module")
def unit_tokens(bridges):
    return bridges["tiny-gpt2"].to_tokens(["hello world", "abcdefghij!"])


def execute(bridge, tables, graph_dict, tokens, constants=None, limits=None):
    """Drive the interleaver the way server/app.py execute() does, in process."""
    limits = limits or Limits()
    constants = constants or {}
    site_table, site_order = tables
    g = Graph.model_validate(graph_dict)
    vg = validate_structure(g, site_table, site_order, limits)
    infer_shapes(vg, tokens.shape[0], tokens.shape[1], constants, limits)
    saved = {}

    def on_save(name, value, snapshot=True):
        saved[name] = value.detach().clone()

    il = Interleaver(vg, constants, on_save)
    spec = g.forward
    with torch.no_grad():
        out = il.run({n: hp for n, hp in bridge.hook_dict.items()},
                     lambda: bridge(tokens, return_type=spec.return_type or "logits"),
                     spec.return_type is not None)
    return out, saved, il


def _graph(model, nodes, sites, saves=None, return_type="logits"):
    return graph(model, nodes, sites, saves, return_type=return_type)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
@pytest.mark.parametrize("mode", ["replace", "inplace"])
@pytest.mark.parametrize("head", [0, 3])
def test_in_process_head_ablation_matches_local_tl(bridges, site_tables, unit_tokens, name,
                                                   mode, head):
    bridge = bridges[name]
    d_head = bridge.cfg.d_head
    site = "blocks.0.attn.hook_z"
    assert (site, 0) in site_tables[name][0]
    nodes = [{"id": 0, "op": "site.read", "args": [0]},
             {"id": 1, "op": "setitem",
              "args": [{"ref": 0}, [FULL, FULL, {"slice": [head * d_head, (head + 1) * d_head,
                                                           None]}], 0.0]},
             {"id": 2, "op": "site.write", "args": [0, {"ref": 1}], "kwargs": {"mode": mode}}]
    out, saved, _ = execute(bridge, site_tables[name], _graph(name, nodes, [site]), unit_tokens)

    def ablate(z, hook):
        z[:, :, head, :] = 0

    expected = bridge.run_with_hooks(unit_tokens, fwd_hooks=[(site, ablate)])
    assert_close(out, expected)
    assert not torch.allclose(expected, bridge(unit_tokens))
    assert not bridge.hook_dict[site]._forward_hooks, "executor left a hook behind"


def test_in_process_saves_and_early_stop(bridges, site_tables, unit_tokens):
    bridge = bridges["tiny-gpt2"]
    fired = []
    late = bridge.hook_dict["ln_final.hook_normalized"].register_forward_hook(
        lambda m, i, o: fired.append(1))
    try:
        nodes = [{"id": 0, "op": "site.read", "args": [0]},
                 {"id": 1, "op": "mean", "args": [{"ref": 0}], "kwargs": {"dim": -1}}]
        out, saved, il = execute(bridge, site_tables["tiny-gpt2"],
                                 _graph("tiny-gpt2", nodes, ["blocks.0.hook_resid_post"],
                                        saves={"resid": 0, "mean": 1}, return_type=None),
                                 unit_tokens)
    finally:
        late.remove()
    assert out is None
    assert fired == [], "the forward should stop after the last needed site"
    _, cache = bridge.run_with_cache(unit_tokens)
    assert_close(saved["resid"], cache["blocks.0.hook_out"])
    assert_close(saved["mean"], cache["blocks.0.hook_out"].mean(-1))
    assert il.values == {} or all(k not in il.values for k in (0,)), "values not freed"


def test_in_process_traced_hook_matches_local_tl(bridges, site_tables, unit_tokens):
    """Tracer + executor, no network: a traced hook gives the local TL result."""
    bridge = bridges["tiny-llama"]
    site_table, _ = site_tables["tiny-llama"]
    site = "blocks.1.hook_resid_pre"
    info = site_table[(site, 0)]
    direction = torch.linspace(-1, 1, bridge.cfg.d_model)

    def hook(act, hook):
        act[:, 1:] = act[:, 1:] * 0.5
        return act + torch.einsum("bs,d->bsd", act.mean(-1), direction)

    tracer = Tracer()
    with tracing(tracer):
        x = tracer.read_site(site, 0, info.concrete_shape(*unit_tokens.shape), info.dtype)
        out = hook(x, None)
        tracer.write_site(0, out, "replace")
    g = {"model": "tiny-llama", "inputs": {"input_ids": "input_ids"},
         "constants": list(tracer.constants), "sites": tracer.sites, "nodes": tracer.nodes,
         "saves": tracer.saves, "forward": {"return_type": "logits"}}
    got, _, _ = execute(bridge, site_tables["tiny-llama"], g, unit_tokens,
                        constants=dict(tracer.constants))
    expected = bridge.run_with_hooks(unit_tokens, fwd_hooks=[(site, hook)])
    assert_close(got, expected)


@pytest.mark.parametrize("limits,rule", [
    (Limits(max_saved_bytes=100), "max_saved_bytes"),
    (Limits(max_value_bytes=1000), "max_value_bytes"),
    (Limits(max_total_value_bytes=5000), "max_total_value_bytes"),
    (Limits(max_batch=1), "input_size"),
    (Limits(max_seq=4), "input_size"),
    (Limits(max_nodes=1), "max_nodes"),
])
def test_limits_refuse_before_running(bridges, site_tables, unit_tokens, limits, rule):
    bridge = bridges["tiny-gpt2"]
    nodes = [{"id": 0, "op": "site.read", "args": [0]},
             {"id": 1, "op": "mul", "args": [{"ref": 0}, 2.0]},
             {"id": 2, "op": "add", "args": [{"ref": 1}, 1.0]}]
    fired = []
    h = bridge.hook_dict["hook_embed"].register_forward_hook(lambda m, i, o: fired.append(1))
    try:
        with pytest.raises(LimitExceeded) as info:
            execute(bridge, site_tables["tiny-gpt2"],
                    _graph("tiny-gpt2", nodes, ["blocks.0.hook_resid_pre"], saves={"x": 2}),
                    unit_tokens, limits=limits)
    finally:
        h.remove()
    assert info.value.details.get("rule") == rule
    assert fired == [], "the model ran although the graph was refused"


def test_execution_error_leaves_no_hooks(bridges, site_tables, unit_tokens):
    from hookwire.errors import ExecutionError
    bridge = bridges["tiny-gpt2"]
    site = "blocks.0.hook_resid_pre"
    nodes = [{"id": 0, "op": "site.read", "args": [0]},
             {"id": 1, "op": "index_select", "args": [{"ref": 0}, 1, {"const": "c0"}]}]
    g = _graph("tiny-gpt2", nodes, [site], saves={"x": 1})
    g["constants"] = ["c0"]
    with pytest.raises(ExecutionError):
        execute(bridge, site_tables["tiny-gpt2"], g, unit_tokens,
                constants={"c0": torch.tensor([100])})
    assert not bridge.hook_dict[site]._forward_hooks


# ---- gradients and output reads: refused before anything runs ----------------------------

def _grad_graph(nodes, sites, backward=None, return_type="logits", saves=None):
    g = _graph("tiny-gpt2", nodes, sites, saves=saves, return_type=return_type)
    if backward is not None:
        g["backward"] = backward
    return g


LOGITS_SUM = [{"id": 0, "op": "output.read", "args": ["logits"]},
              {"id": 1, "op": "sum", "args": [{"ref": 0}]}]


@pytest.mark.parametrize("graph,rule", [
    # a gradient read with nothing to differentiate
    (_grad_graph([{"id": 0, "op": "site.grad", "args": [0]}], ["blocks.0.hook_resid_pre"]),
     "grad_without_backward"),
    # the same site's gradient read twice
    (_grad_graph(LOGITS_SUM + [{"id": 2, "op": "site.grad", "args": [0]},
                               {"id": 3, "op": "site.grad", "args": [0]}],
                 ["blocks.0.hook_resid_pre"], backward=1), "site_grad_once"),
    # the loss, when the forward computes logits only
    (_grad_graph([{"id": 0, "op": "output.read", "args": ["loss"]}], []), "output_kind"),
    (_grad_graph([{"id": 0, "op": "output.read", "args": ["weights"]}], []), "args"),
    (_grad_graph([{"id": 0, "op": "output.read", "args": [{"list": ["logits"]}]}], []), "args"),
    # backward of a node that does not exist, or that itself needs gradients
    (_grad_graph(LOGITS_SUM, [], backward=7), "backward_ref"),
    (_grad_graph(LOGITS_SUM + [{"id": 2, "op": "site.grad", "args": [0]},
                               {"id": 3, "op": "sum", "args": [{"ref": 2}]}],
                 ["blocks.0.hook_resid_pre"], backward=3), "backward_stage"),
    # a site write that depends on the output or on a gradient (they exist only later)
    (_grad_graph(LOGITS_SUM + [{"id": 2, "op": "site.read", "args": [0]},
                               {"id": 3, "op": "add", "args": [{"ref": 2}, {"ref": 1}]},
                               {"id": 4, "op": "site.write", "args": [0, {"ref": 3}]}],
                 ["blocks.0.hook_resid_pre"]), "write_stage"),
])
def test_gradient_graph_structure_refused(site_tables, graph, rule):
    from hookwire.errors import GraphValidationError
    site_table, site_order = site_tables["tiny-gpt2"]
    with pytest.raises(GraphValidationError) as info:
        validate_structure(Graph.model_validate(graph), site_table, site_order, Limits())
    assert info.value.details.get("rule") == rule


@pytest.mark.parametrize("graph,rule", [
    # backward of a non-scalar
    (_grad_graph([{"id": 0, "op": "output.read", "args": ["logits"]},
                  {"id": 1, "op": "site.grad", "args": [0]}],
                 ["blocks.0.hook_resid_pre"], backward=0), "backward_scalar"),
    # the gradient of token ids (an integer site) does not exist
    (_grad_graph(LOGITS_SUM + [{"id": 2, "op": "site.grad", "args": [0]}],
                 ["embed.hook_in"], backward=1), "no_grad_site"),
])
def test_gradient_graph_shapes_refused(site_tables, unit_tokens, graph, rule):
    from hookwire.errors import GraphValidationError
    site_table, site_order = site_tables["tiny-gpt2"]
    g = Graph.model_validate(graph)
    vg = validate_structure(g, site_table, site_order, Limits())
    outputs = {"logits": ((2, unit_tokens.shape[1], 257), torch.float32),
               "loss": ((), torch.float32)}
    with pytest.raises(GraphValidationError) as info:
        infer_shapes(vg, unit_tokens.shape[0], unit_tokens.shape[1], {}, Limits(), outputs)
    assert info.value.details.get("rule") == rule


def test_sites_report_which_get_gradients(site_tables):
    site_table, _ = site_tables["tiny-gpt2"]
    assert site_table[("blocks.0.hook_resid_pre", 0)].grad
    assert site_table[("hook_embed", 0)].grad
    assert not site_table[("embed.hook_in", 0)].grad  # token ids
