"""Start/stop a benchmark server subprocess by PID."""
from __future__ import annotations

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


class ServerProcess:
    def __init__(self, *models: str, batching: bool = True, device: str | None = None,
                 dtype: str | None = None, attn: str | None = None,
                 threads: int | None = None, engine: str | None = None):
        flags = [] if batching else ["--no-batching"]
        flags += [f"--device={device}"] if device else []
        flags += [f"--dtype={dtype}"] if dtype else []
        flags += [f"--attn={attn}"] if attn else []
        flags += [f"--threads={threads}"] if threads else []
        flags += [f"--engine={engine}"] if engine else []
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_server_process.py"),
                                      *flags, *models], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"benchmark server did not start: {line!r}")
        self.url = line.split()[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
