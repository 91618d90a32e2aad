"""Fairness under attack: one tenant sends maximal hostile messages of one kind at full rate
while another tenant runs small requests; how much slower, and how much bigger, does the
server get for the victim?

Three processes, all on 127.0.0.1, stopped by PID at the end: a hookwire server (limits of a
shared server, below; two API keys; a fresh one per kind, idle figures measured on it
first), the attacker (``--attack KIND``: 4 connections of its
own key, each keeping up to 4 hostile messages in flight), and this process, the victim: one
connection of the other key sending a small request (read one residual site of tiny-gpt2 and
the logits, 1 x 8 tokens) as soon as the previous one is answered, every answer checked
against the idle answer (``allclose``, rtol 1e-5, atol 1e-6). Per kind: the victim's p50/p99
latency over its idle p50/p99 (goal p99 <= 2x), the server's peak RSS over its idle RSS (goal
<= 1.5x), requests that failed or were wrong (goal 0).

Kinds (SECURITY.md, "Co-tenancy", names each class):
  shared_write   1: replace GPT-2's position ids (one tensor for the whole batch)
  bad_ids        2: write token ids outside the vocabulary into embed.hook_in
  late_work      3: a chain of matmuls after the forward (reads the logits) until the deadline
  json_bomb      4: a maximal text message of ``[],[],...``
  huge_graph     4: the largest graph the limits admit (the user's memory budget counts
                    a parsed graph: ~87,000 nodes, ~8 MB of JSON)
  view_bomb      5: stride-0 views of a 256-byte resident, each the largest a request may hold
  unfinished     5: submits that declare the largest upload and never send it
  uploads        6: the largest upload, request after request
  auth_guess     7: connections with a wrong key (a 2-character prefix of a real one)
  padding        found: one 256-token row with one-token rows (right-padding)
  unread         found: requests with large results (the largest forward the limits admit),
                    on connections that never read
  ping_flood     found: websocket pings (control frames, never a message), as fast as TCP
                    takes them
  generate       found: the longest generations the model admits (8 rows, 240 new tokens)
  subnormals     found: a matrix product of subnormal floats (1e-40), each one op the deadline
                    cannot interrupt (on x86 CPUs subnormal arithmetic runs ~100x slower
                    than the flops budget prices it)
  slow_handshakes  found: TCP connections that never finish their websocket handshake, each
                    sending ~1 MiB of header lines (what websockets would parse) and then
                    nothing, as many as the server keeps open
  weights        found: every parameter of the model, transfer after transfer (read)
  cancels        found: cancels of requests that do not exist, as fast as TCP takes them
  model_info     found: the model's description with each set of TL hook switches, over
                    and over (~30 KB answered for each 80-byte request)
  unread_errors  found: malformed messages, each answered with an error, on connections
                    that never read their answers
  batched        found: a quarter of the largest forward, request after request, four in
                    flight on each of four connections: they co-batch into forwards as
                    large as the limits admit
  module_sites   found: the largest forward the limits admit, reading the last block's
                    output as an HF module site (the plain HF forward), request after
                    request
  one_op         found: the largest matrix product the server admits (random matrices made
                    on the server from a 4-byte constant; the side found by bisection on
                    the server's refusals): one op, which nothing interrupts once it runs;
                    one token of input, so the request looks light before validation

    .venv/bin/python bench/bench_fairness.py                  # every kind, 60 s each
    .venv/bin/python bench/bench_fairness.py --seconds 20 --kinds json_bomb,bad_ids
    .venv/bin/python bench/bench_fairness.py --seconds 20 --control   # and the control
    .venv/bin/python bench/bench_fairness.py --engine process         # model in its own process

``--control`` runs each kind's attack a second time against *another* server process on this
machine while the victim keeps using the first: what the attacker's load costs the victim when
a co-tenant's requests are served by the operating system's process scheduler instead of by
the shared server's -- on a small machine the attacker's client and its server take cores the
victim's client and server would use. ``shared p99 / control p99`` is the part of the slowdown
the shared server adds over that separation.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid

import psutil
import torch
from websockets.sync.client import connect

from hookwire.client import Connection
from hookwire.frames import encode_chunks, header_for
from hookwire.residents import content_id

MODEL = "tiny-gpt2"
VICTIM_KEY = "victim-key-0123456789abcdef"
ATTACKER_KEY = "attacker-key-0123456789abcdef"
MiB = 1 << 20
# A shared server's limits (everything else: hookwire.validate.Limits defaults).
LIMITS = dict(max_request_seconds=1.0, max_constant_bytes=64 * MiB,
              max_pending_bytes_per_user=128 * MiB, max_pending_bytes_total=256 * MiB,
              max_resident_bytes=64 * MiB, max_resident_bytes_total=256 * MiB,
              max_value_bytes=64 * MiB, max_total_value_bytes=256 * MiB,
              max_saved_bytes=64 * MiB, max_output_bytes=64 * MiB, submit_timeout_s=5.0,
              send_timeout_s=5.0, max_message_bytes=16 * MiB, max_forward_bytes=128 * MiB,
              max_node_seconds=0.05)
SITE = "blocks.1.hook_resid_post"
KINDS = ["shared_write", "bad_ids", "late_work", "json_bomb", "huge_graph", "view_bomb",
         "unfinished", "uploads", "auth_guess", "padding", "unread", "ping_flood", "generate",
         "subnormals", "slow_handshakes", "weights", "cancels", "model_info", "unread_errors",
         "one_op", "batched", "module_sites"]


# ---- the server process ------------------------------------------------------------------

def serve(engine: str = "embedded") -> None:
    import hookwire.server as hs
    from hookwire.server.heap import (collect_rarely, freeze_startup_heap, model_threads,
                                      return_freed_memory, switch_gil_often)
    from hookwire.validate import Limits

    return_freed_memory()  # as `hookwire serve` does, before any thread starts
    model_threads()  # as `hookwire serve` does by default
    switch_gil_often()  # as `hookwire serve` does

    handle = hs.start(models=[MODEL], port=0, api_keys=[VICTIM_KEY, ATTACKER_KEY],
                      limits=Limits(**LIMITS), engine=engine)
    freeze_startup_heap()  # as `hookwire serve` does (server/heap.py)
    collect_rarely()
    print("READY", handle.url, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    handle.stop()


# ---- the attacker process ----------------------------------------------------------------

def largest_forward_rows(seq: int) -> int:
    """The most rows of ``seq`` positions one forward may have under LIMITS."""
    from transformers import GPT2Config

    from hookwire.server.forward_memory import forward_activation_bytes
    from hookwire.server.models import BUILTIN_MODELS
    config = GPT2Config(**BUILTIN_MODELS[MODEL].config)  # MODEL is a GPT-2
    vocab = config.vocab_size
    rows = 1
    while forward_activation_bytes(config, rows + 1, seq, 4) + (rows + 1) * seq * vocab * 4 \
            <= LIMITS["max_forward_bytes"]:
        rows += 1
    return rows


def graph(nodes, sites=(), constants=(), saves=None, return_type="logits"):
    return {"model": MODEL, "inputs": {"input_ids": "input_ids"}, "constants": list(constants),
            "sites": [{"name": s} for s in sites], "nodes": nodes, "saves": saves or {},
            "forward": {"return_type": return_type}}


def write(site, op, arg):
    return graph([{"id": 0, "op": "site.read", "args": [0]},
                  {"id": 1, "op": op, "args": [{"ref": 0}, arg]},
                  {"id": 2, "op": "site.write", "args": [0, {"ref": 1}]}], sites=[site])


class Raw:
    """A raw protocol connection that sends without waiting and drains answers in a
    background thread (so its socket never fills)."""

    def __init__(self, url, key=ATTACKER_KEY, read=True):
        self.ws = connect(url, additional_headers={"Authorization": f"Bearer {key}"},
                          max_size=None, ping_interval=None, max_queue=None if read else 1,
                          open_timeout=60)
        self.ws.send(json.dumps({"type": "hello", "protocol": 1, "client_version": "bench"}))
        self.ws.recv(timeout=60)
        self.finals = threading.Semaphore(0)
        if read:
            threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self):
        try:
            while True:
                msg = self.ws.recv()
                if isinstance(msg, str) and ('"type":"done"' in msg or '"type":"error"' in msg):
                    self.finals.release()
        except Exception:
            self.finals.release()

    def submit(self, g, tensors, **extra):
        rid = "a" + uuid.uuid4().hex[:12]
        self.ws.send(json.dumps({"type": "submit", "request_id": rid, "graph": g,
                                 "tensors": [header_for(t, v).model_dump()
                                             for t, v in tensors.items()],
                                 "keep_results": False, **extra}))
        for tid, v in tensors.items():
            for frame in encode_chunks(rid, tid, v):
                self.ws.send(frame)
        return rid


def threads_until_done(loop, count: int, sent: list) -> None:
    """Run ``loop`` in ``count`` threads until each returns, then report what was sent."""
    threads = [threading.Thread(target=loop) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"sent": sent[0]}), flush=True)


def attack(kind: str, url: str, seconds: float) -> None:
    stop = time.monotonic() + seconds
    ids = torch.randint(0, 256, (1, 16))
    sent = [0]

    def pipelined(make, window=8 if kind == "padding" else 4):
        conn = Raw(url)
        inflight = 0
        while time.monotonic() < stop:
            while inflight >= window:
                conn.finals.acquire(timeout=5)
                inflight -= 1
            make(conn)
            sent[0] += 1
            inflight += 1

    def pipelined_guarded(work, window=None):
        while time.monotonic() < stop:
            try:
                pipelined(work, *([window] if window else []))
            except Exception:
                time.sleep(0.2)  # the server dropped us (e.g. a closing frame): reconnect

    if kind == "shared_write":
        g = write("pos_embed.hook_in", "flip", -1)
        work = lambda c: c.submit(g, {"input_ids": ids})  # noqa: E731
    elif kind == "bad_ids":
        g = write("embed.hook_in", "add", 100_000)
        work = lambda c: c.submit(g, {"input_ids": ids})  # noqa: E731
    elif kind == "late_work":
        c = torch.randn(512, 512) / 512 ** 0.5
        nodes = [{"id": 0, "op": "output.read", "args": ["logits"]},
                 {"id": 1, "op": "sum", "args": [{"ref": 0}]},
                 {"id": 2, "op": "mul", "args": [{"ref": 1}, 0.0]},
                 {"id": 3, "op": "add", "args": [{"const": "c"}, {"ref": 2}]}]
        nodes += [{"id": i, "op": "matmul", "args": [{"ref": i - 1}, {"const": "c"}]}
                  for i in range(4, 3000)]
        g = graph(nodes, constants=["c"], saves={"y": 2999}, return_type="logits")
        work = lambda conn: conn.submit(g, {"input_ids": ids, "c": c})  # noqa: E731
    elif kind == "json_bomb":
        bomb = "[" + ",".join(["[]"] * ((LIMITS["max_message_bytes"] - 16) // 3)) + "]"

        def work(conn):
            conn.ws.send(bomb)
    elif kind == "huge_graph":
        from hookwire.server.session import PARSED_BYTES_PER_CONTAINER
        from hookwire.validate import Limits
        # 6 arrays/objects a node; the message's parse is counted against the user's budget
        admitted = LIMITS["max_pending_bytes_per_user"] // PARSED_BYTES_PER_CONTAINER // 6
        nodes = [{"id": 0, "op": "site.read", "args": [0]}] + [
            {"id": i, "op": "getitem", "args": [{"ref": i - 1}, [{"slice": [None, None, None]},
                                                               -1]]}
            for i in range(1, min(Limits().max_nodes, admitted - 100))]
        g = graph(nodes, sites=[SITE], return_type=None)
        work = lambda conn: conn.submit(g, {"input_ids": ids})  # noqa: E731
    elif kind == "view_bomb":
        small = torch.arange(64, dtype=torch.float32)
        cid = content_id(small)
        n = LIMITS["max_constant_bytes"] // 4
        g = graph([{"id": 0, "op": "getitem", "args": [{"const": "v"}, n - 1]}],
                  constants=["v"], saves={"s": 0}, return_type=None)

        def work(conn):
            if not getattr(conn, "kept", False):
                conn.submit(graph([], return_type=None), {"input_ids": ids, "small": small},
                            keep={"small": cid})
                conn.kept = True
            conn.submit(g, {"input_ids": ids}, refs=[{"tid": "v", "resident": cid,
                                                      "dtype": "float32", "shape": [n],
                                                      "stride": [0], "offset": 0}])
    elif kind == "unfinished":
        n = LIMITS["max_constant_bytes"] // 8

        def work(conn):
            conn.ws.send(json.dumps({"type": "submit", "request_id": uuid.uuid4().hex,
                                     "graph": graph([]), "tensors": [
                                         {"tid": "input_ids", "dtype": "int64",
                                          "shape": [1, n]}]}))
            conn.finals.release()  # nothing will answer it until it times out
    elif kind == "uploads":
        big = torch.ones(LIMITS["max_constant_bytes"] // 4)
        g = graph([{"id": 0, "op": "sum", "args": [{"const": "big"}]}], constants=["big"],
                  saves={"s": 0}, return_type=None)
        work = lambda conn: conn.submit(g, {"input_ids": ids, "big": big})  # noqa: E731
    elif kind == "generate":
        # The longest generations the model admits (tiny-gpt2: 256 positions), 8 rows each.
        prompt = torch.randint(0, 256, (8, 16))
        g = graph([], return_type=None)
        spec = {"max_new_tokens": 240, "steps": []}
        work = lambda conn: conn.submit(g, {"input_ids": prompt}, generate=spec)  # noqa: E731
    elif kind == "ping_flood":
        # Empty pings, masked with a zero key as a client must: 6 bytes each, 10,000 a write.
        burst = (bytes([0x89, 0x80]) + bytes(4)) * 10_000

        def loop():
            while time.monotonic() < stop:
                try:
                    conn = Raw(url)  # (its reader drains the pongs)
                    while time.monotonic() < stop:
                        conn.ws.socket.sendall(burst)
                        sent[0] += 10_000
                except Exception:
                    time.sleep(0.2)
        return threads_until_done(loop, 4, sent)
    elif kind == "subnormals":
        tiny = torch.full((1024, 1024), 1e-40)  # (its products with normal numbers are
        w = torch.randn(1024, 1024)              # subnormal too: every step is slow)
        g = graph([{"id": 0, "op": "matmul", "args": [{"const": "t"}, {"const": "w"}]},
                   {"id": 1, "op": "sum", "args": [{"ref": 0}]}], constants=["t", "w"],
                  saves={"s": 1}, return_type=None)
        work = lambda conn: conn.submit(g, {"input_ids": ids, "t": tiny, "w": w})  # noqa: E731
    elif kind == "one_op":
        def product(side):
            return graph([{"id": 0, "op": "expand", "args": [{"const": "s"}, side, side]},
                          {"id": 1, "op": "randn_like", "args": [{"ref": 0}],
                           "kwargs": {"seed": 0}},
                          {"id": 2, "op": "matmul", "args": [{"ref": 1}, {"ref": 1}]},
                          {"id": 3, "op": "sum", "args": [{"ref": 2}]}], constants=["s"],
                         saves={"s": 3}, return_type=None)
        one = torch.zeros(1, 1)
        one_token = ids[:, :1]  # as light-looking as a request can be: one position
        # The largest product the server admits, as an attacker who read our code finds it:
        # bisect on its refusals, between 64 and the largest operands the byte limits allow
        # (the product counts a copy of each as its temporaries).
        probe = Raw(url, read=False)

        def admitted(side):
            probe.submit(product(side), {"input_ids": one_token, "s": one})
            while True:
                msg = probe.ws.recv(timeout=120)
                if isinstance(msg, str) and '"type":"done"' in msg:
                    return True
                if isinstance(msg, str) and '"type":"error"' in msg:
                    return False
        lo, hi = 64, math.isqrt(LIMITS["max_value_bytes"] // 8)
        if admitted(hi):
            lo = hi
        while hi - lo > 16:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if admitted(mid) else (lo, mid)
        probe.ws.close()
        print(json.dumps({"one_op_side": lo}), file=sys.stderr, flush=True)
        g = product(lo)
        work = lambda conn: conn.submit(g, {"input_ids": one_token, "s": one})  # noqa: E731
    elif kind == "slow_handshakes":
        import socket
        host, port = url.split("//", 1)[1].split("/", 1)[0].rsplit(":", 1)
        head = f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
        lines = [b"X-Pad-%03d: " % i + b"a" * 8000 + b"\r\n" for i in range(120)]

        def loop():  # up to 500 half-sent handshakes, each fed a header line per round
            held: list[list] = []  # [socket, lines sent]
            while time.monotonic() < stop:
                if len(held) < 500:
                    try:
                        s = socket.create_connection((host, int(port)), timeout=1)
                        s.sendall(head)
                        held.append([s, 0])
                        sent[0] += 1
                    except OSError:
                        time.sleep(0.01)
                for entry in list(held):
                    if entry[1] < len(lines):
                        try:
                            entry[0].sendall(lines[entry[1]])
                            entry[1] += 1
                        except OSError:  # the server dropped it: open another
                            entry[0].close()
                            held.remove(entry)
                if all(e[1] >= len(lines) for e in held) and len(held) >= 500:
                    time.sleep(0.05)
                    for entry in list(held):  # still open? (a closed one reads b"")
                        try:
                            entry[0].settimeout(0)
                            if entry[0].recv(1 << 16) == b"":
                                raise OSError
                        except BlockingIOError:
                            pass
                        except OSError:
                            entry[0].close()
                            held.remove(entry)
            for s, _ in held:
                s.close()
        return threads_until_done(loop, 4, sent)
    elif kind == "auth_guess":
        def loop():
            while time.monotonic() < stop:
                try:
                    Raw(url, key=ATTACKER_KEY[:2])
                except Exception:
                    sent[0] += 1
        return threads_until_done(loop, 4, sent)
    elif kind == "padding":
        long = torch.randint(0, 256, (1, 256))
        short = torch.randint(0, 256, (1, 1))
        g = graph([], return_type="logits")

        def work(conn):  # one long row, then seven one-token ones, again and again
            conn.count = getattr(conn, "count", -1) + 1
            conn.submit(g, {"input_ids": long if conn.count % 8 == 0 else short})
    elif kind == "weights":
        from hookwire.server.models import load_model
        names = [n for n, _ in load_model(MODEL).bridge.named_parameters()]

        def work(conn):  # every parameter of the model, one transfer at a time
            conn.ws.send(json.dumps({"type": "weights", "request_id": uuid.uuid4().hex,
                                     "model": MODEL, "names": names}))
        return threads_until_done(lambda: pipelined_guarded(work, 1), 4, sent)
    elif kind == "cancels":
        # Cancels of requests that do not exist: the smallest message that asks for work.
        burst = [json.dumps({"type": "cancel", "request_id": uuid.uuid4().hex})
                 for _ in range(1000)]

        def loop():
            while time.monotonic() < stop:
                try:
                    conn = Raw(url)
                    while time.monotonic() < stop:
                        for text in burst:
                            conn.ws.send(text)
                        sent[0] += len(burst)
                except Exception:
                    time.sleep(0.2)
        return threads_until_done(loop, 4, sent)
    elif kind == "model_info":
        flags = [[], ["use_attn_result"], ["use_split_qkv_input"], ["use_hook_mlp_in"],
                 ["use_attn_in"], ["use_attn_result", "use_hook_mlp_in"]]

        def work(conn):  # descriptions of the model with every hook switch, over and over
            conn.count = getattr(conn, "count", -1) + 1
            conn.ws.send(json.dumps({"type": "model_info", "model": MODEL,
                                     "tl_flags": flags[conn.count % len(flags)]}))
            conn.finals.release()  # (answers carry no request id: do not wait for them)
    elif kind == "unread_errors":
        # Malformed messages (each answered with an error) on connections that never read.
        burst = ['{"type":"cancel"}'] * 1000

        def loop():
            while time.monotonic() < stop:
                try:
                    conn = Raw(url, read=False)
                    while time.monotonic() < stop:
                        for text in burst:
                            conn.ws.send(text)
                        sent[0] += len(burst)
                except Exception:
                    time.sleep(0.2)  # dropped for not reading: come back
        return threads_until_done(loop, 4, sent)
    elif kind == "batched":
        # A quarter of the largest forward each: four of them co-batch into one forward.
        tokens = torch.randint(0, 256, (max(1, largest_forward_rows(256) // 4), 256))
        g = graph([], return_type=None)
        work = lambda conn: conn.submit(g, {"input_ids": tokens})  # noqa: E731
    elif kind == "module_sites":
        # The largest forward, reading an HF module site: the plain HF forward, run to its
        # last block (the forward stops after the last site a graph reads).
        from transformers import GPT2Config

        from hookwire.server.models import BUILTIN_MODELS
        last = GPT2Config(**BUILTIN_MODELS[MODEL].config).n_layer - 1
        tokens = torch.randint(0, 256, (largest_forward_rows(256), 256))
        g = graph([{"id": 0, "op": "site.read", "args": [0]},
                   {"id": 1, "op": "sum", "args": [{"ref": 0}]}],
                  sites=[f"hf:transformer.h.{last}:output"], saves={"s": 1}, return_type=None)
        work = lambda conn: conn.submit(g, {"input_ids": tokens})  # noqa: E731
    elif kind == "unread":
        tokens = torch.randint(0, 256, (largest_forward_rows(256), 256))
        g = graph([{"id": 0, "op": "site.read", "args": [0]}], sites=[SITE],
                  saves={"x": 0}, return_type="logits")

        def loop():
            while time.monotonic() < stop:
                try:
                    conn = Raw(url, read=False)
                    while time.monotonic() < stop:
                        conn.submit(g, {"input_ids": tokens})
                        sent[0] += 1
                        time.sleep(0.05)
                except Exception:
                    time.sleep(0.2)  # dropped for not reading: come back
        return threads_until_done(loop, 2, sent)
    else:
        raise SystemExit(f"unknown kind {kind}")

    threads_until_done(lambda: pipelined_guarded(work), 4, sent)


# ---- the victim (this process) -----------------------------------------------------------

VICTIM_GRAPH = graph([{"id": 0, "op": "site.read", "args": [0]}], sites=[SITE],
                     saves={"x": 0}, return_type="logits")
VICTIM_IDS = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))


def victim(url, seconds, reference):
    conn = Connection(url, api_key=VICTIM_KEY)
    conn.use_residents = False
    lat, wrong, failed = [], 0, []
    victim.timings = []  # the server's timings of each answered request, with its latency
    stop = time.monotonic() + seconds
    try:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                result = conn.run(VICTIM_GRAPH, {"input_ids": VICTIM_IDS})
                out = result.values
                victim.timings.append((time.perf_counter() - t0, result.timings))
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                if conn.broken:
                    conn = Connection(url, api_key=VICTIM_KEY)
                continue
            lat.append(time.perf_counter() - t0)
            if reference is not None and not all(
                    torch.allclose(out[k], reference[k], rtol=1e-5, atol=1e-6)
                    for k in reference):
                wrong += 1
            elif reference is None:
                reference = out
    finally:
        conn.close()
    return lat, wrong, failed, reference


class RssSampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.proc, self.samples, self.running = psutil.Process(pid), [], True

    def run(self):
        while self.running:
            try:  # the server and its model processes (the process engine), together
                procs = [self.proc] + self.proc.children(recursive=True)
                self.samples.append(sum(p.memory_info().rss for p in procs))
            except psutil.Error:
                return
            time.sleep(0.02)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] if xs else float("nan")


def start_server(me: str, engine: str = "embedded") -> tuple[subprocess.Popen, str]:
    """A fresh server process (``--serve``) and its URL."""
    server = subprocess.Popen([sys.executable, me, "--serve", "--engine", engine],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    if not line.startswith("READY"):
        stop_server(server)
        raise RuntimeError(f"server did not start: {line!r}")
    return server, line.split()[1]


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.stdin.close()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def under_attack(me: str, kind: str, seconds: float, victim_url: str, attack_url: str,
                 reference, sampler: RssSampler) -> dict:
    """The victim's requests to ``victim_url`` while the attacker sends ``kind`` to
    ``attack_url`` (the same server, or -- the control -- another one on this machine)."""
    attacker = subprocess.Popen([sys.executable, me, "--attack", kind, "--url", attack_url,
                                 "--seconds", str(seconds)], stdout=subprocess.PIPE, text=True)
    try:
        settle = min(2.0, seconds / 10)
        time.sleep(settle)  # the attack is under way
        sampler.samples.clear()
        lat, wrong, failed, _ = victim(victim_url, seconds - 2 * settle, reference)
        peak = max(sampler.samples)
        out = attacker.communicate(timeout=seconds + 120)[0]
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    sent = json.loads(out.strip().splitlines()[-1])["sent"] if out.strip() else 0
    return {"lat": lat, "wrong": wrong, "failed": failed, "peak": peak, "sent": sent,
            "timings": list(victim.timings)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0, help="attack length per kind")
    ap.add_argument("--idle-seconds", type=float, default=15.0, help="idle phase per kind")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--control", action="store_true",
                    help="per kind, also run the attack against a second server on this "
                         "machine while the victim uses the first: what the machine itself "
                         "(the attacker's client, a core taken) costs the victim")
    ap.add_argument("--engine", default="embedded", choices=["embedded", "process"],
                    help="the server's engine: the model in the front's process (embedded, "
                         "the default) or in a process of its own (process)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--attack", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if args.serve:
        serve(args.engine)
        return 0
    torch.set_num_threads(1)  # clients: one thread each (bench/README)
    if args.attack:
        attack(args.attack, args.url, args.seconds)
        return 0
    me = os.path.abspath(__file__)
    rows, code = [], 0
    for kind in args.kinds.split(","):
        # A fresh server per kind: what one attack leaves in the allocator does not count
        # against the next, and each kind has its own idle figures.
        server, url = start_server(me, args.engine)
        other = None
        try:
            victim(url, 3.0, None)  # warm up
            sampler = RssSampler(server.pid)
            sampler.start()
            lat, wrong, failed, reference = victim(url, args.idle_seconds, None)
            idle = {"p50": statistics.median(lat), "p99": pct(lat, 0.99),
                    "rss": statistics.median(sampler.samples), "n": len(lat)}
            control = None
            if args.control:
                other, other_url = start_server(me, args.engine)
                control = under_attack(me, kind, args.seconds, url, other_url, reference,
                                       sampler)
                stop_server(other)
                other = None
            attacked = under_attack(me, kind, args.seconds, url, url, reference, sampler)
            sampler.running = False
        finally:
            for proc in (other, server):
                if proc is not None:
                    stop_server(proc)
        lat, wrong, failed = attacked["lat"], attacked["wrong"], attacked["failed"]
        sent, peak = attacked["sent"], attacked["peak"]
        row = {"kind": kind, "attacker_messages": sent, "victim_requests": len(lat),
               "idle_p50_ms": idle["p50"] * 1e3, "idle_p99_ms": idle["p99"] * 1e3,
               "idle_rss_mib": idle["rss"] / MiB,
               "p50_ms": statistics.median(lat) * 1e3 if lat else None,
               "p99_ms": pct(lat, 0.99) * 1e3 if lat else None,
               "p50_x": statistics.median(lat) / idle["p50"] if lat else None,
               "p99_x": pct(lat, 0.99) / idle["p99"] if lat else None,
               "peak_rss_mib": peak / MiB, "rss_x": peak / idle["rss"],
               "wrong": wrong, "failed": len(failed), "failures": failed[:3]}
        if control is not None and control["lat"]:
            c_lat = control["lat"]
            row["control"] = {"attacker_messages": control["sent"],
                              "victim_requests": len(c_lat),
                              "p50_ms": statistics.median(c_lat) * 1e3,
                              "p99_ms": pct(c_lat, 0.99) * 1e3,
                              "p99_x": pct(c_lat, 0.99) / idle["p99"],
                              "wrong": control["wrong"], "failed": len(control["failed"])}
            row["p99_over_control"] = row["p99_ms"] / row["control"]["p99_ms"] \
                if lat else None
        rows.append(row)
        ok = row["p99_x"] is not None and row["p99_x"] <= 2 and row["rss_x"] <= 1.5 and \
            not wrong and not failed
        code |= 0 if ok else 1
        print(f"{kind:13s} attacker sent {sent:6d} | victim {len(lat):5d} requests, "
              f"p50 {row['p50_ms'] or float('nan'):6.1f} ms ({row['p50_x'] or 0:4.2f}x idle "
              f"{row['idle_p50_ms']:.1f}) p99 {row['p99_ms'] or float('nan'):6.1f} ms "
              f"({row['p99_x'] or 0:4.2f}x idle {row['idle_p99_ms']:.1f}) | server peak RSS "
              f"{row['peak_rss_mib']:5.0f} MiB ({row['rss_x']:4.2f}x idle "
              f"{row['idle_rss_mib']:.0f}) | wrong {wrong} failed {len(failed)} "
              f"{'ok' if ok else 'OVER GOAL'}", flush=True)
        if "control" in row:
            c = row["control"]
            print(f"    control (attack on another server): attacker sent "
                  f"{c['attacker_messages']:6d} | victim p50 {c['p50_ms']:6.1f} ms p99 "
                  f"{c['p99_ms']:6.1f} ms ({c['p99_x']:4.2f}x idle) | shared p99 / control "
                  f"p99 {row['p99_over_control'] or float('nan'):4.2f}x | wrong {c['wrong']} "
                  f"failed {c['failed']}", flush=True)
        for failure in row["failures"]:
            print(f"    failed: {failure}", flush=True)
        # Where the slowest 1% of the victim's requests spent their time, by the server's own
        # timings: waiting in the queue, validating, executing, and the rest (messages,
        # parsing, admission, the client).
        timings = attacked["timings"]
        slow = sorted(timings, key=lambda lt: lt[0])[-max(1, len(timings) // 100):]
        if slow:
            parts = {k: statistics.median(t.get(k, 0.0) for _, t in slow) * 1e3
                     for k in ("queued_s", "validate_s", "execute_s")}
            rest = statistics.median(lat_ - sum(t.get(k, 0.0) for k in parts)
                                     for lat_, t in slow) * 1e3
            row["slowest_1pct_ms"] = {**parts, "rest": rest}
            print("    slowest 1%: " + ", ".join(f"{k} {v:.1f} ms" for k, v in
                                                    row["slowest_1pct_ms"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"limits": LIMITS, "seconds": args.seconds,
                       "idle_seconds": args.idle_seconds, "control": args.control,
                       "engine": args.engine, "rows": rows}, f, indent=2)
    return code


if __name__ == "__main__":
    sys.exit(main())
