"""The serving process's heap and Python's cycle collector.

A server holds millions of long-lived objects (torch, transformers, the models' modules and
parameters). Each full collection of the cycle collector walks all of them, with the GIL held:
every thread stops, the model worker included. Co-tenants' requests allocate a lot (a
3,000-node graph is tens of thousands of objects), so full collections come often, and a
victim's 10 ms request stalled for 300 ms whenever one ran (``bench/bench_fairness.py``
late_work p99 272-383 ms). Moving what is alive at start-up into the collector's permanent
generation (``gc.freeze``) leaves it only what requests allocate (68-80 ms).
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect once, then freeze everything alive now. For a process that serves until it
    exits (``hookwire serve``, a Ray replica): objects frozen here are never collected, so a
    process that builds and drops many servers (a test run) should not call it."""
    gc.collect()
    gc.freeze()


__all__ = ["freeze_startup_heap"]
