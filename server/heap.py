"""The serving process's heap, Python's cycle collector, and torch's threads.

A server holds millions of long-lived objects (torch, transformers, the models' modules and
parameters). Each full collection of the cycle collector walks all of them, with the GIL held:
every thread stops, the model worker included. Co-tenants' requests allocate a lot (a
3,000-node graph is tens of thousands of objects), so full collections come often, and a
victim's 10 ms request stalled for 300 ms whenever one ran (``bench/bench_fairness.py``
late_work p99 272-383 ms). Moving what is alive at start-up into the collector's permanent
generation (``gc.freeze``) leaves it only what requests allocate (68-80 ms).

That is still a lot under a tenant sending maximal graphs: a parsed 100,000-node graph is
over a million objects, alive while it is admitted, validated and refused, and every full
collection then walked them -- 0.73-0.81 s with the GIL held, collecting nothing, every few
seconds (``bench_fairness.py`` huge_graph: the victim's slowest requests each sat out one;
found with a ``gc.callbacks`` timer). Requests free what they allocate by reference counting
(no per-request cycles: SECURITY.md, class 6), so a serving process needs full collections
rarely: ``collect_rarely`` turns the automatic ones off and :class:`FullCollections` runs one
when the model worker is idle and a minute has passed, or every ten minutes regardless.
Young generations are still collected as usual.

Freed memory must also go back to the system: ``return_freed_memory`` sets glibc's malloc so
that it does (see there); ``model_threads`` leaves the front a core; and
``switch_gil_often`` shortens the GIL's turns between the server's threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import platform
import sys
import time


def freeze_startup_heap() -> None:
    """Collect once, then freeze everything alive now. For a process that serves until it
    exits (``hookwire serve``, a Ray replica): objects frozen here are never collected, so a
    process that builds and drops many servers (a test run) should not call it."""
    gc.collect()
    gc.freeze()


# A threshold the count of young-generation collections never reaches: no automatic full one.
NO_AUTOMATIC_FULL = 1 << 30


def collect_rarely() -> None:
    """No automatic full collections from now on in this process (young generations as
    before); the model worker runs them (:class:`FullCollections`). For a serving process,
    like ``freeze_startup_heap``."""
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, NO_AUTOMATIC_FULL)


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Blocks of this size and larger get pages of their own, given back when freed.
MMAP_THRESHOLD_BYTES = 32 << 20
# Free memory at the top of a heap past this much is given back.
TRIM_THRESHOLD_BYTES = 64 << 20
# Heaps malloc keeps for the process's threads (its default: 8 per core).
ARENA_MAX = 2


def return_freed_memory() -> bool:
    """Make glibc's malloc give large freed blocks back to the system, and keep few per-thread
    heaps. By default it raises its mmap threshold to the size of each large block freed (up
    to 32 MiB) and its trim threshold to twice that: after one tenant's 16 MiB message or
    8 MiB result has come and gone, blocks of that size come from the heap, where memory freed
    below a block still in use is never returned, and each of the server's threads may get a
    heap of its own. A server then kept hundreds of MiB a hostile tenant had made it allocate
    once (``bench/bench_fairness.py``: json_bomb's peak RSS 1.57x idle, unread's 1.92x).

    The thresholds are fixed here, not small: blocks over ``MMAP_THRESHOLD_BYTES`` (32 MiB,
    glibc's own upper bound) get pages of their own and go back when freed; free memory at the
    top of a heap past ``TRIM_THRESHOLD_BYTES`` goes back at once; and the rest -- memory
    freed inside a heap -- goes back once the model worker has been idle a while
    (:class:`IdleTrim`). A first version fixed the mmap threshold at 1 MiB (and left the trim
    threshold at its 128 KiB): then every activation of a mid-sized forward (gpt2-small
    8x128: 3-13 MiB each) was mapped, zero-filled page by page and unmapped, op after op.
    Issue 18's P1 call (``bench/bench_tl_remote.py``, interleaved with local TL) took
    1.6-1.8x local TL with it against 1.14-1.20x with glibc's defaults, and 1.12x with these
    settings and the idle trim (2026-12-02, tenth session; bench/README.md).

    Call it first thing in a serving process, before its threads start (a per-thread heap made
    before stays). Returns whether it applied (glibc only; elsewhere a no-op). Written by hand:
    no maintained library sets these (``MALLOC_*`` environment variables would, but are read
    before any code of ours runs)."""
    global _TUNED
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    # Setting the threshold at all also turns its dynamic raising off.
    _TUNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and \
        bool(libc.mallopt(_M_ARENA_MAX, ARENA_MAX))
    return _TUNED


_TUNED = False  # return_freed_memory applied in this process


def trim_heap() -> bool:
    """Give the heaps' free memory back to the system (glibc's ``malloc_trim``: whole free
    pages inside a heap too, not only at its top). Only where ``return_freed_memory``
    applied; returns whether it trimmed."""
    if not _TUNED:
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.malloc_trim(0)  # (ctypes lets the GIL go meanwhile)
    return True


class IdleTrim:
    """When the model worker gives freed memory back (:func:`trim_heap`): once it has had
    nothing to do for ``AFTER_IDLE_S`` since its last batch (``due`` says whether it has run
    a batch since its last trim; ``trimmed`` records one), and every ``ANYWAY_EVERY_S``
    regardless (``overdue``), so a tenant who keeps the worker from ever idling cannot make
    the server keep what its freed blocks left in the heaps. Not after every batch: a worker
    with requests coming would hand back, and fault in again, the same activations request
    after request (a trim at most once a second took issue 18's P1 call from 1.33x to 1.67x
    local TL)."""
    AFTER_IDLE_S = 1.0
    ANYWAY_EVERY_S = 60.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.batches = 0        # batches run since the last trim
        self.last = clock()

    def ran_batch(self) -> None:
        self.batches += 1

    def due(self) -> bool:
        """A batch ran since the last trim, in a process ``return_freed_memory`` set up."""
        return self.batches > 0 and _TUNED

    def overdue(self) -> bool:
        """Due, and the last trim was ``ANYWAY_EVERY_S`` ago or more."""
        return self.due() and self.clock() - self.last >= self.ANYWAY_EVERY_S

    def trimmed(self) -> bool:
        self.batches = 0
        self.last = self.clock()
        return trim_heap()


def model_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads for this serving process: ``threads``, or by default one core
    fewer than the machine has (at least one). With every core given to torch, one tenant's
    large op (a 512x512 matmul chain, a 28x256 forward) took them all, and the event loop
    that answers everyone else waited for a core (``bench/bench_fairness.py`` padding: victim
    p99 2.48x idle with two threads on two cores, 1.49x with one). Returns the count."""
    import torch

    count = threads if threads is not None else max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(count)
    return count


# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms).
GIL_SWITCH_S = 0.001


def switch_gil_often() -> None:
    """Hand the GIL between threads every millisecond instead of every five. A serving process
    is a few threads that take turns (the event loop, the intake's parsers, the model
    worker), and each time one of them blocks for a moment (a lock, a socket, a condition) it
    waits for the GIL again behind whichever thread is busy: up to a whole switch interval
    per hand-off. The model worker's few blocking moments between two batches took 10-18 ms
    under a co-tenant's flood of uploads (``bench/bench_fairness.py`` late_work: the
    server's own batch timings); with 1 ms turns late_work's victim p99 fell from 45-52 ms
    to 30 ms and shared_write's from 20 to 7.5 ms. Costs a little more switching for
    threads that are all busy with Python at once."""
    sys.setswitchinterval(GIL_SWITCH_S)


class FullCollections:
    """When the model worker runs a full collection itself (only where ``collect_rarely``
    turned the automatic ones off): ``idle()`` when nothing is queued, ``busy()`` after each
    batch. Each returns whether it collected."""
    IDLE_EVERY_S = 60.0     # at most this often, when idle
    ANYWAY_EVERY_S = 600.0  # a server never idle still collects this often

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.last = clock()

    @staticmethod
    def enabled() -> bool:
        return gc.get_threshold()[2] >= NO_AUTOMATIC_FULL

    def idle(self) -> bool:
        return self._collect_after(self.IDLE_EVERY_S)

    def busy(self) -> bool:
        return self._collect_after(self.ANYWAY_EVERY_S)

    def _collect_after(self, seconds: float) -> bool:
        if not self.enabled() or self.clock() - self.last < seconds:
            return False
        gc.collect()
        self.last = self.clock()
        return True


__all__ = ["freeze_startup_heap", "collect_rarely", "return_freed_memory", "trim_heap",
           "IdleTrim", "model_threads", "switch_gil_often", "FullCollections",
           "NO_AUTOMATIC_FULL"]
