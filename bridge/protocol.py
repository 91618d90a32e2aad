"""Wire protocol: control messages are JSON text messages validated by pydantic; tensors are
binary chunk frames (see :mod:`hookwire.frames`). Versioned; the JSON schema is published by
:func:`protocol_json_schema`.

Client -> server: hello, model_info, submit, cancel, weights.
Server -> client: hello_ok, model_info, accepted, progress, result (+ frames), error, done.
"""
from __future__ import annotations

import json
import re
from typing import Annotated, Callable, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from hookwire.errors import HookwireError, LimitExceeded, ProtocolError
from hookwire.frames import MAX_DIMS, TensorHeader
from hookwire.generation import GenerateSpec
from hookwire.ir import Graph, Node, TLHookFlag

PROTOCOL_VERSION = 1
MAX_CONTROL_BYTES = 64 << 20


class _Msg(BaseModel):
    """Base of every control message: unknown fields are refused."""
    model_config = ConfigDict(extra="forbid")


class Hello(_Msg):
    """Client -> server, first message: the protocol version it speaks."""
    type: Literal["hello"] = "hello"
    protocol: int
    client_version: str = Field(max_length=64)


class ModelInfoRequest(_Msg):
    """Client -> server: describe ``model`` (answered by :class:`ModelInfo`)."""
    type: Literal["model_info"] = "model_info"
    model: str = Field(max_length=256)
    # The model as it runs with these TL hook switches on (they change which TL hook points
    # fire, and their order); the server probes each combination once, on first request.
    tl_flags: list[TLHookFlag] = Field(default_factory=list, max_length=4)


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


_RefList = TypeAdapter(list[ResidentRef])


class SubmitHead(_Msg):
    """A :class:`Submit` without its graph-bearing fields (``graph``, ``generate``): what a
    client builds and checks with the models, before it appends the graph as its tracer
    wrote it (:meth:`with_graph`). Re-validating a traced graph on the client would cost
    more than serialising it (10,000 nodes: ~300 ms against ~55 ms) and the server
    validates it anyway."""
    type: Literal["submit"] = "submit"
    request_id: str = Field(max_length=64)
    tensors: list[TensorHeader] = Field(default_factory=list, max_length=100_000)
    refs: list[ResidentRef] = Field(default_factory=list, max_length=100_000)
    # Uploaded tensors to keep for later requests: tid -> its content id (checked on arrival).
    keep: dict[Annotated[str, Field(max_length=64)],
               Annotated[str, Field(pattern=RESIDENT_ID_PATTERN)]] = Field(
        default_factory=dict, max_length=100_000)
    keep_results: bool = True  # keep the saved values resident, so later requests can refer
    # False: no ``accepted`` and no ``progress`` messages (a client that shows no progress
    # saves them on every call).
    progress: bool = True

    def with_graph(self, graph_json: str, generate_json: str | None = None) -> str:
        """The submit's JSON text: this head (``type`` and ``request_id`` first, where the
        server looks for them before parsing), then ``graph`` and ``generate`` as given."""
        head = self.model_dump_json()
        tail = f',"generate":{generate_json}' if generate_json is not None else ""
        return f'{head[:-1]},"graph":{graph_json}{tail}}}'


class Submit(SubmitHead):
    """Client -> server: run ``graph``. Its attached tensors are declared in ``tensors`` (their
    bytes follow as binary frames) or referred to on the server in ``refs``; ``keep`` asks
    the server to keep uploads for later requests; ``generate`` makes it a generate request.
    Answered by ``accepted``, ``progress``..., ``result`` + frames per saved value, and
    exactly one ``done`` or ``error``; ``progress=False``: no ``accepted`` and no
    ``progress`` messages."""
    graph: Graph
    # Set: generate tokens after the prompt (``graph`` is the prompt's forward); see
    # hookwire.generation.
    generate: GenerateSpec | None = None


class Cancel(_Msg):
    """Client -> server: stop request ``request_id`` (it ends with a ``cancelled`` error)."""
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
    """Server -> client, answer to ``hello``: versions and the models served."""
    type: Literal["hello_ok"] = "hello_ok"
    protocol: int
    server_version: str
    models: list[str]


class SiteDescription(_Msg):
    """One hook site of a served model, in firing order: name, call index, symbolic shape,
    dtype, whether it has a gradient and whether it fires only with eager attention."""
    name: str
    call: int = 0
    # "B": batch, "S": sequence, "B*S": both flattened into one dim (batch-major), "B*S*k":
    # the same times k (top-k token x expert pairs)
    shape: list[Union[int, Annotated[str, Field(pattern=r"^(B|S|B\*S(\*[1-9][0-9]{0,5})?)$")]]]
    dtype: str
    grad: bool = False  # has a gradient in a backward pass (depends on the weights)
    # Fires only with eager attention (attention patterns and scores): requests that use it
    # run with eager attention, as TransformerLens's own loader always does.
    eager: bool = False
    # How its activation lies in memory when not contiguous (hookwire.site_layout): each
    # dim's stride as coef * B**b * S**s, given as [coef, b, s].
    layout: Optional[list[tuple[Annotated[int, Field(ge=0, le=1 << 40)],
                                Annotated[int, Field(ge=0, le=1)],
                                Annotated[int, Field(ge=0, le=2)]]]] = None


class ModelInfo(_Msg):
    """Server -> client: everything a client needs to trace against a served model without
    its weights (the manifest, ``server/manifest.py``): architecture and config, the sites
    in firing order, hook names and aliases, tokenizer files, what cannot be served and why,
    module layouts for torch-hook fronts, and the TL config a local model must match."""
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
    # Sites that fire in the model's forward but cannot be hooked remotely as they run
    # locally: name (a TL hook point or "hf:<path>:<kind>") -> why. Clients refuse hooks on
    # them before sending anything.
    unserved_sites: dict[str, str] = Field(default_factory=dict)
    # What the forward returns: "logits", or "last_hidden_state" for a base model without an
    # LM head (graphs read it as the "logits" output either way).
    output: Literal["logits", "last_hidden_state"] = "logits"
    output_dtype: str = "float32"
    # False: a later token changes earlier positions' outputs (TL's hand-built test models,
    # an encoder used as a decoder). The server then never pads its requests, and a client
    # must not pad rows of different lengths into one forward (pyvene's sources).
    causal: bool = True
    # The last dim of the forward's output as the server measured it at load (the vocabulary,
    # or a base model's hidden size); None from servers that do not say.
    output_width: int | None = None
    # Why the model cannot generate on the server (hookwire.hf generate), or None.
    generate_refused: str | None = None
    # Why its TransformerLens hook points are not served (TL clients refuse it), or None.
    tl_refused: str | None = None
    # What torch hooks see besides tensors, for HF module sites: "hf:<path>:output" -> the
    # type names of the tuple a module returns (only tuple outputs are listed), and
    # "hf:<path>:input" -> those of its positional arguments; e.g. ["Tensor", "NoneType"].
    # ``step_module_layouts``: the same in a generation step's forward (with a KV cache),
    # where they differ.
    module_layouts: dict[str, list[str]] = Field(default_factory=dict)
    step_module_layouts: dict[str, list[str]] = Field(default_factory=dict)
    # "hf:<path>:input" -> {keyword: type name} for modules called with keyword arguments
    # (what nnsight's ``.inputs`` hands over as its kwargs), and the same in a generation step.
    module_kwarg_layouts: dict[str, dict[str, str]] = Field(default_factory=dict)
    step_module_kwarg_layouts: dict[str, dict[str, str]] = Field(default_factory=dict)
    # Output sites of modules that return a list rather than a tuple (GPT-1's blocks).
    list_outputs: list[str] = Field(default_factory=list)
    # The TL 4 config values a local model must share with the server's to run its hooks
    # remotely (n_layers, d_model, n_heads, d_head, d_mlp, d_vocab, architecture).
    tl_config: dict = Field(default_factory=dict)
    # The TL hook switches on when ``sites`` were recorded (see ModelInfoRequest.tl_flags).
    tl_flags: list[str] = Field(default_factory=list)


class Accepted(_Msg):
    """Server -> client: the submit was admitted and queued at ``queue_position``."""
    type: Literal["accepted"] = "accepted"
    request_id: str
    queue_position: int


class Progress(_Msg):
    """Server -> client: a request is queued, started, at site ``site`` of ``of``, or in
    its backward pass."""
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
    """Server -> client: a typed error (``code`` from :mod:`hookwire.errors`; ``details``
    carry ``node``, ``op``, ``rule`` where they apply); with a ``request_id`` it ends that
    request."""
    type: Literal["error"] = "error"
    request_id: str | None = None
    code: str
    message: str
    details: dict = Field(default_factory=dict)


class Done(_Msg):
    """Server -> client: the request finished; every result was sent before this."""
    type: Literal["done"] = "done"
    request_id: str
    timings: dict[str, float] = Field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0


ClientMessage = Annotated[Union[Hello, ModelInfoRequest, Submit, Cancel, WeightsRequest],
                          Field(discriminator="type")]
ServerMessage = Annotated[Union[HelloOk, ModelInfo, Accepted, Progress, Result, Error, Done],
                          Field(discriminator="type")]
_client_adapter: TypeAdapter[ClientMessage] = TypeAdapter(ClientMessage)
_server_adapter: TypeAdapter[ServerMessage] = TypeAdapter(ServerMessage)
_M = TypeVar("_M")


def _first_error(exc: ValidationError) -> tuple[list[int | str], str]:
    """Where pydantic's first complaint is, and what it says: what a refusal names."""
    errors = exc.errors()
    if not errors:
        return [], str(exc)
    return list(errors[0]["loc"]), errors[0]["msg"]


def _parse(adapter: TypeAdapter[_M], text: str | bytes) -> _M:
    if len(text) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(text)} bytes; limit {MAX_CONTROL_BYTES}")
    try:
        return adapter.validate_json(text)
    except ValidationError as exc:
        at, msg = _first_error(exc)
        loc = ".".join(str(p) for p in at)
        raise ProtocolError(f"malformed message at {loc or 'top level'}: {msg[:300]}") from None


def parse_client_message(text: str | bytes) -> ClientMessage:
    return _parse(_client_adapter, text)


# ---- bounded parsing of client messages (the server's intake, off its event loop) ---------

STRUCTURE_CHUNK = 1 << 16      # density is checked per 64 KiB of message
MAX_CONTAINERS_PER_CHUNK = 8192  # [ and { per chunk: ~1 per 8 bytes (a graph has ~1 per 12)
_SLICE = 2000                  # list items validated per call (each call is short)
_NodeList = TypeAdapter(list[Node])
_HeaderList = TypeAdapter(list[TensorHeader])


def _pairs(pairs):
    # A Python-level hook the C scanner calls at the end of every object: the interpreter
    # gets the chance to hand the GIL to other threads (the event loop) while a big
    # message is parsed.
    return dict(pairs)


PAUSE_EVERY = 256  # objects parsed between two calls of a parse's ``pause``


def _pairs_pausing(pause: Callable[[], None]):
    """``_pairs`` that also calls ``pause()`` every ``PAUSE_EVERY`` objects: where a server
    lets a long parse give way to its model worker (see server/intake.py)."""
    count = [0]

    def pairs(items):
        count[0] += 1
        if count[0] % PAUSE_EVERY == 0:
            pause()
        return dict(items)
    return pairs


def check_structure(text: str, max_containers: int) -> int:
    """Cheap caps before any parsing: the total number of containers ([ and {) and their
    density per 64 KiB. What makes JSON expensive to parse is containers (a message of
    ``[],[],...`` costs ~1 us per 3 bytes, 100x a graph's bytes), so both are bounded before
    a single object is built. Work per call is bounded: str.count on 64 KiB slices. Returns
    the count."""
    total = 0
    for start in range(0, len(text), STRUCTURE_CHUNK):
        chunk = text[start:start + STRUCTURE_CHUNK]
        n = chunk.count("[") + chunk.count("{")
        if n > MAX_CONTAINERS_PER_CHUNK:
            raise ProtocolError(f"message too dense: {n} arrays/objects in 64 KiB at byte "
                                f"{start} (limit {MAX_CONTAINERS_PER_CHUNK})")
        total += n
        if total > max_containers:
            # (max_containers is what a graph of Limits.max_nodes nodes can need)
            raise LimitExceeded(f"message has more than {max_containers} arrays/objects: "
                                "more than a graph of the largest allowed size needs",
                                rule="max_nodes")
    return total


_SUBMIT_ID = re.compile(r'"type"\s*:\s*"submit"|"request_id"\s*:\s*"([^"\\]{1,64})"')


def _declared_request_id(text: str) -> str | None:
    """The request id a submit names in its first 4 KiB (clients write ``type`` and
    ``request_id`` first), read without parsing: so a message refused before it is parsed
    still names its request, and that request's frames are dropped."""
    head, is_submit, rid = text[:4096], False, None
    for match in _SUBMIT_ID.finditer(head):
        if match.group(1) is None:
            is_submit = True
        elif rid is None:
            rid = match.group(1)
    return rid if is_submit else None


def request_id_of(raw) -> str | None:
    """The request id of a parsed (not validated) submit, so a refusal can name it."""
    if isinstance(raw, dict) and raw.get("type") == "submit":
        rid = raw.get("request_id")
        if isinstance(rid, str) and len(rid) <= 64:
            return rid
    return None


def _presplit(raw: dict, key: str, adapter: TypeAdapter, where: str,
              pause: Callable[[], None] | None = None) -> None:
    """Validate a long list in short slices (each a separate, short call into pydantic),
    leaving validated objects in place: pydantic then takes them as they are. ``pause()``
    is called between slices."""
    items = raw.get(key)
    if not isinstance(items, list) or len(items) <= _SLICE:
        return
    out = []
    for i in range(0, len(items), _SLICE):
        if pause is not None and i:
            pause()
        try:
            out += adapter.validate_python(items[i:i + _SLICE])
        except ValidationError as exc:
            at, msg = _first_error(exc)
            at = at or [0]
            at[0] = at[0] + i if isinstance(at[0], int) else at[0]
            loc = ".".join(str(p) for p in (where, key, *at) if p != "")
            raise ProtocolError(f"malformed message at {loc}: {msg[:300]}") from None
    raw[key] = out


def parse_client_message_bounded(text: str | bytes, max_containers: int,
                                 pause: Callable[[], None] | None = None,
                                 before_parse: Callable[[int], None] | None = None,
                                 ) -> tuple[str | None, ClientMessage]:
    """(request id or None, message) -- the server's one parse of a client message: caps
    first (:func:`check_structure`), then one ``json.loads``, then pydantic on the parsed
    value, long lists in short slices. Raises ``ProtocolError`` (``exc.request_id`` names
    the submit it refuses, when there is one). ``pause``, if given, is called every few
    hundred objects and between slices: a server passes one that waits while its model
    worker runs, so a big message's parse never competes with a forward for the GIL.
    ``before_parse(containers)``, if given, is called once the caps pass and before anything
    is built (a server reserves the memory the parsed message will hold; it may raise)."""
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise ProtocolError("control message is not UTF-8") from None
    if len(text) > MAX_CONTROL_BYTES:
        raise ProtocolError(f"control message of {len(text)} bytes; limit {MAX_CONTROL_BYTES}")
    try:
        containers = check_structure(text, max_containers)
        if before_parse is not None:
            before_parse(containers)
        raw = json.loads(text, object_pairs_hook=_pairs if pause is None else
                         _pairs_pausing(pause))
    except (ValueError, RecursionError, HookwireError) as exc:
        error = exc if isinstance(exc, HookwireError) else ProtocolError(
            f"malformed message: not JSON ({str(exc)[:200]})")
        error.request_id = _declared_request_id(text)
        raise error from None
    rid = request_id_of(raw)
    try:
        if rid is not None and isinstance(raw.get("graph"), dict):
            _presplit(raw["graph"], "nodes", _NodeList, "graph", pause)
            for key in ("tensors", "refs"):
                _presplit(raw, key, _HeaderList if key == "tensors" else _RefList, "", pause)
            gen = raw.get("generate")
            if isinstance(gen, dict) and isinstance(gen.get("steps"), list):
                for k, step in enumerate(gen["steps"]):
                    if isinstance(step, dict):
                        _presplit(step, "nodes", _NodeList, f"generate.steps.{k}",
                                  pause)
        try:
            return rid, _client_adapter.validate_python(raw)
        except ValidationError as exc:
            at, msg = _first_error(exc)
            loc = ".".join(str(p) for p in at)
            raise ProtocolError(f"malformed message at {loc or 'top level'}: "
                                f"{msg[:300]}") from None
    except ProtocolError as exc:
        exc.request_id = rid
        raise


def parse_server_message(text: str | bytes) -> ServerMessage:
    return _parse(_server_adapter, text)


def dump(msg: _Msg) -> str:
    return msg.model_dump_json(exclude_none=False)


def protocol_json_schema() -> dict:
    return {"protocol": PROTOCOL_VERSION,
            "client": _client_adapter.json_schema(),
            "server": _server_adapter.json_schema()}


__all__ = ["PROTOCOL_VERSION", "Hello", "ModelInfoRequest", "Submit", "SubmitHead", "Cancel",
           "HelloOk",
           "WeightsRequest",
           "SiteDescription", "ModelInfo", "ResidentRef", "Accepted", "Progress", "Result", "Error", "Done",
           "parse_client_message", "parse_client_message_bounded", "check_structure",
           "request_id_of", "parse_server_message", "dump", "protocol_json_schema"]
