"""Non-blocking remote calls: ``RemoteRun`` is the handle a ``blocking=False`` call returns.

The call runs in a background thread (plain threads: this works the same from scripts, from
other threads and inside Jupyter, whose event loop we never touch). ``events()`` yields
progress messages and :class:`SavedValue` events as they arrive; saved values are already in
the user's containers when their event is yielded. ``result()`` waits for the return value;
``cancel()`` asks the server to stop the request."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from hookwire.errors import HookwireError

_END = object()


@dataclass
class SavedValue:
    """A value saved by the request, as soon as its last byte arrived."""
    name: str
    value: torch.Tensor


class RemoteRun:
    """The handle of one ``blocking=False`` call: the work runs in a background thread;
    ``events()`` yields progress and :class:`SavedValue` events as they arrive (the value
    already in the user's containers), ``result()`` waits for the return value (and
    re-raises the call's error), ``cancel()`` asks the server to stop the request."""
    def __init__(self, work: Callable[["RemoteRun"], object]):
        self._work = work
        self._events: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._submitted = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None
        self._cancel_requested = False
        self.request_id: str | None = None
        self._conn = None
        # Set by an adapter: True while waiting here could never end (the run needs something
        # the calling thread holds, e.g. a model's lock inside a ``with model.hooks()`` block).
        self.blocked_by: Callable[[], bool] | None = None
        self._thread = threading.Thread(target=self._main, name="hookwire-remote-run",
                                        daemon=True)

    def start(self) -> "RemoteRun":
        self._thread.start()
        return self

    def _main(self):
        try:
            self._value = self._work(self)
        except BaseException as exc:  # handed to result()
            self._error = exc
        finally:
            self._done.set()
            self._submitted.set()
            self._events.put(_END)

    # called from the worker thread
    def emit(self, event) -> None:
        self._events.put(event)

    def submitted(self, conn, request_id: str) -> None:
        self._conn, self.request_id = conn, request_id
        self._submitted.set()
        if self._cancel_requested:
            conn.cancel(request_id)

    # the user's side
    def _check_can_wait(self) -> None:
        if not self._done.is_set() and self.blocked_by is not None and self.blocked_by():
            raise HookwireError("this run still needs the model that the `with model.hooks(...)`"
                                " block around this line holds: wait for it (result(), "
                                "events()) after the block")

    def events(self) -> Iterator[object]:
        """Progress messages and SavedValue events, in arrival order, until the run ends."""
        self._check_can_wait()
        while True:
            event = self._events.get()
            if event is _END:
                return
            yield event

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None):
        self._check_can_wait()
        if not self._done.wait(timeout):
            raise TimeoutError("the remote run has not finished yet")
        if self._error is not None:
            raise self._error
        return self._value

    def cancel(self) -> None:
        """Ask the server to stop this request; result() then raises hookwire.errors.Cancelled."""
        self._cancel_requested = True
        if self._conn is not None and self.request_id is not None and not self.done():
            self._conn.cancel(self.request_id)

    def wait_until_traced(self, traced: threading.Event) -> None:
        """Block the caller until tracing is over (so trace errors surface at the call)."""
        while not traced.wait(0.01):
            if self._done.is_set():
                break
        if self._done.is_set() and self._error is not None:
            raise self._error


def gather(runs, timeout: float | None = None) -> list:
    """The results of several ``blocking=False`` runs, in their order (the first error is
    re-raised). Start them all before gathering: their requests are then in flight together
    (each on a connection of its own, up to ``hookwire.client.POOL_SIZE``) and the server
    co-batches them -- a sweep run this way beats calling one by one."""
    return [run.result(timeout) for run in runs]

