"""The wire form of the graph and its argument vocabulary, under their first import path.

Both live in the IR package now: :mod:`hookwire.ir.wire` (``Graph``, ``Node``, ``Site``,
``ForwardSpec``) and :mod:`hookwire.ir.args` (the argument vocabulary, ``Ref``/``Const``,
``decode_arg``/``encode_arg``). This module re-exports them so that code written against
``hookwire.graph`` keeps working; new code imports ``hookwire.ir``.
"""
from hookwire.ir.args import (ARG_JSON_SCHEMA, MAX_ARG_DEPTH, MAX_STR_LEN, Const, Ref,
                              decode_arg, encode_arg, rename_constants)
from hookwire.ir.wire import (GRAPH_VERSION, PARAMETER_PREFIX, TL_HOOK_FLAGS, ForwardSpec,
                              Graph, Node, Site, graph_json_schema, hook_mode, is_parameter,
                              node_json)

__all__ = ["ARG_JSON_SCHEMA", "MAX_ARG_DEPTH", "MAX_STR_LEN", "Const", "Ref", "decode_arg",
           "encode_arg", "rename_constants", "GRAPH_VERSION", "PARAMETER_PREFIX",
           "TL_HOOK_FLAGS", "ForwardSpec", "Graph", "Node", "Site", "graph_json_schema",
           "hook_mode", "is_parameter", "node_json"]
