"""The serving process's cycle collector (server/heap.py): with ``collect_rarely`` no full
collection runs on its own -- a tenant's maximal graphs (a million objects each) made every
full collection stall all threads for ~0.8 s -- and the model worker runs one when idle and
due (``FullCollections``)."""
from __future__ import annotations

import gc
import time

import pytest

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.server.heap import NO_AUTOMATIC_FULL, FullCollections, collect_rarely

from graphs import read_graph


@pytest.fixture
def rarely():
    before = gc.get_threshold()
    collect_rarely()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def full_collections() -> int:
    return gc.get_stats()[2]["collections"]


def test_no_full_collection_runs_on_its_own(rarely):
    assert gc.get_threshold()[2] == NO_AUTOMATIC_FULL
    before = full_collections()
    young_before = gc.get_stats()[1]["collections"]
    keep = []
    for i in range(200_000):  # many young collections, objects surviving into the old one
        keep.append([i])
    assert gc.get_stats()[1]["collections"] > young_before + 10
    assert full_collections() == before
    del keep


def test_the_worker_collects_when_idle_and_due(rarely, hosted, tokens):
    now = [1000.0]
    fc = FullCollections(clock=lambda: now[0])
    before = full_collections()
    assert not fc.idle() and not fc.busy()          # not due yet
    now[0] += FullCollections.IDLE_EVERY_S
    assert not fc.busy() and fc.idle()              # due when idle, not yet when busy
    assert full_collections() == before + 1
    now[0] += FullCollections.ANYWAY_EVERY_S
    assert fc.busy()                                # a server never idle still collects
    assert full_collections() == before + 2
    # The served worker does it: idle before a batch, once due.
    srv = hs.start(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge}, port=0)
    conn = Connection(srv.url)
    try:
        worker = srv.server.worker
        worker.collections.last -= FullCollections.IDLE_EVERY_S  # due
        before = full_collections()
        conn.run(read_graph(), {"input_ids": tokens})  # the worker wakes, runs, is idle again
        deadline = time.monotonic() + 30
        while full_collections() == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert full_collections() > before
    finally:
        conn.close()
        srv.stop()


def test_without_collect_rarely_the_worker_leaves_the_collector_alone():
    assert gc.get_threshold()[2] < NO_AUTOMATIC_FULL  # a test process's default
    fc = FullCollections(clock=lambda: 1e9)
    fc.last = 0.0
    before = full_collections()
    assert not fc.idle() and not fc.busy()
    assert full_collections() == before
