"""Run a hookwire server in its own process for benchmarks (separate GIL, like production).

Usage: python bench/_server_process.py [--no-batching] [--device=D] [--dtype=T] MODEL [MODEL ...];
prints "READY <url>" when listening and serves until stdin closes or it gets SIGTERM."""
import signal
import sys
import threading

import hookwire.server as hs

if __name__ == "__main__":
    args = sys.argv[1:]
    batching = "--no-batching" not in args
    options = dict(a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a)
    handle = hs.start(models=[a for a in args if not a.startswith("--")], port=0,
                      batching=batching, device=options.get("device"),
                      dtype=options.get("dtype"))
    print("READY", handle.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    handle.stop()
