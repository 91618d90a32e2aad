"""Runs the hostile corpus (``corpus.json`` beside this file) against a real server.

A case is data. Its fields:

* ``graph``: a graph (``model``, ``inputs``, ``forward`` default to tiny-gpt2 / token ids /
  logits) sent through ``hookwire.client.Connection.run`` with the fixture's token ids and
  the tensors of ``tensors`` (``{tid: {dtype, shape, fill | values | b64}}``; a tensor named
  ``input_ids`` replaces the token ids);
* ``raw``: websocket messages sent as they are: ``submit`` (a submit's body; type and request
  id are added), ``json``, ``text``, ``text_nest`` (JSON nested that deep), ``binary_b64``,
  ``tokens_frame`` (the token ids as one chunk frame, header fields overridden, null = left
  out). ``then_good_submit``: a good submit follows, which is what ends a request whose
  declared bytes never all came;
* ``expect``: ``{"error": class name in hookwire.errors, "rule": ...}`` -- the exact class,
  and the rule when given -- or ``{"ok": {save: check}}`` for inert data: a list of
  values (``{"float": "nan"}`` for non-finite ones), ``{"all_nan": true}``, ``{"shape": [..]}``
  or ``{"same_as": tid}`` (the bytes come back unchanged).

Placeholders: ``"$repeat:c:n"`` (a string or key of n times c), ``generate`` (``chain``:
n more nodes, each an op of the previous; ``nest``: the string ``"$NEST"`` becomes a list
nested n deep), ``$rid``, and ids of resident values: ``$OWN_RESULT`` (a result this
connection got), ``$FOREIGN_RESULT`` / ``$FOREIGN_UPLOAD`` (another user's result and kept
upload).
"""
from __future__ import annotations

import base64
import json
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hookwire.errors import ERROR_TYPES, HookwireError, error_from_code
from hookwire.frames import DTYPES, encode_chunks, header_for, tensor_bytes
from hookwire.protocol import Done, Error, Result, parse_server_message
from hookwire.residents import content_id

CORPUS_PATH = Path(__file__).with_name("corpus.json")
PAYLOAD_MARKER = Path("/tmp/hookwire_pickle_payload_ran")  # what the payloads would create
_REPEAT = re.compile(r"^\$repeat:(.):(\d+)$", re.S)
_FLOATS = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def load_corpus() -> list[dict]:
    return json.loads(CORPUS_PATH.read_text())["cases"]


@dataclass
class Outcome:
    error: str | None = None            # class name of the typed error, or None
    rule: str | None = None
    values: dict = field(default_factory=dict)


@dataclass
class ResidentIds:
    own_result: str
    foreign_result: str
    foreign_upload: str


def _expand(value, subst: dict):
    if isinstance(value, str):
        if value in subst:
            return subst[value]
        m = _REPEAT.match(value)
        return m.group(1) * int(m.group(2)) if m else value
    if isinstance(value, list):
        return [_expand(v, subst) for v in value]
    if isinstance(value, dict):
        return {_expand(k, subst): _expand(v, subst) for k, v in value.items()}
    return value


def _nest(depth: int):
    out: list = [1]
    for _ in range(depth):
        out = [out]
    return out


def _scalar(v):
    return _FLOATS[v["float"]] if isinstance(v, dict) else v


def build_tensor(spec: dict) -> torch.Tensor:
    dtype = DTYPES[spec["dtype"]]
    if "b64" in spec:
        return torch.frombuffer(bytearray(base64.b64decode(spec["b64"])), dtype=torch.uint8).to(dtype)
    if "values" in spec:
        return torch.tensor([_scalar(v) for v in spec["values"]], dtype=dtype)
    return torch.full(spec["shape"], _scalar(spec["fill"]), dtype=dtype)


_GRAPH_DEFAULTS = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                   "forward": {"return_type": "logits"}}


def full_graph(case: dict, subst: dict) -> dict:
    g = {**_GRAPH_DEFAULTS, "model": case.get("model", "tiny-gpt2")}
    g.update(case["graph"])
    gen = case.get("generate", {})
    if "nest" in gen:
        subst = {**subst, "$NEST": _nest(gen["nest"])}
    g = _expand(g, subst)
    if "chain" in gen:
        op, count = gen["chain"]["op"], gen["chain"]["count"]
        start = len(g["nodes"])
        g["nodes"] = g["nodes"] + [{"id": i, "op": op, "args": [{"ref": i - 1}]}
                                   for i in range(start, start + count)]
    return g


def _outcome_of_error(msg: Error) -> Outcome:
    err = error_from_code(msg.code, msg.message, msg.details)
    return Outcome(type(err).__name__ if msg.code in ERROR_TYPES else msg.code,
                   msg.details.get("rule"))


def _frame(rid: str, tokens: torch.Tensor, overrides: dict) -> bytes:
    head = {"v": 1, "rid": rid, "tid": "input_ids", "offset": 0}
    for k, v in overrides.items():
        if v is None:
            head.pop(k, None)
        else:
            head[k] = rid if v == "$rid" else v
    raw = json.dumps(head).encode()
    return len(raw).to_bytes(4, "little") + raw + bytes(tensor_bytes(tokens))


def _recv_until(conn, want: set, timeout: float = 120) -> dict:
    """Read server messages until each request id in ``want`` got its error or done (an
    error without a request id counts for all). Returns request id -> final message."""
    finals: dict = {}
    deadline = time.monotonic() + timeout
    while want - set(finals):
        data = conn.ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(data, bytes):
            continue
        msg = parse_server_message(data)
        if isinstance(msg, Error) and msg.request_id is None:
            return {rid: msg for rid in want}
        if isinstance(msg, (Error, Done)) and msg.request_id in want:
            finals[msg.request_id] = msg
    return finals


def _run_raw(conn, case: dict, tokens: torch.Tensor, subst: dict) -> Outcome:
    rid = f"hostile-{uuid.uuid4().hex[:10]}"
    subst = {**subst, "$rid": rid}
    for item in _expand(case["raw"], subst):
        (kind, body), = item.items()
        if kind == "submit":
            body = {**body, "graph": {**_GRAPH_DEFAULTS, **body["graph"]}}
            conn.ws.send(json.dumps({"type": "submit", "request_id": rid, **body}))
        elif kind == "json":
            conn.ws.send(json.dumps(body))
        elif kind == "text":
            conn.ws.send(body)
        elif kind == "text_nest":
            conn.ws.send('{"type":"submit","request_id":"' + rid + '","graph":' + "[" * body
                         + "]" * body + "}")
        elif kind == "binary_b64":
            conn.ws.send(base64.b64decode(body))
        elif kind == "tokens_frame":
            conn.ws.send(_frame(rid, tokens, body))
        else:
            raise AssertionError(f"unknown raw message kind {kind!r}")
    want = {rid}
    if case.get("then_good_submit"):
        good = f"{rid}-good"
        graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                 "sites": [], "nodes": [], "saves": {}, "forward": {"return_type": "logits"}}
        conn.ws.send(json.dumps({"type": "submit", "request_id": good, "graph": graph,
                                 "tensors": [header_for("input_ids", tokens).model_dump()]}))
        for frame in encode_chunks(good, "input_ids", tokens):
            conn.ws.send(frame)
        want.add(good)
    finals = _recv_until(conn, want)
    msg = finals[rid]
    if isinstance(msg, Done):
        return Outcome()
    return _outcome_of_error(msg)


def run_case(conn, case: dict, tokens: torch.Tensor, ids: ResidentIds) -> Outcome:
    subst = {"$OWN_RESULT": ids.own_result, "$FOREIGN_RESULT": ids.foreign_result,
             "$FOREIGN_UPLOAD": ids.foreign_upload}
    if "raw" in case:
        return _run_raw(conn, case, tokens, subst)
    tensors = {"input_ids": tokens}
    tensors.update({tid: build_tensor(spec) for tid, spec in case.get("tensors", {}).items()})
    try:
        result = conn.run(full_graph(case, subst), tensors)
    except HookwireError as exc:
        return Outcome(type(exc).__name__ if exc.code in ERROR_TYPES else exc.code,
                       exc.details.get("rule"))
    return Outcome(values=result.values)


def check(case: dict, outcome: Outcome) -> None:
    """Assert the outcome is the one the case expects."""
    expect = case["expect"]
    if "error" in expect:
        assert outcome.error == expect["error"], \
            f"{case['name']}: expected {expect['error']}, got {outcome.error} ({outcome.rule})"
        if "rule" in expect:
            assert outcome.rule == expect["rule"], \
                f"{case['name']}: expected rule {expect['rule']}, got {outcome.rule}"
        return
    assert outcome.error is None, f"{case['name']}: expected a result, got {outcome.error}"
    for name, want in expect["ok"].items():
        got = outcome.values[name]
        if isinstance(want, list):
            torch.testing.assert_close(got.flatten(), torch.tensor(
                [_scalar(v) for v in want], dtype=got.dtype), equal_nan=True, rtol=0, atol=0)
        elif "all_nan" in want:
            assert bool(got.isnan().all()) == want["all_nan"]
        elif "shape" in want:
            assert list(got.shape) == want["shape"]
        elif "same_as" in want:
            sent = build_tensor(case["tensors"][want["same_as"]])
            assert torch.equal(got, sent)
        else:
            raise AssertionError(f"unknown check {want}")


def resident_ids(conn, other, good_graph: dict, tokens: torch.Tensor) -> ResidentIds:
    """A result id of ``conn`` and a result id and kept-upload content id of ``other`` (a
    different user)."""
    def result_id(c, toks):
        seen = []
        c.run(good_graph, {"input_ids": toks}, on_event=lambda m: seen.append(m)
              if isinstance(m, Result) and m.resident else None)
        return seen[0].resident
    upload = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(6))
    foreign_result = result_id(other, upload)   # 512 bytes of token ids: kept by content id
    assert content_id(upload) in other.residents.server_has
    return ResidentIds(result_id(conn, tokens), foreign_result, content_id(upload))


__all__ = ["load_corpus", "run_case", "check", "resident_ids", "Outcome", "ResidentIds",
           "PAYLOAD_MARKER", "full_graph", "build_tensor"]
