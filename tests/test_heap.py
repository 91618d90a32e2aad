"""The serving process's cycle collector (server/heap.py): with ``collect_rarely`` no full
collection runs on its own -- a tenant's maximal graphs (a million objects each) made every
full collection stall all threads for ~0.8 s -- and the model worker runs one when idle and
due (``FullCollections``); and with ``return_freed_memory`` (and ``trim_heap`` when the worker
falls idle) freed blocks go back to the
system."""
from __future__ import annotations

import gc
import platform
import subprocess
import sys
import textwrap
import threading
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


# In a fresh process (malloc's settings are the process's): a large block comes and goes (a
# tenant's 16 MiB message), then 8 MiB blocks (results) are made, each with a small block
# still in use made after it, and freed. How many MiB the process still holds.
RETAINED_SCRIPT = textwrap.dedent("""
    import sys, threading
    import psutil
    from hookwire.server.heap import return_freed_memory, trim_heap
    if sys.argv[1] == "tuned":
        assert return_freed_memory()
    MiB = 1 << 20

    def work():
        big = bytearray(24 * MiB)
        del big
        before = psutil.Process().memory_info().rss
        blocks, small = [], []
        for _ in range(16):
            blocks.append(bytearray(8 * MiB))
            small.append(bytearray(64 * 1024))
        del blocks
        if sys.argv[1] == "tuned":
            assert trim_heap()  # what the model worker does when it falls idle
        print((psutil.Process().memory_info().rss - before) / MiB)

    thread = threading.Thread(target=work)  # as in a server: not the main thread
    thread.start()
    thread.join()
""")


def retained_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", RETAINED_SCRIPT, mode], capture_output=True,
                         text=True, timeout=120, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_freed_blocks_go_back_to_the_system():
    # glibc's default keeps the 128 MiB freed (its threshold rose to the 24 MiB block's size)
    assert retained_mib("default") > 64
    assert retained_mib("tuned") < 8


def test_the_model_leaves_the_front_a_core():
    """``model_threads`` (``hookwire serve``'s default, in a fresh process: torch's threads
    are the process's): one core fewer than the machine has, at least one; or as asked."""
    script = ("import os, torch; from hookwire.server.heap import model_threads; "
              "print(model_threads(), torch.get_num_threads(), model_threads(3), "
              "torch.get_num_threads(), os.cpu_count())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    default, got, asked, got_asked, cores = map(int, out.stdout.split())
    assert default == got == max(1, cores - 1)
    assert asked == got_asked == 3


def test_the_serving_process_switches_the_gil_every_millisecond():
    """``switch_gil_often`` (``hookwire serve``, in a fresh process: the interval is the
    process's): Python's default 5 ms turns become 1 ms."""
    script = ("import sys; from hookwire.server.heap import switch_gil_often; "
              "before = sys.getswitchinterval(); switch_gil_often(); "
              "print(before, sys.getswitchinterval())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, check=True)
    before, after = map(float, out.stdout.split())
    assert before == 0.005 and after == 0.001


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc")
def test_the_worker_trims_once_per_idle_spell_after_a_batch(monkeypatch):
    """``IdleTrim``: due only once a batch ran since the last trim, and only in a process
    ``return_freed_memory`` set up (elsewhere the worker never waits for it); overdue after
    ``ANYWAY_EVERY_S`` without a trim."""
    import hookwire.server.heap as heap

    monkeypatch.setattr(heap, "_TUNED", False)  # (a test before may have set this process up)
    trim = heap.IdleTrim()
    trim.ran_batch()
    assert not trim.due()
    monkeypatch.setattr(heap, "_TUNED", True)
    fresh = heap.IdleTrim()
    assert not fresh.due()
    fresh.ran_batch()
    assert fresh.due()
    assert fresh.trimmed()  # malloc_trim, for real
    assert not fresh.due()
    # A worker never idle a second still trims now and then.
    now = [0.0]
    busy = heap.IdleTrim(clock=lambda: now[0])
    busy.ran_batch()
    assert busy.due() and not busy.overdue()
    now[0] = heap.IdleTrim.ANYWAY_EVERY_S
    assert busy.overdue()
    busy.trimmed()
    busy.ran_batch()
    assert not busy.overdue()


def test_the_scheduler_says_whether_work_came_while_the_worker_waited():
    from hookwire.server.scheduler import Scheduler

    sched = Scheduler(4, 0.0, 8, 1024)
    assert not sched.wait_for_work(0.01)
    threading.Timer(0.05, lambda: sched.put(object(), "u")).start()
    assert sched.wait_for_work(30)
    assert sched.qsize() == 1
