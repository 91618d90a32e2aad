"""Run a hookwire server in its own process for benchmarks (separate GIL, like production).

Usage: python bench/_server_process.py [--no-batching] [--device=D] [--dtype=T] [--attn=IMPL]
[--threads=N] [--engine=process] MODEL [MODEL ...]; prints "READY <url>" when listening and serves until stdin closes or it gets
SIGTERM. ``--attn`` builds the built-in models with that attention implementation (eager,
sdpa) and hosts them as objects; ``--threads`` sets torch's thread count."""
import signal
import sys
import threading

import hookwire.server as hs
from hookwire.families import build_hf_model
from hookwire.server.heap import return_freed_memory, switch_gil_often
from hookwire.server.models import BUILTIN_MODELS

if __name__ == "__main__":
    # Set up as `hookwire serve` sets up its process (server/cli.py), before any thread
    # starts: the benchmarks measure the server as it is deployed.
    return_freed_memory()
    switch_gil_often()
    args = sys.argv[1:]
    batching = "--no-batching" not in args
    options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    if options.get("threads"):
        import torch
        torch.set_num_threads(int(options["threads"]))
    names = [a for a in args if not a.startswith("--")]
    models = names
    if options.get("attn"):
        models = {}
        for name in names:
            spec = BUILTIN_MODELS[name]
            model, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed)
            model.set_attn_implementation(options["attn"])
            models[name] = model
    # (engine=process: the model process sets its own threads, one core fewer than the
    # machine has, as `hookwire serve` does)
    engine = options.get("engine", "embedded")
    handle = hs.start(models=models, port=0, batching=batching, device=options.get("device"),
                      dtype=options.get("dtype"), engine=engine)
    print("READY", handle.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    handle.stop()
