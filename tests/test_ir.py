"""The graph IR as tables (hookwire.ir): the special ops, the argument kinds and the stages
are data every pass reads, so these tests check the tables against each other and against the
passes -- a special op without a method in some pass, a kind code no check knows, a signature
the docs cannot write back -- and pin each special op's refusals (rule and message) on a
site table declared here, with no model."""
from __future__ import annotations

import pytest
import torch

from hookwire.errors import GraphValidationError
from hookwire.executor import Interleaver
from hookwire.ir import (BEFORE_FORWARD, CALL_OP, KINDS, NODE_KINDS, SPECIAL_OPS, Graph, Node,
                         SiteInfo, Stages, check_args, decode_arg, kind_matches, node_kind,
                         parse_signature)
from hookwire.ir.kinds import kind_codes, signature_text
from hookwire.ops import OPS
from hookwire.trace import Tracer
from hookwire.validate import (Limits, ShapeInference, StructureCheck, infer_shapes,
                               validate_structure)

PASSES = (StructureCheck, ShapeInference, Interleaver)


@pytest.mark.parametrize("pass_", PASSES, ids=lambda p: p.__name__)
def test_every_pass_handles_every_node_kind(pass_):
    missing = [k for k in NODE_KINDS if not callable(getattr(pass_, k, None))]
    assert not missing, f"{pass_.__name__} has no method for node kinds {missing}"


def test_special_ops_are_not_registry_ops_and_have_their_own_kind():
    assert not set(SPECIAL_OPS) & set(OPS)
    kinds = [s.kind for s in SPECIAL_OPS.values()]
    assert len(set(kinds)) == len(kinds) and CALL_OP not in kinds
    assert node_kind("add") == CALL_OP and node_kind("no.such.op") == CALL_OP
    for name, special in SPECIAL_OPS.items():
        assert node_kind(name) == special.kind


def test_every_kind_code_is_used_and_every_used_code_is_in_the_table():
    used = set()
    for spec in [*OPS.values(), *SPECIAL_OPS.values()]:
        used |= kind_codes(spec)
    assert used == set(KINDS), (sorted(used - set(KINDS)), sorted(set(KINDS) - used))
    with pytest.raises(AssertionError):
        kind_matches("no_such_kind", 1)


@pytest.mark.parametrize("spec", [*OPS.values(), *SPECIAL_OPS.values()],
                         ids=lambda s: s.name)
def test_signatures_write_back_in_the_language(spec):
    text = signature_text(spec)
    positional, _, _ = text.partition("; ")
    assert parse_signature(positional) == (spec.required, spec.optional, spec.varargs)


@pytest.mark.parametrize("kind,good,bad", [
    ("t", [decode_arg({"ref": 0}, "t"), decode_arg({"const": "c"}, "t")], [1, "x", None]),
    ("n", [1, 2.5, True], [decode_arg({"ref": 0}, "t"), "1"]),
    ("i", [0, -3], [True, 1.0]),
    ("ii", [2, (1, 2), [3]], [(1, 2.0), tuple(range(17))]),
    ("s", ["mean", "fro"], ["a b", "x" * 41, 1]),
    ("eq", ["ij,jk->ik", "...i"], ["ij;jk", ""]),
    ("nps", [2, "fro", "nuc"], ["max", None]),
    ("i?", [None, 1], [1.5]),
])
def test_kinds_accept_what_their_table_row_says(kind, good, bad):
    assert all(kind_matches(kind, v) for v in good)
    assert not any(kind_matches(kind, v) for v in bad)


def test_check_args_reads_registry_and_special_signatures_alike():
    assert check_args(OPS["add"], (decode_arg({"ref": 0}, "t"), 1.0), {}) is None
    assert "keyword" in check_args(OPS["add"], (decode_arg({"ref": 0}, "t"), 1), {"x": 1})
    assert check_args(SPECIAL_OPS["site.write"], (0, decode_arg({"ref": 1}, "t")),
                      {"mode": "inplace"}) is None
    assert check_args(SPECIAL_OPS["site.read"], (0, 1), {}) is not None


def test_stages_are_named_for_a_graph():
    stages = Stages(3)
    assert (stages.before_forward, stages.output, stages.gradient) == (BEFORE_FORWARD, 3, 4)
    assert [stages.describe(s) for s in (-1, 0, 2, 3, 4)] == [
        "before the forward", "site 0", "site 2", "output", "gradient"]
    assert stages.of("site", 1) == 1 and stages.of("output") == 3 and stages.of("gradient") == 4


def test_tracer_nodes_are_the_wire_json():
    tracer = Tracer()
    tracer.emit("site.write", (0, decode_arg({"ref": 3}, "t")), {"mode": "narrow"})
    tracer.emit("site.read", (1,))
    nodes = [Node.model_validate(n) for n in tracer.nodes]
    assert [n.model_dump(exclude_defaults=True) for n in nodes] == tracer.nodes


# ---- the special ops' own rules, on a declared site table --------------------------------

SITES = {("a", 0): SiteInfo("a", 0, ("B", "S", 4), torch.float32, grad=True),
         ("b", 0): SiteInfo("b", 0, ("B", "S", 4), torch.float32, grad=True)}
ORDER = {("a", 0): 0, ("b", 0): 1}


def _graph(nodes, backward=None, constants=(), return_type="logits", saves=None):
    return Graph.model_validate({
        "model": "m", "inputs": {"input_ids": "ids"}, "constants": list(constants),
        "sites": [{"name": "a"}, {"name": "b"}], "nodes": nodes, "saves": saves or {},
        "forward": {"return_type": return_type}, "backward": backward})


def _node(i, op, *args, **kwargs):
    return {"id": i, "op": op, "args": list(args), "kwargs": kwargs}


READ_A, READ_B = _node(0, "site.read", 0), _node(1, "site.read", 1)
LOSS = [_node(10, "output.read", "logits"), _node(11, "sum", {"ref": 10})]


@pytest.mark.parametrize("nodes,extra,rule,message", [
    ([_node(0, "site.read", 2)], {}, "site_index", "first argument must be a site index"),
    ([_node(0, "site.read", True)], {}, "site_index", "first argument must be a site index"),
    ([_node(0, "site.write")], {}, "site_index", "first argument must be a site index"),
    ([_node(0, "site.read", 0, 1)], {}, "args", "site.read takes exactly a site index"),
    ([_node(0, "site.grad", 0, k=1)], {"backward": 0}, "args",
     "site.grad takes exactly a site index"),
    ([READ_A, _node(1, "site.write", 0, {"ref": 0}, mode="twice")], {}, "args",
     "site.write takes (site, tensor) and mode in ('replace', 'inplace', 'narrow')"),
    ([_node(1, "site.write", 0, 1.0)], {}, "args", "site.write takes (site, tensor)"),
    ([_node(0, "output.read", "weights")], {}, "args", "output.read takes one of"),
    ([_node(0, "const.grad", {"ref": 0})], {}, "args", "const.grad takes exactly one constant"),
    ([READ_A, _node(1, "site.read", 0)], {}, "site_read_once", "site read twice"),
    ([READ_A, _node(1, "site.write", 0, {"ref": 0}),
      _node(2, "site.write", 0, {"ref": 0}, mode="narrow")], {}, "site_write_once",
     "site written twice (narrow)"),
    ([*LOSS, _node(0, "const.grad", {"const": "w"}), _node(1, "const.grad", {"const": "w"})],
     {"backward": 11, "constants": ["w"]}, "const_grad_once",
     "gradient of a constant read twice"),
    ([*LOSS, _node(0, "const.grad", {"const": "@unembed.W_U"})],
     {"backward": 11, "constants": ["@unembed.W_U"]}, "const_grad_parameter",
     "the model's weights are never differentiated"),
    ([_node(0, "const.grad", {"const": "w"})], {"constants": ["w"]},
     "grad_without_backward", "reads a gradient"),
    ([_node(0, "output.read", "logits")], {"return_type": "loss"}, "output_kind",
     "reads the forward's logits, but the forward's return_type is 'loss'"),
    ([READ_B, _node(2, "site.write", 0, {"ref": 1})], {}, "write_stage",
     "writes site 0 with a value that depends on site 1, which fires later"),
    ([_node(0, "nonesuch", 1)], {}, "unknown_op", "is not in the registry"),
    ([_node(0, "add", 1, 2)], {}, "op_schema", "argument 0 does not fit kind 't'"),
])
def test_special_op_rules_refuse_with_their_rule_and_message(nodes, extra, rule, message):
    with pytest.raises(GraphValidationError) as info:
        validate_structure(_graph(nodes, **extra), SITES, ORDER, Limits())
    assert info.value.details.get("rule") == rule
    assert message in str(info.value)


def test_stages_of_a_graph_with_every_kind():
    nodes = [_node(5, "ones_like", {"const": "w"}), READ_A,
             _node(2, "add", {"ref": 0}, {"ref": 5}), _node(3, "site.write", 1, {"ref": 2}),
             *LOSS, _node(12, "site.grad", 0), _node(13, "const.grad", {"const": "w"}),
             _node(14, "mul", {"ref": 12}, 2.0)]
    vg = validate_structure(_graph(nodes, backward=11, constants=["w"]), SITES, ORDER,
                            Limits())
    stage = {dn.id: dn.stage for dn in vg.nodes}
    assert stage == {5: -1, 0: 0, 2: 0, 3: 1, 10: 2, 11: 2, 12: 3, 13: 3, 14: 3}
    assert {dn.id: dn.kind for dn in vg.nodes}[3] == "site_write"
    vg = infer_shapes(vg, 2, 5, {"w": torch.zeros(2, 5, 4)}, Limits(),
                      outputs={"logits": ((2, 5, 7), torch.float32)})
    assert vg.shapes[14].shape == (2, 5, 4) and vg.shapes[13].shape == (2, 5, 4)
    assert vg.shapes[3] is None and vg.shapes[11].shape == ()


@pytest.mark.parametrize("value", [{"dtype": ["float32"]}, {"float": {"x": 1}},
                                   {"slice": [1, True, None]}, {"ref": True}, {"list": 3},
                                   {"ellipsis": 1}, {"const": 5}, {"nope": 1}])
def test_malformed_one_key_objects_are_refused_as_out_of_vocabulary(value):
    # Unhashable values under "dtype"/"float" once escaped decode_arg as a TypeError.
    with pytest.raises(GraphValidationError) as info:
        decode_arg(value, "node 0 (add)")
    assert info.value.details.get("rule") == "arg_form"
