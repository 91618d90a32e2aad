"""The argument vocabulary: what a node's ``args`` and ``kwargs`` may hold, on the wire and
decoded.

On the wire an argument is JSON in a small closed vocabulary (:data:`ARG_JSON_SCHEMA`)::

    1, 2.5, true, null, "str"      scalars (strings only where an op's signature allows them)
    [a, b, ...]                    a tuple
    {"list": [a, b]}               a list (differs from a tuple for indexing)
    {"ref": 12}                    the value of node 12
    {"const": "c0"}                the attached tensor constant c0
    {"slice": [start, stop, step]}
    {"ellipsis": true}
    {"dtype": "float32"}           from the frame dtype allow-list
    {"float": "nan" | "inf" | "-inf"}

:func:`decode_arg` turns that into Python values with :class:`Ref` / :class:`Const`
placeholders (the server's half, nesting at most :data:`MAX_ARG_DEPTH` deep);
:func:`encode_arg` is the client's half. Which decoded values an op accepts at each position
is its signature, written in the kind codes of :mod:`hookwire.ir.kinds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from hookwire.errors import GraphValidationError
from hookwire.frames import DTYPE_NAMES, DTYPES

MAX_ARG_DEPTH = 8
MAX_STR_LEN = 256

ARG_JSON_SCHEMA: dict = {
    "description": "An op argument; see hookwire.graph for the vocabulary.",
    "anyOf": [
        {"type": ["integer", "number", "boolean", "null"]},
        {"type": "string", "maxLength": MAX_STR_LEN},
        {"type": "array", "description": "a tuple of arguments"},
        {"type": "object", "properties": {"list": {"type": "array"}}, "required": ["list"]},
        {"type": "object", "properties": {"ref": {"type": "integer"}}, "required": ["ref"]},
        {"type": "object", "properties": {"const": {"type": "string"}}, "required": ["const"]},
        {"type": "object", "properties": {"slice": {"type": "array", "maxItems": 3}},
         "required": ["slice"]},
        {"type": "object", "properties": {"ellipsis": {"const": True}}, "required": ["ellipsis"]},
        {"type": "object", "properties": {"dtype": {"enum": sorted(DTYPES)}},
         "required": ["dtype"]},
        {"type": "object", "properties": {"float": {"enum": ["nan", "inf", "-inf"]}},
         "required": ["float"]},
    ],
}


@dataclass(frozen=True)
class Ref:
    """A decoded ``{"ref": id}``: the value of an earlier node."""
    node: int


@dataclass(frozen=True)
class Const:
    """A decoded ``{"const": tid}``: an attached tensor (or an ``@`` parameter) by its id."""
    tid: str


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The one-key objects of the vocabulary: key -> (does the inner value fit?, decode it).
# Nested forms decode their items one level deeper.
_OBJECTS: dict[str, tuple[Callable[[Any], bool], Callable[[Any, str, int], Any]]] = {
    "ref": (_is_int, lambda inner, where, depth: Ref(inner)),
    "const": (lambda inner: isinstance(inner, str), lambda inner, where, depth: Const(inner)),
    "list": (lambda inner: isinstance(inner, list),
             lambda inner, where, depth: [decode_arg(v, where, depth + 1) for v in inner]),
    "slice": (lambda inner: isinstance(inner, list) and len(inner) == 3 and all(
        v is None or _is_int(v) for v in inner), lambda inner, where, depth: slice(*inner)),
    "ellipsis": (lambda inner: inner is True, lambda inner, where, depth: Ellipsis),
    "dtype": (lambda inner: isinstance(inner, str) and inner in DTYPES,
              lambda inner, where, depth: DTYPES[inner]),
    "float": (lambda inner: isinstance(inner, str) and inner in _FLOATS,
              lambda inner, where, depth: _FLOATS[inner]),
}


def decode_arg(value: Any, where: str, depth: int = 0):
    """JSON argument -> Python value with :class:`Ref`/:class:`Const` placeholders."""
    if depth > MAX_ARG_DEPTH:
        raise GraphValidationError(f"{where}: arguments nested deeper than {MAX_ARG_DEPTH}",
                                   rule="arg_depth")
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        if len(value) > MAX_STR_LEN:
            raise GraphValidationError(f"{where}: string argument longer than {MAX_STR_LEN}",
                                       rule="arg_string")
        return value
    if isinstance(value, list):
        return tuple(decode_arg(v, where, depth + 1) for v in value)
    if isinstance(value, dict) and len(value) == 1:
        (key, inner), = value.items()
        entry = _OBJECTS.get(key)
        if entry is not None and entry[0](inner):
            return entry[1](inner, where, depth)
    raise GraphValidationError(f"{where}: argument {str(value)[:80]!r} is not in the argument "
                               f"vocabulary", rule="arg_form")


def encode_arg(value: Any):
    """Python value (with Ref/Const) -> JSON argument. The client's half of decode_arg."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return {"float": "nan"}
        if math.isinf(value):
            return {"float": "inf" if value > 0 else "-inf"}
        return value
    if isinstance(value, Ref):
        return {"ref": value.node}
    if isinstance(value, Const):
        return {"const": value.tid}
    if isinstance(value, tuple):
        return [encode_arg(v) for v in value]
    if isinstance(value, list):
        return {"list": [encode_arg(v) for v in value]}
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if value in DTYPE_NAMES:
        return {"dtype": DTYPE_NAMES[value]}
    raise TypeError(f"cannot encode argument of type {type(value).__name__}")


def rename_constants(value: Any, names: dict[str, str]):
    """A JSON graph argument (or node list) with its constant ids mapped through ``names``:
    how several graphs of one request (a generation's forwards) share one set of tensors."""
    if isinstance(value, dict):
        if set(value) == {"const"}:
            return {"const": names.get(value["const"], value["const"])}
        return {k: rename_constants(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [rename_constants(v, names) for v in value]
    return value


# ---- decoded arguments: the graph's edges and their values ---------------------------------

def walk_refs(value, out: list) -> list:
    """Append to ``out`` the node id of every ``Ref`` in a decoded argument (nested tuples,
    lists and slice bounds included) and return ``out``: the edges of the graph, as the
    validator and the executor both read them."""
    if isinstance(value, Ref):
        out.append(value.node)
    elif isinstance(value, (tuple, list)):
        for v in value:
            walk_refs(v, out)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            walk_refs(v, out)
    return out


def walk_consts(value, out: list) -> list:
    """Append to ``out`` the id of every ``Const`` in a decoded argument and return ``out``."""
    if isinstance(value, Const):
        out.append(value.tid)
    elif isinstance(value, (tuple, list)):
        for v in value:
            walk_consts(v, out)
    return out


def resolve(value, values: dict, constants: dict):
    """A decoded argument with its placeholders replaced: ``Ref`` by ``values[node]``,
    ``Const`` by ``constants[tid]`` (meta tensors while validating, real ones when running)."""
    if isinstance(value, Ref):
        return values[value.node]
    if isinstance(value, Const):
        return constants[value.tid]
    if isinstance(value, tuple):
        return tuple(resolve(v, values, constants) for v in value)
    if isinstance(value, list):
        return [resolve(v, values, constants) for v in value]
    return value
