"""Ctrl-C: a real SIGINT to a client process in the middle of a long remote forward. The
client exits at once (it drops the socket instead of waiting for a closing handshake behind
results nobody reads), and the server stops that forward at the next block boundary -- also
a forward with no hooks, which has no sites at which to notice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import json

import pytest
import torch
from graphs import read_graph

import hookwire.server as hs
import hookwire.transformerlens as htl
from hookwire.client import Connection
from hookwire.frames import encode_chunks, header_for
from hookwire.families import build_hf_model
from hookwire.server.models import wrap_in_bridge
from hookwire.tokenizer import byte_level_tokenizer

# Slow on a CPU on purpose: a forward of 8 x 1024 tokens through 24 blocks takes many
# seconds, so a SIGINT one second in lands mid-forward.
SLOW = dict(n_layer=24, n_embd=256, n_head=4, n_positions=1024, vocab_size=257,
            bos_token_id=256, eos_token_id=256)

CLIENT = textwrap.dedent("""
    import sys, time, torch
    import hookwire.transformerlens as htl
    model = htl.RemoteModel("slow-gpt2", url=sys.argv[1])
    tokens = torch.randint(0, 256, (8, 1024), generator=torch.Generator().manual_seed(0))
    hooks = [] if sys.argv[2] == "none" else [("blocks.0.hook_resid_post",
                                               lambda act, hook: act * 1.0)]
    print("calling", flush=True)
    try:
        model.run_with_hooks(tokens, fwd_hooks=hooks, return_type="logits")
    except KeyboardInterrupt:
        print(f"interrupted {time.time():.3f}", flush=True)
        raise
    print("finished", flush=True)
""")


@pytest.fixture(scope="module")
def slow_server():
    hf_model, cfg = build_hf_model("GPT2LMHeadModel", SLOW, seed=0)
    bridge = wrap_in_bridge(hf_model, "GPT2LMHeadModel", cfg, byte_level_tokenizer(bos_id=256),
                            "slow-gpt2")
    srv = hs.start(models={"slow-gpt2": bridge}, port=0)
    # Records every forward that reaches the last block (only observes, changes nothing).
    srv.last_block_runs = []
    handle = bridge.blocks[-1].register_forward_hook(
        lambda module, args, output: srv.last_block_runs.append(time.monotonic()))
    yield srv
    handle.remove()
    srv.stop()


def _sigint_default():
    # A process started from a shell without job control inherits SIGINT ignored; Python
    # then installs no KeyboardInterrupt handler. A user's terminal delivers it: so here.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("hooks", ["none", "one"])
def test_ctrl_c_stops_client_and_server(slow_server, tmp_path, hooks):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), slow_server.url, hooks],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_sigint_default)
    runs_before = len(slow_server.last_block_runs)
    try:
        assert proc.stdout.readline().strip() == "calling"
        worker = slow_server.server.worker
        deadline = time.monotonic() + 60
        while not worker.current and time.monotonic() < deadline:  # the forward has begun
            time.sleep(0.05)
        assert worker.current, "the request never started on the server"
        time.sleep(1.0)
        stopped = []

        def watch():  # when the server's worker lets go of the request
            while worker.current:
                time.sleep(0.01)
            stopped.append(time.monotonic())
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        sent, sent_wall = time.monotonic(), time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        client_exit = time.monotonic() - sent
        watcher.join(60)
        server_stop = stopped[0] - sent
        caught = float(out.split("interrupted ")[1].split()[0]) - sent_wall \
            if "interrupted " in out else None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "finished" not in out  # interrupted, not run to the end
    assert "KeyboardInterrupt" in err and caught is not None, err[-2000:]
    assert not worker.current
    # The server stopped *that forward* part-way: it never reached the model's last block.
    assert len(slow_server.last_block_runs) == runs_before
    print(f"hooks={hooks}: KeyboardInterrupt raised {caught:.3f} s, client process exited "
          f"{client_exit:.2f} s, server's forward stopped {server_stop:.2f} s after SIGINT")


def test_a_local_forward_beside_a_served_one_is_untouched(slow_server):
    """The embedded server hosts the caller's own object: while a request runs on it, the
    same object used locally on another thread must run without the request's site hooks
    and without its stop-between-blocks check (a closed connection made every block of a
    local forward raise the other request's Cancelled before), and without racing it: TL
    keeps per-call state on the bridge's modules, so a local forward waits at its first
    block for the served one (server/local_calls.py); before, it could come back with the served request's batch
    of 4 rows."""
    bridge = slow_server.server.worker.models["slow-gpt2"].hosted.bridge
    small = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = bridge(small)
    big = torch.randint(0, 256, (4, 512), generator=torch.Generator().manual_seed(2))
    graph_hooks = [(f"blocks.{i}.hook_resid_post", lambda act, hook: act * 2.0)
                   for i in range(SLOW["n_layer"])]
    model = htl.RemoteModel("slow-gpt2", url=slow_server.url)
    pending = model.run_with_hooks(big, fwd_hooks=graph_hooks, blocking=False)
    worker = slow_server.server.worker
    deadline = time.monotonic() + 60
    while not worker.current and time.monotonic() < deadline:
        time.sleep(0.005)
    started_beside = 0
    while worker.current:  # local forwards started while the server's forward runs
        started_beside += bool(worker.current)
        with torch.no_grad():
            local = bridge(small)
        torch.testing.assert_close(local, reference, rtol=0, atol=0)
    remote = pending.result()
    assert started_beside, "no local forward started while the served one ran"
    expected = bridge.run_with_hooks(big, fwd_hooks=graph_hooks)
    torch.testing.assert_close(remote, expected)
    # And once its client is gone, the served forward's stop check (raising the request's
    # Cancelled at the next block) stays on the server's thread.
    conn = Connection(slow_server.url)
    rid = "leaving-beside"
    conn.ws.send(json.dumps({"type": "submit", "request_id": rid,
                             "graph": read_graph("slow-gpt2", [("blocks.0.hook_resid_post", 0)]),
                             "tensors": [header_for("input_ids", big).model_dump()]}))
    for frame in encode_chunks(rid, "input_ids", big):
        conn.ws.send(frame)
    deadline = time.monotonic() + 60
    while not worker.current and time.monotonic() < deadline:
        time.sleep(0.005)
    conn.ws.close()
    while worker.current:
        with torch.no_grad():
            torch.testing.assert_close(bridge(small), reference, rtol=0, atol=0)


def test_a_local_forward_waits_while_the_server_runs_the_model():
    """While the worker holds the model (as during a served forward), a local call of the
    hosted object waits, then returns its own result; once the server stops, the object is
    left with no hook of ours."""
    hf_model, cfg = build_hf_model("GPT2LMHeadModel", dict(SLOW, n_layer=2, n_embd=64),
                                   seed=0)
    bridge = wrap_in_bridge(hf_model, "GPT2LMHeadModel", cfg,
                            byte_level_tokenizer(bos_id=256), "small-gpt2")
    small = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = bridge(small)
    def hooks_of(bridge):
        return [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in bridge.modules()]

    hooks_before = hooks_of(bridge)
    srv = hs.start(models={"small-gpt2": bridge}, port=0)
    try:
        results: list = []

        def local_forward():
            with torch.no_grad():
                results.append(bridge(small))

        worker = srv.server.worker
        with worker.model_lock:  # what the worker holds while it runs a batch
            local = threading.Thread(target=local_forward)
            local.start()
            local.join(0.5)
            assert local.is_alive() and not results, \
                "a local forward ran while the server held the model"
        local.join(60)
        assert not local.is_alive()
        torch.testing.assert_close(results[0], reference, rtol=0, atol=0)
        # The worker's own thread may call the object while holding the lock (an RLock).
        remote = htl.RemoteModel("small-gpt2", url=srv.url)
        torch.testing.assert_close(remote(small), reference)
    finally:
        srv.stop()
    assert hooks_of(bridge) == hooks_before
