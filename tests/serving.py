"""A real hookwire server for a block of test code (not a test module itself)."""
from __future__ import annotations

import contextlib
import time

import hookwire
import hookwire.client
import hookwire.server as hs


@contextlib.contextmanager
def serving(**kwargs):
    """``hookwire.server.start(port=0, **kwargs)`` on 127.0.0.1, made the default server of
    the block (``hookwire.configure``); however the block ends, the client's connections are
    closed and the server is stopped."""
    srv = hs.start(port=0, **kwargs)
    hookwire.configure(url=srv.url)
    try:
        yield srv
    finally:
        try:
            hookwire.client.close_connections()
        finally:
            srv.stop()
            hookwire.configure(url=None)


def wait_for(predicate, timeout: float = 30.0) -> None:
    """Until ``predicate()`` is true (the server's threads get there on their own time);
    fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
