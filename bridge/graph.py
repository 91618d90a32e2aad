"""The intervention graph: what a request *is*. Pure data, validated by pydantic on arrival.

Arguments are JSON values in a small closed vocabulary (see :data:`ARG_JSON_SCHEMA`)::

    1, 2.5, true, null, "str"      scalars (strings only where an op's schema allows them)
    [a, b, ...]                    a tuple
    {"list": [a, b]}               a list (differs from a tuple for indexing)
    {"ref": 12}                    the value of node 12
    {"const": "c0"}                the attached tensor constant c0
    {"slice": [start, stop, step]}
    {"ellipsis": true}
    {"dtype": "float32"}           from the frame dtype allow-list
    {"float": "nan" | "inf" | "-inf"}

Special ops touch the model rather than compute: ``site.read`` (a site's activation),
``site.write`` (replace it, or overwrite it in place), ``output.read`` (the forward's logits or
loss, once the forward is over), ``site.grad`` (the gradient of ``Graph.backward`` at a
site, once the backward pass is over) and ``const.grad`` (its gradient with respect to one of
the request's constants: how a client trains its own parameters through the served model).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hookwire.errors import GraphValidationError
from hookwire.frames import DTYPES, DTYPE_NAMES, TensorHeader

GRAPH_VERSION = 1
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


class Site(BaseModel):
    """Where the graph touches the model: a hook site's canonical name and which call."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=MAX_STR_LEN)
    call: int = Field(default=0, ge=0, le=1024)


class Node(BaseModel):
    """One operation: ``op`` is a registry name (:data:`hookwire.ops.OPS`) or a special op
    (module docstring); ``args``/``kwargs`` are in the argument vocabulary. Nodes are listed
    in topological order: a ``{"ref": i}`` must name an earlier node."""
    model_config = ConfigDict(extra="forbid")
    id: int = Field(ge=0)
    op: str = Field(max_length=64)
    args: list[Any] = Field(default_factory=list, json_schema_extra={"items": ARG_JSON_SCHEMA})
    kwargs: dict[str, Any] = Field(default_factory=dict,
                                   json_schema_extra={"additionalProperties": ARG_JSON_SCHEMA})


# TransformerLens's switches for hook points that fire only when asked for
# (``model.set_use_attn_result(True)`` & co.). A request names the ones its client has on;
# the server runs that request with exactly those on.
TL_HOOK_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")


def hook_mode(flags) -> str:
    """The key of a set of TL hook switches: their names, sorted, joined by commas."""
    return ",".join(sorted(set(flags)))


class ForwardSpec(BaseModel):
    """How the model's own forward is called and what of its output comes back."""
    model_config = ConfigDict(extra="forbid")
    return_type: Literal["logits", "loss", "both", None] = "logits"
    loss_per_token: bool = False
    output_attentions: bool = False  # TL's run_with_cache asks HF for attention weights
    # False when the output is only read by the graph (a metric to differentiate): computed,
    # but not sent back.
    send_output: bool = True
    # TL hook switches on for this request (see TL_HOOK_FLAGS); they change which sites fire.
    tl_flags: list[Literal[TL_HOOK_FLAGS]] = Field(default_factory=list, max_length=4)
    # Start at block k: the input ``residual`` [batch, seq, d_model] enters block k (TL's
    # ``forward(start_at_layer=k)``); ``input_ids`` then only gives the batch and seq sizes.
    start_at_layer: int | None = Field(default=None, ge=-1024, le=1024)


class Graph(BaseModel):
    """The wire form of a request's intervention graph (what ``Submit.graph`` holds).

    ``sites`` are the sites it touches, in the model's firing order; ``site.*`` nodes refer
    to them by index. ``inputs`` and ``constants`` name tensors attached to the submit (sent
    as frames, or referred to on the server), ``saves`` the values streamed back, ``forward``
    how the model's own forward is called, ``backward`` an optional scalar node to
    differentiate. The server turns it into a :class:`hookwire.validate.ValidatedGraph`
    before anything runs (docs/design.md, "The graph")."""
    model_config = ConfigDict(extra="forbid")
    version: Literal[1] = GRAPH_VERSION
    model: str = Field(max_length=MAX_STR_LEN)
    # attention_mask and position_ids: left-padded rows (as nnsight and TL batch them) count
    # their positions from their first token; residual: what a start_at_layer forward starts
    # from.
    inputs: dict[Literal["input_ids", "attention_mask", "position_ids", "residual"], str] = Field(
        description="model input name -> id of an attached tensor")
    # Ids and names are bounded like every other string of the graph (echoed in results).
    # An id "@<name>" is no attachment: it names a parameter or buffer of the served model's HF
    # module tree (read only; servers may refuse them, Limits.allow_parameter_reads).
    constants: list[Annotated[str, Field(max_length=64)]] = Field(
        default_factory=list, description="ids of attached tensors, or '@' + the name of a "
                                          "parameter of the served model")
    sites: list[Site] = Field(default_factory=list)
    nodes: list[Node] = Field(default_factory=list)
    saves: dict[Annotated[str, Field(max_length=MAX_STR_LEN)], int] = Field(
        default_factory=dict, description="save name -> node id")
    forward: ForwardSpec = Field(default_factory=ForwardSpec)
    backward: int | None = Field(default=None, description=(
        "id of a scalar float node to differentiate after the forward; `site.grad` nodes "
        "then read the gradient of that scalar at their site"))


def graph_json_schema() -> dict:
    """The published JSON schema of a graph (and, through it, of its arguments)."""
    schema = Graph.model_json_schema()
    schema.setdefault("$defs", {})["Arg"] = ARG_JSON_SCHEMA
    schema["$defs"]["TensorHeader"] = TensorHeader.model_json_schema()
    return schema


# ---- decoded argument values -------------------------------------------------------------

@dataclass(frozen=True)
class Ref:
    node: int


@dataclass(frozen=True)
class Const:
    tid: str


_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def decode_arg(value: Any, where: str, depth: int = 0):
    """JSON argument -> Python value with :class:`Ref`/:class:`Const` placeholders."""
    if depth > MAX_ARG_DEPTH:
        raise GraphValidationError(f"{where}: arguments nested deeper than {MAX_ARG_DEPTH}",
                                   rule="arg_depth")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
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
        if key == "ref" and isinstance(inner, int) and not isinstance(inner, bool):
            return Ref(inner)
        if key == "const" and isinstance(inner, str):
            return Const(inner)
        if key == "list" and isinstance(inner, list):
            return [decode_arg(v, where, depth + 1) for v in inner]
        if key == "slice" and isinstance(inner, list) and len(inner) == 3 and all(
                v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in inner):
            return slice(*inner)
        if key == "ellipsis" and inner is True:
            return Ellipsis
        if key == "dtype" and inner in DTYPES:
            return DTYPES[inner]
        if key == "float" and inner in _FLOATS:
            return _FLOATS[inner]
    raise GraphValidationError(f"{where}: argument {str(value)[:80]!r} is not in the argument "
                               f"vocabulary", rule="arg_form")


PARAMETER_PREFIX = "@"


def is_parameter(tid: str) -> bool:
    """A constant id naming a parameter (or buffer) of the served model, not an attachment."""
    return tid.startswith(PARAMETER_PREFIX)


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
