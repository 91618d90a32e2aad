"""The graph IR: every form an intervention graph takes, and the words it is written in.

A graph has two forms, each in one module:

* **wire** (:mod:`hookwire.ir.wire`): ``Graph`` / ``Node`` / ``Site`` / ``ForwardSpec``,
  pydantic models of what a request sends. Clients build its JSON directly (``node_json``;
  the tracer's node dicts are exactly that JSON) and the server parses it with pydantic.
* **validated** (:mod:`hookwire.ir.validated`): ``ValidatedGraph`` / ``DecodedNode`` /
  ``SiteInfo``, what ``hookwire.validate`` makes of the wire form and the executor runs.

and is written in:

* the **argument vocabulary** (:mod:`hookwire.ir.args`): the JSON an argument may be, its
  decoded Python values (``Ref`` / ``Const`` placeholders), and the walks over them;
* the **argument-kind language** (:mod:`hookwire.ir.kinds`): signatures such as
  ``"t,ii|b"``, the table of kind codes and ``check_args``;
* **stages** (:mod:`hookwire.ir.stages`): when a node can run -- before the forward, at a
  site, once the output exists, after the backward;
* **special ops** (:mod:`hookwire.ir.special`): ``site.read``, ``site.write``,
  ``site.grad``, ``output.read``, ``const.grad`` -- a table beside the op registry
  (:data:`hookwire.ops.OPS`), whose ``kind`` names the method each pass (structure check,
  shape inference, execution) handles a node with.

``hookwire.graph`` re-exports the wire form and the vocabulary under their older import path.
docs/design.md, "The graph", draws the whole picture.
"""
from hookwire.ir.args import (ARG_JSON_SCHEMA, MAX_ARG_DEPTH, MAX_STR_LEN, Const, Ref,
                              decode_arg, encode_arg, rename_constants, resolve, walk_consts,
                              walk_refs)
from hookwire.ir.kinds import KINDS, Kind, check_args, kind_matches, parse_signature
from hookwire.ir.special import (CALL_OP, CONST_GRAD, NODE_KINDS, OUTPUT_KINDS, OUTPUT_READ,
                                 SITE_GRAD, SITE_READ, SITE_WRITE, SPECIAL_OPS, WRITE_MODES,
                                 SpecialOp, node_kind)
from hookwire.ir.stages import BEFORE_FORWARD, Stages
from hookwire.ir.validated import (FLAT, DecodedNode, SiteInfo, ValidatedGraph, flat_dim,
                                   flat_factor)
from hookwire.ir.wire import (GRAPH_VERSION, PARAMETER_PREFIX, TL_HOOK_FLAGS, ForwardSpec,
                              Graph, Node, Site, TLHookFlag, graph_json_schema, hook_mode,
                              is_parameter, node_json)

__all__ = [
    "ARG_JSON_SCHEMA", "MAX_ARG_DEPTH", "MAX_STR_LEN", "Const", "Ref", "decode_arg",
    "encode_arg", "rename_constants", "resolve", "walk_consts", "walk_refs",
    "KINDS", "Kind", "check_args", "kind_matches", "parse_signature",
    "CALL_OP", "CONST_GRAD", "NODE_KINDS", "OUTPUT_KINDS", "OUTPUT_READ", "SITE_GRAD",
    "SITE_READ", "SITE_WRITE", "SPECIAL_OPS", "WRITE_MODES", "SpecialOp", "node_kind",
    "BEFORE_FORWARD", "Stages",
    "FLAT", "DecodedNode", "SiteInfo", "ValidatedGraph", "flat_dim", "flat_factor",
    "GRAPH_VERSION", "PARAMETER_PREFIX", "TL_HOOK_FLAGS", "TLHookFlag", "ForwardSpec", "Graph",
    "Node", "Site", "graph_json_schema", "hook_mode", "is_parameter", "node_json",
]
