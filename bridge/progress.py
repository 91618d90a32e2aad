"""A tqdm progress bar for one remote request: queue position, then sites reached and bytes
received. ``tqdm.auto`` renders as a widget in Jupyter and as text in a terminal; with
``enabled=None`` it shows only when stderr is a terminal (tqdm's own rule)."""
from __future__ import annotations

from tqdm.auto import tqdm

from hookwire.protocol import Accepted, Progress, Result


class ProgressBar:
    def __init__(self, model: str, n_sites: int, enabled: bool | None = None):
        self.bar = None if enabled is False else tqdm(
            total=max(n_sites, 1), desc=f"hookwire {model}", unit="site", leave=False,
            disable=None if enabled is None else not enabled)
        self.received = 0

    def on_event(self, msg) -> None:
        if self.bar is None:
            return
        if isinstance(msg, Accepted):
            self.bar.set_postfix_str(f"queued #{msg.queue_position}")
        elif isinstance(msg, Progress):
            if msg.stage == "started":
                self.bar.set_postfix_str("running")
            elif msg.stage == "backward":
                self.bar.set_postfix_str("backward pass")
            elif msg.stage == "site" and msg.site is not None:
                self.bar.n = min(msg.site, self.bar.total)
                self.bar.refresh()
        elif isinstance(msg, Result):
            self.received += msg.tensor.nbytes()
            self.bar.set_postfix_str(f"{self.received / 2**20:.1f} MiB received")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def progress_bar(model: str, n_sites: int, enabled: bool | None = None) -> ProgressBar:
    return ProgressBar(model, n_sites, enabled)
