"""Hypothesis strategies and oracles for fuzzing hookwire's message decoder, graph validator
and executor (used by tests/test_fuzz.py in CI and by bench/fuzz_extended.py for long runs).

Each oracle takes one generated message, runs it through the real code and returns its
outcome label: ``"ok"`` or the class name of the typed error (a ``HookwireError``). Anything
else -- another exception, an ``internal_error`` answer, no answer -- raises
``FuzzFailure``, which is what the fuzzers look for.
"""
from __future__ import annotations

import json
import struct
import threading

import torch
from hypothesis import strategies as st

from hookwire.errors import ERROR_TYPES, HookwireError
from hookwire.frames import DTYPES, FRAME_VERSION, TensorAssembler, TensorHeader, decode_frame
from hookwire.graph import Graph
from hookwire.ops import OPS
from hookwire.protocol import Done, Error, parse_client_message, parse_server_message
from hookwire.server.residents import ResidentStore
from hookwire.server.worker import Job, ModelWorker
from hookwire.validate import Limits, infer_shapes, validate_structure


class FuzzFailure(AssertionError):
    """A message that was not answered by a result or a typed error."""


JUNK_OPS = ["__class__", "__globals__", "eval", "exec", "__import__", "getattr", "os.system",
            "torch.load", "", "site.reads", "Add", "zeros"]
UNARY = ["neg", "abs", "exp", "tanh", "relu", "sigmoid", "clone", "float", "sqrt", "log",
         "reciprocal", "sign", "square", "isnan", "logical_not", "half", "long", "bool", "t",
         "contiguous", "zeros_like", "ones_like", "detach", "gelu", "silu", "floor"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "pow", "eq", "lt", "remainder",
          "atan2", "matmul", "where", "masked_fill", "logical_and", "bitwise_and", "fmod"]
REDUCE = ["sum", "mean", "amax", "prod", "logsumexp", "argmax", "softmax", "cumsum", "std",
          "norm", "all", "topk", "sort", "max"]
SHAPE = ["reshape", "view", "transpose", "permute", "unsqueeze", "squeeze", "flatten",
         "expand", "repeat", "narrow", "select", "getitem", "setitem", "cat", "stack",
         "einsum", "tuple_get", "roll", "flip", "tril", "one_hot", "pad", "gather"]

TYPED_SHAPE_OPS = [("reshape", [[-1]], {}), ("transpose", [0, 1], {}), ("unsqueeze", [0], {}),
                   ("getitem", [[{"slice": [None, None, None]}, -1]], {}),
                   ("getitem", [[{"ellipsis": True}, {"slice": [0, 8, None]}]], {}),
                   ("flip", [[-1]], {}), ("roll", [1, -1], {}), ("sum", [], {"dim": -1}),
                   ("softmax", [-1], {}), ("setitem", [[0], 0.0], {}),
                   ("expand", [[2, -1, -1, -1]], {}), ("narrow", [-1, 0, 4], {})]


def _rare(draw, n: int) -> bool:
    """True about once in ``n`` draws (hypothesis leans toward small integers, so a plain
    ``integers(0, n) == 0`` would be true far more often)."""
    return draw(st.sampled_from([False] * (n - 1) + [True]))


INTS = st.one_of(st.integers(-4, 4), st.integers(-2 ** 64, 2 ** 64),
                 st.sampled_from([2 ** 31, 2 ** 62, -2 ** 63, 10 ** 6]))
FLOATS = st.one_of(st.floats(allow_nan=False, allow_infinity=False, width=32),
                   st.sampled_from([{"float": "nan"}, {"float": "inf"}, {"float": "-inf"}]))
SCALARS = st.one_of(INTS, FLOATS, st.booleans(), st.none(),
                    st.text(max_size=12), st.sampled_from(["tanh", "none", "fro", "constant",
                                                          "bsd,bsd->bs", "...d->...", "ij->ji"]))
DTYPE_ARGS = st.sampled_from([{"dtype": d} for d in DTYPES] + [{"dtype": "object"}])
SLICES = st.builds(lambda a, b, c: {"slice": [a, b, c]}, st.none() | st.integers(-5, 5),
                   st.none() | st.integers(-5, 5), st.none() | st.integers(-2, 3))
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def _arg(n_nodes: int, constants: list[str]):
    refs = st.builds(lambda i: {"ref": i}, st.integers(-1, n_nodes + 1))
    consts = st.sampled_from([{"const": c} for c in constants] + [{"const": "nope"}])
    leaf = st.one_of(refs, refs, refs, SCALARS, consts, SLICES, DTYPE_ARGS,
                     st.just({"ellipsis": True}), JSON)
    return st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.builds(lambda v: {"list": v}, st.lists(inner, max_size=4)),
                        max_leaves=6)


@st.composite
def graphs(draw, sites: list, model: str = "tiny-gpt2"):
    """A graph over ``sites`` (SiteInfo list of the served model, in firing order): mostly
    well-formed (reads, typed ops on earlier values, writes of what was read) so the
    executor runs, with every kind of mistake mixed in."""
    # TL hook points mostly (HF module sites are a separate kind a graph may not mix in).
    pool = [i for i, s in enumerate(sites) if not s.name.startswith("hf:")]
    if _rare(draw, 8):
        pool = [i for i, s in enumerate(sites) if s.name.startswith("hf:")]
    picked = sorted(draw(st.lists(st.sampled_from(pool), max_size=3, unique=True)))
    use_sites = [{"name": sites[i].name, "call": sites[i].call} for i in picked]
    if _rare(draw, 30):
        use_sites.append({"name": draw(st.sampled_from(["blocks.9.hook_in", "hf:x:output",
                                                          "W_E", "__class__"])), "call": 0})
    constants = draw(st.lists(st.sampled_from(["c0", "c1", "c2"]), max_size=3, unique=True))
    nodes: list[dict] = []
    for k in range(len(use_sites)):
        if not _rare(draw, 6):
            nodes.append({"id": len(nodes), "op": "site.read", "args": [k]})
    for _ in range(draw(st.integers(0, 8))):
        i = len(nodes)
        ref = st.builds(lambda j: {"ref": j}, st.integers(0, max(i - 1, 0))) if i else \
            st.sampled_from([{"const": c} for c in constants] or [{"ref": 0}])
        kind = draw(st.integers(0, 9))
        if kind <= 2:
            node = {"op": draw(st.sampled_from(UNARY)), "args": [draw(ref)]}
        elif kind <= 4:
            node = {"op": draw(st.sampled_from(BINARY)),
                    "args": [draw(ref), draw(ref | FLOATS | st.integers(-3, 3))]}
        elif kind == 5:
            node = {"op": draw(st.sampled_from(REDUCE)), "args": [draw(ref)],
                    "kwargs": draw(st.sampled_from([{}, {"dim": -1}, {"dim": 0},
                                                    {"dim": 5}, {"k": 2}]))}
        elif kind == 6 and not _rare(draw, 3):
            node = draw(st.sampled_from(TYPED_SHAPE_OPS))
            node = {"op": node[0], "args": [draw(ref)] + node[1], "kwargs": node[2]}
        elif kind == 6:
            node = {"op": draw(st.sampled_from(SHAPE)),
                    "args": [draw(ref)] + draw(st.lists(_arg(i, constants), max_size=3))}
        elif kind == 7 and use_sites:
            node = {"op": "site.write", "args": [draw(st.integers(0, len(use_sites) - 1)),
                                                 draw(ref)],
                    "kwargs": {"mode": draw(st.sampled_from(["replace", "inplace", "replace", "inplace",
                                                             "narrow", "append"]))}}
        elif kind == 8:
            node = {"op": draw(st.sampled_from(list(OPS) + JUNK_OPS)),
                    "args": draw(st.lists(_arg(i, constants), max_size=3)),
                    "kwargs": draw(st.dictionaries(st.sampled_from(["dim", "keepdim", "dtype",
                                                                    "out", "mode", "alpha"]),
                                                   _arg(i, constants), max_size=2))}
        elif _rare(draw, 3):
            node = {"op": "output.read", "args": [draw(st.sampled_from(["logits", "loss"]))]}
        else:
            node = {"op": draw(st.sampled_from(UNARY)), "args": [draw(ref)]}
        node["id"] = i if not _rare(draw, 40) else draw(st.sampled_from([i + 1, 0, -1]))
        nodes.append(node)
    saves = {f"s{j}": draw(st.sampled_from(list(range(len(nodes)))) if nodes and not
                           _rare(draw, 30) else st.sampled_from([-1, len(nodes)]))
             for j in range(draw(st.integers(0, 3)))}
    graph = {"version": 1, "model": model, "inputs": {"input_ids": "input_ids"},
             "constants": constants, "sites": use_sites, "nodes": nodes, "saves": saves,
             "forward": {"return_type": draw(st.sampled_from(["logits", None, "loss",
                                                              "both"]))}}
    if _rare(draw, 10):
        graph["backward"] = draw(st.integers(-1, len(nodes)))
    return graph


def tensors_for(draw_seed: int, constants: list[str], batch: int = 2, seq: int = 5):
    """Token ids and constants for a generated graph (small; mixed dtypes and shapes)."""
    gen = torch.Generator().manual_seed(draw_seed)
    out = {"input_ids": torch.randint(0, 257, (batch, seq), generator=gen)}
    shapes = [(), (64,), (batch, seq, 64), (seq,), (1, 1)]
    dtypes = [torch.float32, torch.int64, torch.bool, torch.float16]
    for i, tid in enumerate(constants):
        shape = shapes[(draw_seed + i) % len(shapes)]
        dtype = dtypes[(draw_seed // 7 + i) % len(dtypes)]
        out[tid] = (torch.randn(shape, generator=gen) * 3).to(dtype)
    return out


# ---- cheap variants: each hypothesis example fans out into K mutated messages --------------
# (hypothesis draws a structured message in ~30 ms; a seeded mutation costs microseconds,
# so the CI run reaches 10,000 messages in about a minute and a half)

_JUNK_ARGS = [{"ref": -1}, {"ref": 10 ** 9}, {"const": "zz"}, {"dtype": "object"}, "__class__",
              {"float": "nan"}, 2 ** 70, -1, [[[[[[[[[[0]]]]]]]]]], {"slice": [0, 2 ** 63, 0]},
              {"ellipsis": True}, None, True, 1e308, {"list": [1, 2, 3]}, [0, -1], "x" * 300]


def mutate_graph(graph: dict, rng) -> dict:
    """One random edit of a graph: an op, an argument, a reference, a node, a site, a save."""
    g = json.loads(json.dumps(graph))
    nodes = g["nodes"]
    how = rng.randrange(8)
    if nodes and how == 0:
        rng.choice(nodes)["op"] = rng.choice(list(OPS) + JUNK_OPS + ["site.read", "site.write",
                                                                    "site.grad", "output.read"])
    elif nodes and how == 1:
        node = rng.choice(nodes)
        args = node.setdefault("args", [])
        if args:
            args[rng.randrange(len(args))] = rng.choice(_JUNK_ARGS + [{"ref": rng.randrange(
                len(nodes) + 1)}])
        else:
            args.append(rng.choice(_JUNK_ARGS))
    elif nodes and how == 2:
        del nodes[rng.randrange(len(nodes))]
    elif nodes and how == 3:
        node = dict(rng.choice(nodes), id=len(nodes))
        nodes.append(node)
    elif nodes and how == 4:
        rng.choice(nodes).setdefault("kwargs", {})[rng.choice(
            ["dim", "mode", "dtype", "keepdim", "out", "alpha", "k"])] = rng.choice(_JUNK_ARGS)
    elif g["sites"] and how == 5:
        site = rng.choice(g["sites"])
        site[rng.choice(["name", "call"])] = rng.choice(
            ["blocks.0.hook_in", "blocks.1.hook_out", "embed.hook_in", 1, 0, "W_E"])
    elif how == 6:
        g["saves"][rng.choice(["s0", "s9"])] = rng.randrange(-1, len(nodes) + 2)
    else:
        g["forward"] = {"return_type": rng.choice(["logits", "loss", "both", None]),
                        "output_attentions": rng.random() < 0.2}
    return g


def mutate_text(text: str, rng) -> str:
    n = len(text)
    i = rng.randrange(n + 1)
    j = min(n, i + rng.randrange(40))
    how = rng.randrange(4)
    if how == 0:
        return text[:i] + text[j:]
    if how == 1:
        return text[:i] + text[i:j] * 3 + text[j:]
    if how == 2:
        return text[:i] + "".join(chr(rng.randrange(1, 0x2FF)) for _ in range(3)) + text[j:]
    return text[:i] + rng.choice(["[", "{", "\"", "\\u0000", "9" * 30, "-", "null", "true",
                                  "1e999", "\\ud800", "{\"ref\":"]) + text[j:]


def mutate_bytes(data: bytes, rng) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        if b and rng.random() < 0.7:
            b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            b[rng.randrange(len(b) + 1):rng.randrange(len(b) + 1)] = b""
    return bytes(b)


# ---- messages for the decoder ---------------------------------------------------------------

def _mutate(text: str, data) -> str:
    """Cut, duplicate or corrupt a piece of a valid message."""
    n = len(text)
    i = data.draw(st.integers(0, n))
    j = data.draw(st.integers(i, min(n, i + 40)))
    how = data.draw(st.integers(0, 3))
    if how == 0:
        return text[:i] + text[j:]
    if how == 1:
        return text[:i] + text[i:j] * 3 + text[j:]
    if how == 2:
        return text[:i] + data.draw(st.text(max_size=6)) + text[j:]
    return text[:i] + data.draw(st.sampled_from(["[", "{", "\"", "\\u0000", "9" * 30, "-",
                                                 "null", "true", "1e999", "\\ud800"])) + text[j:]


@st.composite
def client_messages(draw, sites: list):
    """Text messages a client could send: valid ones, corrupted ones, random JSON."""
    data = draw(st.data())
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return json.dumps(draw(JSON))
    if kind == 1:
        return json.dumps({"type": draw(st.sampled_from(["hello", "model_info", "cancel",
                                                         "submit", "exec"])),
                           **draw(st.dictionaries(st.sampled_from(
                               ["protocol", "client_version", "model", "request_id", "graph",
                                "tensors", "refs", "keep"]), JSON, max_size=4))})
    msg = json.dumps({"type": "submit", "request_id": "r1", "graph": draw(graphs(sites)),
                      "tensors": [{"tid": "input_ids", "dtype": "int64", "shape": [2, 5]}]})
    return _mutate(msg, data) if kind >= 3 else msg


@st.composite
def binary_frames(draw):
    """Binary messages: chunk frames with honest or lying headers, and raw junk."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=64))
    head = {"v": draw(st.sampled_from([FRAME_VERSION, FRAME_VERSION, 2, "1"])),
            "rid": draw(st.sampled_from(["r1", "r1", "other", 5])),
            "tid": draw(st.sampled_from(["x", "x", "y", None])),
            "offset": draw(st.sampled_from([0, 0, 8, -8, 2 ** 70, True, "0"]))}
    raw = json.dumps(head).encode()
    prefix = draw(st.sampled_from([len(raw)] * 6 + [0, len(raw) + 1, 2 ** 32 - 1]))
    return struct.pack("<I", prefix) + raw + draw(st.binary(max_size=48))


HEADERS = st.lists(st.fixed_dictionaries({
    "tid": st.sampled_from(["x", "y"]),
    "dtype": st.sampled_from(list(DTYPES) + ["object", "complex64"]),
    "shape": st.lists(st.integers(-1, 6) | st.sampled_from([0, 2 ** 62, 2 ** 70]), max_size=9)}),
    max_size=2)


# ---- oracles ---------------------------------------------------------------------------------

def _typed(exc: BaseException) -> str:
    if isinstance(exc, HookwireError) and exc.code in ERROR_TYPES:
        return type(exc).__name__
    raise FuzzFailure(f"untyped failure: {type(exc).__name__}: {exc}") from exc


def decode_text(message: str) -> str:
    """The server's decoder on one text message."""
    try:
        parse_client_message(message)
        return "ok"
    except Exception as exc:
        return _typed(exc)


def decode_binary(headers: list, frame: bytes) -> str:
    """The server's frame path: declare tensors, then take one binary message."""
    try:
        asm = TensorAssembler([TensorHeader.model_validate(h) for h in headers], 1 << 20)
        head, payload = decode_frame(frame)
        asm.add(head, payload)
        if asm.complete:
            asm.tensors()
        return "ok"
    except Exception as exc:
        if type(exc).__name__ == "ValidationError":  # pydantic, as protocol.py maps it
            return "ProtocolError"
        return _typed(exc)


def validate_graph(entry, graph: dict, tensors: dict, limits: Limits = Limits()) -> str:
    """Structure and shape validation of one graph, as the worker does it."""
    try:
        g = Graph.model_validate_json(json.dumps(graph))
    except Exception as exc:
        if type(exc).__name__ == "ValidationError":
            return "ProtocolError"
        return _typed(exc)
    try:
        vg = validate_structure(g, entry.site_table, entry.site_order, limits)
        consts = {t: tensors[t] for t in g.constants if t in tensors}
        infer_shapes(vg, 2, 5, consts, limits, outputs={
            "logits": ((2, 5, 257), torch.float32), "loss": ((), torch.float32)})
        return "ok"
    except Exception as exc:
        return _typed(exc)


class Sink:
    """What the worker talks to instead of a websocket: it keeps what would be sent."""

    def __init__(self):
        self.user = "fuzz"
        self.store = ResidentStore(64 << 20, 60)
        self.cancelled: set = set()
        self.closed = False
        self.sent: list = []
        self.lock = threading.Lock()

    def send_threadsafe(self, item, may_wait=False):
        self.sent.append(item)

    def flush_due(self):
        pass


def execute(worker: ModelWorker, graph: dict, tensors: dict) -> str:
    """Parse, validate and run one request with the real worker code (no socket): it must
    end in exactly one done or one typed error."""
    try:
        from hookwire.protocol import Submit
        submit = Submit.model_validate_json(json.dumps(
            {"type": "submit", "request_id": "f", "graph": graph}))
    except Exception as exc:
        if type(exc).__name__ == "ValidationError":
            return "ProtocolError"
        return _typed(exc)
    sink = Sink()
    worker.execute_batch([Job(sink, "f", submit, tensors, 0)])
    finals = [m for m in (parse_server_message(x) for x in sink.sent if isinstance(x, str))
              if isinstance(m, (Done, Error))]
    if len(finals) != 1:
        raise FuzzFailure(f"{len(finals)} final answers for one request: {finals}")
    final = finals[0]
    if isinstance(final, Done):
        return "ok"
    if final.code not in ERROR_TYPES:
        raise FuzzFailure(f"untyped error answer: {final.code}: {final.message}")
    return ERROR_TYPES[final.code].__name__


def through_server(conn, graph: dict, tensors: dict) -> str:
    """One generated request through a real server; the connection must stay usable."""
    try:
        conn.run(graph, tensors)
        return "ok"
    except HookwireError as exc:
        if exc.code not in ERROR_TYPES or exc.code == "server_unavailable":
            raise FuzzFailure(f"server answered {exc.code}: {exc.message}") from exc
        return type(exc).__name__


__all__ = ["graphs", "client_messages", "binary_frames", "HEADERS", "tensors_for",
           "decode_text", "decode_binary", "validate_graph", "execute", "through_server",
           "FuzzFailure"]
