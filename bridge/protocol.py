"""Wire protocol: control messages are JSON text messages validated by pydantic; tensors are
binary chunk frames (see :mod:`hookwire.frames`). Versioned; the JSON schema is published by
:func:`protocol_json_schema`.

Client -> server: hello, model_info, submit, cancel.
Server -> client: hello_ok, model_info, accepted, progress, result (+ frames), error, done.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hookwire.errors import ProtocolError
from hookwire.frames import MAX_DIMS, TensorHeader
from hookwire.generation import GenerateSpec
from hookwire.graph import TL_HOOK_FLAGS, Graph

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 64 << 20


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hello(_Msg):
    type: Literal["hello"] = "hello"
    protocol: int
    client_version: str = Field(max_length=64)


class ModelInfoRequest(_Msg):
    type: Literal["model_info"] = "model_info"
    model: str = Field(max_length=256)
    # The model as it runs with these TL hook switches on (they change which TL hook points
    # fire, and their order); the server probes each combination once, on first request.
    tl_flags: list[Literal[TL_HOOK_FLAGS]] = Field(default_factory=list, max_length=4)


RESIDENT_ID_PATTERN = r"^[vh][0-9a-f]{24,32}$"


class ResidentRef(_Msg):
    """An attached tensor that is not sent because the server holds it: a strided view
    (``shape``, ``stride``, ``offset`` in elements) of the resident value ``resident`` --
    a result id (``v…``) the server gave, or a content id (``h…``) of an earlier upload."""
    tid: str = Field(max_length=64)
    resident: str = Field(pattern=RESIDENT_ID_PATTERN)
    dtype: str = Field(max_length=16)
    shape: list[int] = Field(max_length=MAX_DIMS)
    stride: list[int] = Field(max_length=MAX_DIMS)
    offset: int = Field(ge=0)


class Submit(_Msg):
    type: Literal["submit"] = "submit"
    request_id: str = Field(max_length=64)
    graph: Graph
    tensors: list[TensorHeader] = Field(default_factory=list, max_length=100_000)
    refs: list[ResidentRef] = Field(default_factory=list, max_length=100_000)
    # Uploaded tensors to keep for later requests: tid -> its content id (checked on arrival).
    keep: dict[Annotated[str, Field(max_length=64)],
               Annotated[str, Field(pattern=RESIDENT_ID_PATTERN)]] = Field(
        default_factory=dict, max_length=100_000)
    keep_results: bool = True  # keep the saved values resident, so later requests can refer
    # Set: generate tokens after the prompt (``graph`` is the prompt's forward); see
    # hookwire.generation.
    generate: GenerateSpec | None = None


class Cancel(_Msg):
    type: Literal["cancel"] = "cancel"
    request_id: str = Field(max_length=64)


class WeightsRequest(_Msg):
    """Ask for some of a model's parameters (by the names its ``named_parameters()`` gives):
    they come back as ``result`` messages with frames, then ``done``. Bounded by
    ``Limits.max_weight_bytes``."""
    type: Literal["weights"] = "weights"
    request_id: str = Field(max_length=64)
    model: str = Field(max_length=256)
    names: list[Annotated[str, Field(max_length=512)]] = Field(max_length=100_000)


class HelloOk(_Msg):
    type: Literal["hello_ok"] = "hello_ok"
    protocol: int
    server_version: str
    models: list[str]


class SiteDescription(_Msg):
    name: str
    call: int = 0
    shape: list[Union[int, Literal["B", "S"]]]
    dtype: str
    grad: bool = False  # has a gradient in a backward pass (depends on the weights)


class ModelInfo(_Msg):
    type: Literal["model_info"] = "model_info"
    model: str
    architecture: str
    config: dict
    sites: list[SiteDescription]
    hook_names: list[str] = Field(default_factory=list,
                                  description="every hook point, including ones that never fire")
    hook_aliases: dict[str, str] = Field(
        default_factory=dict,
        description="alias -> canonical hook name (e.g. blocks.0.hook_resid_pre -> "
                    "blocks.0.hook_in), so clients without TL 4 can map legacy names")
    tokenizer_files: dict[str, str]
    # What torch hooks see besides tensors, for HF module sites: "hf:<path>:output" -> the
    # type names of the tuple a module returns (only tuple outputs are listed), and
    # "hf:<path>:input" -> those of its positional arguments; e.g. ["Tensor", "NoneType"].
    # ``step_module_layouts``: the same in a generation step's forward (with a KV cache),
    # where they differ.
    module_layouts: dict[str, list[str]] = Field(default_factory=dict)
    step_module_layouts: dict[str, list[str]] = Field(default_factory=dict)
    # The TL 4 config values a local model must share with the server's to run its hooks
    # remotely (n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, architecture).
    tl_config: dict = Field(default_factory=dict)
    # The TL hook switches on when ``sites`` were recorded (see ModelInfoRequest.tl_flags).
    tl_flags: list[str] = Field(default_factory=list)


class Accepted(_Msg):
    type: Literal["accepted"] = "accepted"
    request_id: str
    queue_position: int


class Progress(_Msg):
    type: Literal["progress"] = "progress"
    request_id: str
    stage: Literal["queued", "started", "site", "backward"]
    queue_position: int | None = None
    site: int | None = None
    of: int | None = None


class Result(_Msg):
    """A saved value: its header; its bytes follow as binary frames."""
    type: Literal["result"] = "result"
    request_id: str
    name: str
    tensor: TensorHeader
    resident: str | None = None  # the id under which the server keeps it for this user
    # Set: no bytes follow; this value is the very tensor already sent as ``alias_of`` in
    # this request (the client makes it a view of that one, as they alias on the server).
    alias_of: str | None = Field(default=None, max_length=256)


class Error(_Msg):
    type: Literal["error"] = "error"
    request_id: str | None = None
    code: str
    message: str
    details: dict = Field(default_factory=dict)


class Done(_Msg):
    type: Literal["done"] = "done"
    request_id: str
    timings: dict[str, float] = Field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


ClientMessage = Annotated[Union[Hello, ModelInfoRequest, Submit, Cancel, WeightsRequest],
                          Field(discriminator="type")]
ServerMessage = Annotated[Union[HelloOk, ModelInfo, Accepted, Progress, Result, Error, Done],
                          Field(discriminator="type")]
_client_adapter = TypeAdapter(ClientMessage)
_server_adapter = TypeAdapter(ServerMessage)


def _parse(adapter, text: str | bytes):
    if len(text) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(text)} bytes; limit {MAX_CONTROL_BYTES}")
    try:
        return adapter.validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        raise ProtocolError(f"malformed message at {loc or 'top level'}: "
                            f"{first.get('msg', str(exc))[:300]}") from None


def parse_client_message(text: str | bytes):
    return _parse(_client_adapter, text)


def parse_server_message(text: str | bytes):
    return _parse(_server_adapter, text)


def dump(msg: _Msg) -> str:
    return msg.model_dump_json(exclude_none=False)


def protocol_json_schema() -> dict:
    return {"protocol": PROTOCOL_VERSION,
            "client": _client_adapter.json_schema(),
            "server": _server_adapter.json_schema()}


__all__ = ["PROTOCOL_VERSION", "Hello", "ModelInfoRequest", "Submit", "Cancel", "HelloOk",
           "WeightsRequest",
           "SiteDescription", "ModelInfo", "ResidentRef", "Accepted", "Progress", "Result", "Error", "Done",
           "parse_client_message", "parse_server_message", "dump", "protocol_json_schema"]
