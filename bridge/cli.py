"""The ``hookwire`` command: ``serve``, ``demo``, ``status``, ``schema``.

argparse (stdlib) rather than typer/click on purpose: the command line is small, and the core
package should not take an extra dependency for it.

Heavy imports (torch, transformers, TransformerLens) happen inside the subcommands, so
``hookwire --help``, ``status`` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
READY_PREFIX = "hookwire serving "
READY_RE = re.compile(r"^hookwire serving (?P<models>\S+) on (?P<url>ws://\S+)\s*$")
DEFAULT_DEMO_MODEL = "tiny-gpt2"
DEMO_READY_TIMEOUT_S = 120.0


def _err(*parts) -> None:
    print("hookwire:", *parts, file=sys.stderr, flush=True)


def _ws_url(host: str, port: int) -> str:
    return f"ws://[{host}]:{port}" if ":" in host else f"ws://{host}:{port}"


# ---- serve ------------------------------------------------------------------------------------

def read_api_keys(path: str) -> list[str]:
    """One key per line -- the whole line, surrounding whitespace stripped, so a key may hold
    any character, ``#`` included -- or ``sha256:<hex>`` of a key (the file then holds no
    secret). Blank lines, and lines whose first non-blank character is ``#``, are ignored."""
    keys = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return keys


class _AnnounceWhenListening(threading.Event):
    """``serve_async`` sets its ``ready`` event once the socket listens: print the line
    scripts (and ``hookwire demo``) wait for at exactly that moment."""

    def __init__(self, line_for):
        super().__init__()
        self._line_for = line_for

    def set(self):
        print(self._line_for(), flush=True)
        super().set()


def cmd_serve(args) -> int:
    api_keys = None
    if args.api_key_file:
        try:
            api_keys = read_api_keys(args.api_key_file)
        except OSError as exc:
            _err(f"cannot read --api-key-file {args.api_key_file!r}: {exc}")
            return 2
        if not api_keys:
            # An empty key list would mean "no authentication" to the server: refuse instead.
            _err(f"--api-key-file {args.api_key_file!r} holds no key (one key per line; a "
                 "line starting with '#' is a comment)")
            return 2
        from hookwire.server.app import check_api_keys
        try:
            check_api_keys(api_keys)
        except ValueError as exc:
            _err(f"--api-key-file {args.api_key_file!r}: {exc}")
            return 2
    elif args.host not in LOOPBACK_HOSTS:
        _err(f"refusing to bind to {args.host!r}: no --api-key-file was given, so the server "
             f"only binds to loopback ({', '.join(LOOPBACK_HOSTS)}). Pass --api-key-file F "
             "to serve on other interfaces.")
        return 2

    import asyncio
    import logging

    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from hookwire.server.app import HookwireServer
    from hookwire.validate import Limits

    limits = Limits(max_request_seconds=args.max_request_seconds,
                    max_weight_bytes=args.max_weight_bytes)
    try:
        device_map = _device_map(args.device_map)
        # A Ray replica resolves the device itself (it sees the GPUs Ray gave it).
        device = _device(args.device, device_map) if args.engine != "ray" else None
    except ValueError as exc:
        _err(str(exc))
        return 2
    if args.engine == "ray":
        engine = _ray_engine(args, limits, device_map)
        if engine is None:
            return 2
        hosted = {}
    else:
        engine = None
        hosted = _load_models(args.model, device_map, args.dtype, device)
        if hosted is None:
            return 2
    if api_keys is None:
        print("hookwire: no --api-key-file given: no authentication, so the server only binds "
              "to loopback", file=sys.stderr, flush=True)

    server = HookwireServer(hosted, host=args.host, port=args.port, api_keys=api_keys,
                            limits=limits, batching=not args.no_batching,
                            batch_window_s=args.batch_window_ms / 1000, engine=engine)
    hosted = server.entries
    ready = _AnnounceWhenListening(
        lambda: f"{READY_PREFIX}{','.join(hosted)} on {_ws_url(args.host, server.port)}")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(signum: int) -> None:
            print(f"hookwire: {signal.Signals(signum).name} received, stopping",
                  file=sys.stderr, flush=True)
            stop.set()
            # A second signal takes the default action (force quit) if shutdown hangs.
            for s in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(s)

        for s in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(s, on_signal, s)
        await server.serve_async(ready=ready, stop=stop)

    try:
        asyncio.run(main())
    except OSError as exc:  # e.g. the port is taken
        _err(f"cannot serve on {args.host}:{args.port}: {exc}")
        return 1
    except KeyboardInterrupt:  # second Ctrl-C during shutdown
        _err("interrupted during shutdown")
        return 130
    finally:
        if engine is not None:  # the Ray deployments go too (already gone after a clean stop)
            engine.close()
    print("hookwire: server stopped", file=sys.stderr, flush=True)
    return 0


def _device_map(text: str | None):
    """--device-map: "auto", "balanced", "balanced_low_0", "sequential", or a JSON object
    {module prefix: device} (the user's own command line, read as plain JSON)."""
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict) or not all(isinstance(v, (str, int)) for v in value.values()):
        raise ValueError(f"--device-map {text!r}: use auto, balanced, sequential or a JSON "
                         'object like {"transformer.h.0": 0, "transformer.h.1": 1}')
    return value


def _device(text: str, device_map) -> str | None:
    """--device: checked here (a clear message for a typo or a missing GPU); "auto" defers to
    --device-map when one is given."""
    if device_map is not None:
        if text != "auto":
            raise ValueError("--device and --device-map exclude each other: the map says "
                             "where each part of the model goes")
        return None
    from hookwire.server.devices import parse_device

    return str(parse_device(text))


def _load_models(specs: list[str], device_map, dtype: str = "auto",
                 device: str | None = None) -> dict | None:
    from hookwire.server.models import load_model

    hosted = {}
    for spec in specs:
        print(f"hookwire: loading model {spec} ({dtype}, {device or device_map}) ...",
              file=sys.stderr, flush=True)
        try:
            h = load_model(spec, device_map=device_map, dtype=dtype, device=device)
        except Exception as exc:
            _err(f"cannot load model {spec!r}: {type(exc).__name__}: {exc}")
            return None
        if h.name in hosted:
            _err(f"two --model arguments are both named {h.name!r}")
            return None
        hosted[h.name] = h
    return hosted


def _replica_device(text: str, device_map) -> str | None:
    """A Ray replica resolves the device ("auto" included) itself: it sees the GPUs Ray gave
    it, not this node's."""
    if device_map is not None and text != "auto":
        raise ValueError("--device and --device-map exclude each other")
    return None if device_map is not None else text


def _ray_engine(args, limits, device_map):
    try:
        from hookwire.server.ray_engine import RayEngine
    except ImportError as exc:
        _err(f"--engine ray needs Ray Serve: pip install 'hookwire[ray]' ({exc})")
        return None
    print(f"hookwire: deploying {', '.join(args.model)} on Ray Serve ({args.replicas} "
          f"replica(s) each) ...", file=sys.stderr, flush=True)
    try:
        return RayEngine(args.model, replicas=args.replicas, limits=limits,
                         batching=not args.no_batching, window_s=args.batch_window_ms / 1000,
                         address=args.ray_address, num_cpus_per_replica=args.cpus_per_replica,
                         num_gpus_per_replica=args.gpus_per_replica, device_map=device_map,
                         dtype=args.dtype, device=_replica_device(args.device, device_map))
    except Exception as exc:
        _err(f"cannot deploy on Ray: {type(exc).__name__}: {exc}")
        return None


# ---- demo -------------------------------------------------------------------------------------

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


def cmd_demo(args) -> int:
    def on_sigterm(signum, frame):  # run the finally blocks (stop the server) on SIGTERM too
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    server = ServerProcess(args.model, echo=not args.quiet_server)
    try:
        try:
            url = server.start(timeout=args.timeout)
        except RuntimeError as exc:
            _err(f"demo: {exc}")
            return 1
        print(f"[demo] server is listening at {url}", flush=True)
        return 0 if run_demo_comparison(url, args.model) else 1
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)


# ---- status / schema --------------------------------------------------------------------------

def health_url(url: str) -> str:
    if "://" not in url:
        url = "ws://" + url
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"not a ws://, wss://, http:// or https:// URL: {url!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/health", "", ""))


def cmd_status(args) -> int:
    url = args.url or os.environ.get("HOOKWIRE_URL") or "ws://127.0.0.1:8765"
    try:
        target = health_url(url)
    except ValueError as exc:
        _err(str(exc))
        return 2
    try:
        with urllib.request.urlopen(target, timeout=args.timeout) as resp:
            body = json.loads(resp.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        _err(f"no healthy hookwire server at {target}: {exc}")
        return 1
    print(json.dumps(body, indent=2))
    return 0


def cmd_schema(args) -> int:
    from hookwire.graph import graph_json_schema
    from hookwire.protocol import protocol_json_schema

    makers = {"graph": graph_json_schema, "protocol": protocol_json_schema}
    wanted = list(makers) if args.which == "all" else [args.which]
    schemas = {}
    for name in wanted:
        try:
            schemas[name] = makers[name]()
        except Exception as exc:  # a bug in the schema export: say which one, no traceback
            _err(f"cannot export the {name} schema: {type(exc).__name__}: {exc}")
            return 1
    print(json.dumps(schemas if args.which == "all" else schemas[args.which], indent=2))
    return 0


# ---- entry point ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from hookwire import __version__

    p = argparse.ArgumentParser(
        prog="hookwire",
        description="Run TransformerLens hooks against a shared model server, as data.")
    p.add_argument("--version", action="version", version=f"hookwire {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("serve", help="host models over websockets (foreground)",
                       description="Load each model once and serve intervention graphs until "
                                   "SIGINT or SIGTERM.")
    s.add_argument("--model", action="append", required=True, metavar="NAME_OR_PATH",
                   help="a built-in model (tiny-gpt2, tiny-llama, gpt2-small-random) or a "
                        "local HF checkpoint folder; repeat to host several")
    s.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1; non-loopback needs "
                        "--api-key-file)")
    s.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free)")
    s.add_argument("--api-key-file", metavar="F",
                   help="file with one API key per line, the whole line (at least 16 "
                        "characters; blank lines and lines starting with # ignored)")
    s.add_argument("--no-batching", action="store_true",
                   help="run requests one at a time instead of batching users together")
    s.add_argument("--batch-window-ms", type=float, default=5.0,
                   help="how long a request waits for batch mates (default 5 ms)")
    s.add_argument("--max-request-seconds", type=float, default=600.0,
                   help="wall-time limit of one request (default 600)")
    s.add_argument("--max-weight-bytes", type=int, default=2 << 30,
                   help="parameters one weights request (a stand-in's fetch_weights) may fetch "
                        "(default 2 GiB; 0: never send weights)")
    s.add_argument("--engine", choices=["embedded", "ray"], default="embedded",
                   help="embedded: models run in this process (default); ray: each model is "
                        "a Ray Serve deployment (pip install 'hookwire[ray]')")
    s.add_argument("--replicas", type=int, default=1,
                   help="--engine ray: replicas per model (default 1)")
    s.add_argument("--ray-address", default=None,
                   help="--engine ray: cluster to join ('auto' = the one `ray start` made on "
                        "this node); default: a private local Ray on 127.0.0.1")
    s.add_argument("--cpus-per-replica", type=float, default=1.0,
                   help="--engine ray: CPUs reserved per replica (default 1)")
    s.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="--engine ray: GPUs per replica (Ray's num_gpus; default 0)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to host models in (default auto: a checkpoint's own dtype, "
                        "float32 for built-in models)")
    s.add_argument("--device", default="auto",
                   help="cpu, cuda or cuda:N (default auto: the first GPU if there is one, "
                        "else the CPU); not with --device-map")
    s.add_argument("--device-map", default=None,
                   help="spread each model over several devices with accelerate: auto, "
                        "balanced, sequential or a JSON {module: device} map")
    s.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="start a server, run a TL hook example remotely and "
                                    "locally, check they match, stop the server")
    d.add_argument("--model", default=DEFAULT_DEMO_MODEL,
                   help=f"built-in model name (default {DEFAULT_DEMO_MODEL})")
    d.add_argument("--timeout", type=float, default=DEMO_READY_TIMEOUT_S,
                   help="seconds to wait for the server to listen (default 120)")
    d.add_argument("--quiet-server", action="store_true", help="do not echo the server's output")
    d.set_defaults(func=cmd_demo)

    st = sub.add_parser("status", help="print a server's /health JSON")
    st.add_argument("url", nargs="?",
                    help="ws://host:port (default $HOOKWIRE_URL or ws://127.0.0.1:8765)")
    st.add_argument("--timeout", type=float, default=10.0)
    st.set_defaults(func=cmd_status)

    sc = sub.add_parser("schema", help="print the published JSON schemas")
    sc.add_argument("which", nargs="?", default="all", choices=["all", "graph", "protocol"])
    sc.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
