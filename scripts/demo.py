"""The end-to-end demo (``scripts/demo.sh`` runs it): start ``hookwire serve`` on a built-in
model as a child process, run one TransformerLens hook example on it (``remote=True``) and
the same example locally on the same model, print both and check they match, stop the
server by its PID.

It lives here, above the package's layers, because it needs both sides: the server command
(``hookwire.server``) and the TransformerLens client (``hookwire.transformerlens``), which
the dependency rule keeps apart (tests/test_dependency_rule.py).

    .venv/bin/python scripts/demo.py [--model tiny-llama] [--quiet-server]
"""
from __future__ import annotations

import argparse
import os
import queue
import signal
import subprocess
import sys
import threading
import time

from hookwire.server.cli import READY_RE

DEFAULT_DEMO_MODEL = "tiny-gpt2"
DEMO_READY_TIMEOUT_S = 120.0


def _err(*parts) -> None:
    print("hookwire demo:", *parts, file=sys.stderr, flush=True)


class ServerProcess:
    """``hookwire serve`` as a child process; always stopped by its PID."""

    def __init__(self, model: str, echo: bool = True):
        self.model = model
        self.echo = echo
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.output: list[str] = []  # everything the server printed, for error reports
        self.url: str | None = None

    def start(self, timeout: float = DEMO_READY_TIMEOUT_S) -> str:
        cmd = [sys.executable, "-m", "hookwire", "serve", "--model", self.model,
               "--host", "127.0.0.1", "--port", "0"]  # port 0: the OS picks a free port
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
        print(f"[demo] started `hookwire serve --model {self.model}` (pid {self.proc.pid})",
              flush=True)
        threading.Thread(target=self._pump, name="hookwire-demo-server-output",
                         daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"the server did not report listening within {timeout:.0f} s"
                                   f"{self._output_note()}")
            try:
                line = self.lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:  # end of its output: the server exited (or closed stdout)
                try:
                    code = self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    code = "?"
                raise RuntimeError(f"the server exited with code {code} before listening"
                                   f"{self._output_note()}")
            m = READY_RE.match(line)
            if m:
                self.url = m.group("url")
                return self.url

    def _pump(self) -> None:
        # Keep draining the child's output for its whole life, so it never blocks on a pipe.
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if self.echo:
                print(f"[server] {line}", flush=True)
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _output_note(self) -> str:
        if self.echo:
            return " (its output is above)"
        return "; its output:\n" + "\n".join("  " + line for line in self.output[-20:])

    def stop(self, timeout: float = 30) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _err(f"server pid {proc.pid} did not stop in {timeout:.0f} s; killing it")
            proc.kill()
            proc.wait(timeout)
        print(f"[demo] server pid {proc.pid} stopped (exit code {proc.returncode})", flush=True)


def demo_hooks(n_layers: int, head: int = 1):
    """The example: ablate one head in layer 0 in place, and cache every resid_post."""
    cache: dict = {}

    def ablate_head(z, hook):
        z[:, :, head, :] = 0.0  # in place, no return: TL keeps the edited activation

    def store(act, hook):
        cache[hook.name] = act.detach()

    fwd_hooks = [("blocks.0.attn.hook_z", ablate_head),
                 (lambda name: name.endswith("hook_resid_post"), store)]
    return fwd_hooks, cache


def _fmt(t, n: int = 5) -> str:
    return "[" + ", ".join(f"{v:+.5f}" for v in t.flatten()[:n].tolist()) + ", ...]"


def run_demo_comparison(url: str, model_name: str) -> bool:
    import torch

    import hookwire
    import hookwire.transformerlens as htl
    from hookwire.client import close_connections
    from hookwire.server.models import load_model

    rtol, atol = 1e-5, 1e-6
    prompt = "hookwire runs your TransformerLens hooks on a shared model."
    try:
        hookwire.configure(url=url)
        remote_model = htl.RemoteModel(model_name)  # weightless stand-in: nothing downloaded
        tokens = remote_model.to_tokens(prompt)
        n_layers = remote_model.cfg.n_layers
        print(f"[demo] prompt {prompt!r} -> tokens of shape {tuple(tokens.shape)}", flush=True)

        hooks, remote_cache = demo_hooks(n_layers)
        remote_logits = remote_model.run_with_hooks(tokens, fwd_hooks=hooks, remote=True)

        local = load_model(model_name).bridge  # same config, same seed, same weights
        hooks, local_cache = demo_hooks(n_layers)
        local_logits = local.run_with_hooks(tokens, fwd_hooks=hooks)
        plain_logits = local(tokens)  # no hooks: shows the ablation changed something
    finally:
        close_connections()

    print(f"\nhooks: blocks.0.attn.hook_z head 1 set to 0 in place; "
          f"cache[hook.name] = act for every hook_resid_post ({n_layers} layers)\n"
          "(on a TL 4 bridge hook.name is the canonical name: blocks.N.hook_resid_post is "
          "blocks.N.hook_out)\n", flush=True)
    for label, logits, cache in (("remote", remote_logits, remote_cache),
                                 ("local ", local_logits, local_cache)):
        print(f"{label} logits {tuple(logits.shape)} [0, -1, :5] = {_fmt(logits[0, -1])}")
        for name, act in cache.items():
            print(f"{label} cache[{name!r}] norm = {act.norm().item():.6f}")
    print(f"ablation moved the local logits by max |diff| = "
          f"{(local_logits - plain_logits).abs().max().item():.5f}")

    checks = {
        "logits": torch.allclose(remote_logits, local_logits, rtol=rtol, atol=atol),
        "cache keys": list(remote_cache) == list(local_cache) and len(remote_cache) == n_layers,
    }
    if checks["cache keys"]:
        checks["cache values"] = all(
            isinstance(remote_cache[k], torch.Tensor)
            and torch.allclose(remote_cache[k], local_cache[k], rtol=rtol, atol=atol)
            for k in local_cache)
    max_diff = (remote_logits - local_logits).abs().max().item()
    ok = all(checks.values())
    print(f"\nremote vs local (torch.allclose rtol={rtol}, atol={atol}): "
          + ", ".join(f"{k} {'match' if v else 'DIFFER'}" for k, v in checks.items())
          + f"; max |logits diff| = {max_diff:.3g}")
    print("MATCH: remote run equals local run" if ok else "MISMATCH: remote run differs",
          flush=True)
    return ok


def run(args) -> int:
    def on_sigterm(signum, frame):  # run the finally blocks (stop the server) on SIGTERM too
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    server = ServerProcess(args.model, echo=not args.quiet_server)
    try:
        try:
            url = server.start(timeout=args.timeout)
        except RuntimeError as exc:
            _err(str(exc))
            return 1
        print(f"[demo] server is listening at {url}", flush=True)
        return 0 if run_demo_comparison(url, args.model) else 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="demo.py", description="Start a server, run a TL hook example remotely and "
                                    "locally, check they match, stop the server.")
    p.add_argument("--model", default=DEFAULT_DEMO_MODEL,
                   help=f"built-in model name (default {DEFAULT_DEMO_MODEL})")
    p.add_argument("--timeout", type=float, default=DEMO_READY_TIMEOUT_S,
                   help="seconds to wait for the server to listen (default 120)")
    p.add_argument("--quiet-server", action="store_true", help="do not echo the server's output")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
