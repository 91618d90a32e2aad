"""Run a hookwire server in its own process for benchmarks (separate GIL, like production).

Usage: python bench/_server_process.py MODEL [MODEL ...]; prints "READY <url>" when listening
and serves until stdin closes or it gets SIGTERM."""
import signal
import sys
import threading

import hookwire.server as hs

if __name__ == "__main__":
    handle = hs.start(models=sys.argv[1:], port=0)
    print("READY", handle.url, flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    handle.stop()
