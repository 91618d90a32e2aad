"""Progress of remote requests: queue position, then sites reached and bytes received.

In a script, each request gets a tqdm bar on stderr -- shown only when stderr is a terminal
(tqdm's own rule, ``enabled=None``; ``progress=True`` forces it, ``progress=False`` turns it
off). In a Jupyter notebook, all the requests one cell makes share **one** bar (a patching
sweep of 100 calls shows one bar, not 100 widgets): its total grows by each request's sites,
its description counts the requests, and its postfix shows the latest request's state. A new
cell starts a new bar.
"""
from __future__ import annotations

import sys
import threading

from tqdm.auto import tqdm

from hookwire.protocol import Accepted, Progress, Result


def _notebook_cell():
    """The running notebook cell's execution count, or None outside a Jupyter kernel."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return None
    try:
        shell = ipython.get_ipython()
    except Exception:
        return None
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return None
    return shell.execution_count


class _CellBar:
    """The one bar of a notebook cell, shared by every request the cell makes."""
    lock = threading.Lock()
    current: "_CellBar | None" = None

    def __init__(self, cell, model: str):
        self.cell = cell
        self.model = model
        self.calls = 0
        self.bar = tqdm(total=0, desc=f"hookwire {model}", unit="site")

    @classmethod
    def for_cell(cls, cell, model: str) -> "_CellBar":
        with cls.lock:
            shared = cls.current
            if shared is None or shared.cell != cell:
                if shared is not None:
                    shared.bar.close()
                shared = cls.current = cls(cell, model)
            return shared

    def add_call(self, n_sites: int) -> None:
        with self.lock:
            self.calls += 1
            self.bar.total += max(n_sites, 1)
            self.bar.set_description(f"hookwire {self.model}: {self.calls} "
                                     f"request{'s' if self.calls > 1 else ''}", refresh=False)
            self.bar.refresh()

    def advance(self, by: int) -> None:
        if by > 0:
            with self.lock:
                self.bar.update(by)

    def status(self, text: str) -> None:
        with self.lock:
            self.bar.set_postfix_str(text)


class ProgressBar:
    """The progress display of one request (a context manager; ``on_event`` per message)."""

    def __init__(self, model: str, n_sites: int, enabled: bool | None = None):
        self.total = max(n_sites, 1)
        self.reached = 0
        self.received = 0
        self.bar = None
        self.shared = None
        if enabled is False:
            return
        cell = _notebook_cell()
        if cell is not None:
            self.shared = _CellBar.for_cell(cell, model)
            self.shared.add_call(n_sites)
        else:
            self.bar = tqdm(total=self.total, desc=f"hookwire {model}", unit="site",
                            leave=False, disable=None if enabled is None else not enabled)

    @property
    def shows(self) -> bool:
        """Whether anything is displayed (else the server need not send progress)."""
        return self.shared is not None or (self.bar is not None and not self.bar.disable)

    def _status(self, text: str) -> None:
        if self.shared is not None:
            self.shared.status(text)
        elif self.bar is not None:
            self.bar.set_postfix_str(text)

    def _reach(self, site: int) -> None:
        site = min(site, self.total)
        if self.shared is not None:
            self.shared.advance(site - self.reached)
        elif self.bar is not None:
            self.bar.n = site
            self.bar.refresh()
        self.reached = max(self.reached, site)

    def on_event(self, msg) -> None:
        if self.bar is None and self.shared is None:
            return
        if isinstance(msg, Accepted):
            self._status(f"queued #{msg.queue_position}")
        elif isinstance(msg, Progress):
            if msg.stage == "started":
                self._status("running")
            elif msg.stage == "backward":
                self._status("backward pass")
            elif msg.stage == "site" and msg.site is not None:
                self._reach(msg.site)
        elif isinstance(msg, Result) and msg.alias_of is None:
            self.received += msg.tensor.nbytes()
            self._status(f"{self.received / 2**20:.1f} MiB received")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.shared is not None:
            # A request that ended (or stopped early) counts as all its sites done, so the
            # cell's bar is full when every request is.
            self.shared.advance(self.total - self.reached)
            self.reached = self.total
        elif self.bar is not None:
            self.bar.close()
        return False


__all__ = ["ProgressBar"]
