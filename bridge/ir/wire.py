"""The wire form of the intervention graph: what a request *is*. Pure data, validated by
pydantic on arrival (``extra="forbid"`` everywhere).

A :class:`Graph` lists the :class:`Site` s it touches, its :class:`Node` s in topological
order (``op`` is a registry op, :data:`hookwire.ops.OPS`, or a special op,
:data:`hookwire.ir.special.SPECIAL_OPS`; arguments in the vocabulary of
:mod:`hookwire.ir.args`), the tensors it attaches, its saves, how the model's forward is
called (:class:`ForwardSpec`) and an optional value to differentiate. Clients build the JSON
of this form directly (:func:`node_json`; the tracer's node dicts are exactly that JSON); the
server turns it into the validated form (:mod:`hookwire.ir.validated`) before anything runs.
"""
from __future__ import annotations

from typing import Annotated, Any, Final, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from hookwire.frames import TensorHeader
from hookwire.ir.args import ARG_JSON_SCHEMA, MAX_STR_LEN

GRAPH_VERSION: Final = 1  # Final: its type is Literal[1], what Graph.version accepts
PARAMETER_PREFIX = "@"


def is_parameter(tid: str) -> bool:
    """A constant id naming a parameter (or buffer) of the served model, not an attachment."""
    return tid.startswith(PARAMETER_PREFIX)


def node_json(node_id: int, op: str, args: list, kwargs: dict | None = None) -> dict:
    """The JSON of one :class:`Node` (``args``/``kwargs`` already encoded with
    :func:`hookwire.ir.args.encode_arg`): what clients put in a graph's ``nodes``."""
    node = {"id": node_id, "op": op, "args": args}
    if kwargs:
        node["kwargs"] = kwargs
    return node


class Site(BaseModel):
    """Where the graph touches the model: a hook site's canonical name and which call."""
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=MAX_STR_LEN)
    call: int = Field(default=0, ge=0, le=1024)


class Node(BaseModel):
    """One operation: ``op`` is a registry name (:data:`hookwire.ops.OPS`) or a special op
    (:data:`hookwire.ir.special.SPECIAL_OPS`); ``args``/``kwargs`` are in the argument
    vocabulary (:mod:`hookwire.ir.args`). Nodes are listed
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
TLHookFlag = Literal["use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in"]
TL_HOOK_FLAGS: tuple[TLHookFlag, ...] = get_args(TLHookFlag)


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
    tl_flags: list[TLHookFlag] = Field(default_factory=list, max_length=4)
    # Start at block k: the input ``residual`` [batch, seq, d_model] enters block k (TL's
    # ``forward(start_at_layer=k)``); ``input_ids`` then only gives the batch and seq sizes.
    start_at_layer: int | None = Field(default=None, ge=-1024, le=1024)
    # The plain HF forward even when no HF module site is used (the HF front): an
    # attention_mask then means what HF's forward makes of it (TL's forward derives the
    # positions from it; HF's does not).
    hf_forward: bool = False


class Graph(BaseModel):
    """The wire form of a request's intervention graph (what ``Submit.graph`` holds).

    ``sites`` are the sites it touches, in the model's firing order; ``site.*`` nodes refer
    to them by index. ``inputs`` and ``constants`` name tensors attached to the submit (sent
    as frames, or referred to on the server), ``saves`` the values streamed back, ``forward``
    how the model's own forward is called, ``backward`` an optional scalar node to
    differentiate. The server turns it into a :class:`hookwire.ir.validated.ValidatedGraph`
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
