"""The ``hookwire`` command: ``serve``, ``status``, ``schema``.

It lives with the server (``hookwire.server.cli``) and imports no adapter: the end-to-end
demo, which runs a TransformerLens client against a ``hookwire serve`` child, is
``scripts/demo.py`` (``scripts/demo.sh``).

argparse (stdlib) rather than typer/click on purpose: the command line is small, and the
package should not take an extra dependency for it.

Heavy imports (torch, transformers, TransformerLens) happen inside the subcommands, so
``hookwire --help``, ``status`` and argument errors answer at once.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
READY_PREFIX = "hookwire serving "
READY_RE = re.compile(r"^hookwire serving (?P<models>\S+) on (?P<url>ws://\S+)\s*$")


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
    scripts (``scripts/demo.py``, benchmarks, tests) wait for at exactly that moment."""

    def __init__(self, line_for):
        super().__init__()
        self._line_for = line_for

    def set(self):
        print(self._line_for(), flush=True)
        super().set()


def cmd_serve(args) -> int:
    from hookwire.server.heap import model_threads, return_freed_memory, switch_gil_often
    return_freed_memory()  # before any thread starts (server/heap.py)
    switch_gil_often()
    if args.threads is not None and args.threads < 1:
        _err("--threads must be at least 1")
        return 2
    model_threads(args.threads)
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
    from hookwire.server.heap import collect_rarely, freeze_startup_heap
    from hookwire.validate import Limits

    limits = Limits(max_request_seconds=args.max_request_seconds,
                    max_node_seconds=args.max_node_seconds,
                    max_weight_bytes=args.max_weight_bytes,
                    max_connections_per_address=args.max_connections_per_address or None)
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
    elif args.engine == "process":
        engine = _process_engine(args, limits, device_map, device)
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
    freeze_startup_heap()  # the models are loaded: out of the cycle collector's way
    collect_rarely()  # full collections only when the worker is idle (server/heap.py)
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


def _process_engine(args, limits, device_map, device):
    from hookwire.server.process_engine import ProcessEngine

    print(f"hookwire: starting a model process for {', '.join(args.model)} ...",
          file=sys.stderr, flush=True)
    try:
        return ProcessEngine(args.model, limits=limits, batching=not args.no_batching,
                             window_s=args.batch_window_ms / 1000, device_map=device_map,
                             dtype=args.dtype, device=device, threads=args.threads)
    except Exception as exc:
        _err(f"cannot start the model processes: {type(exc).__name__}: {exc}")
        return None


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
    from hookwire.ir import graph_json_schema
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
                   help="how long a request waits for batch mates at most (default 5 ms; "
                        "not at all when no other connection could send one)")
    s.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads for the model (default: one core fewer than the "
                        "machine has, at least one: the front keeps a core to answer others "
                        "while a co-tenant's large op runs)")
    s.add_argument("--max-request-seconds", type=float, default=600.0,
                   help="wall-time limit of one request (default 600)")
    s.add_argument("--max-node-seconds", type=float, default=1.0,
                   help="estimated time one op of a graph may take on the served device: "
                        "nothing interrupts an op once it runs (default 1.0)")
    s.add_argument("--max-weight-bytes", type=int, default=2 << 30,
                   help="parameters one weights request (a stand-in's fetch_weights) may fetch "
                        "(default 2 GiB; 0: never send weights)")
    s.add_argument("--max-connections-per-address", type=int, default=256, metavar="N",
                   help="connections one client address may hold (default 256; 0: no cap -- "
                        "behind a reverse proxy every client is the proxy's address)")
    s.add_argument("--engine", choices=["embedded", "process", "ray"], default="embedded",
                   help="embedded: models run in this process (default); process: each model "
                        "runs in a process of its own on this machine, so no tenant's load on "
                        "the front holds the model's interpreter lock; ray: each model is a "
                        "Ray Serve deployment (pip install 'hookwire[ray]')")
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
