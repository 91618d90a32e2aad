"""How long one op will run on a server's device, estimated from its cost before it runs.

A request's deadline (``Limits.max_request_seconds``) is checked between nodes and the worker
gives way to other users' requests between nodes (``server/give_way.py``), but a single op
runs to its end once started: the largest matrix product a shared server's byte limits admit
held its model worker for seconds, and every co-tenant with it. ``Limits.max_node_seconds``
bounds that time, and this module says what a node would take: its cost
(``hookwire.op_costs.Cost``) priced at the rates the server measured on its own device
(:class:`DeviceRates`; ``server/device_rates.py`` measures them once per device).

Two kinds of work, two rates: the cost's ``contraction`` flops run at a matrix product's
speed; everything else (elementwise, reductions, sorts, copies, and the bytes of the
temporaries inside the op) runs per element, at the speed of an elementwise add over
memory, times :data:`ELEMENT_MARGIN`. The registry's per-element charges already weigh the
slow kinds (``TRANSCENDENTAL`` flops for exp/log/trig, more for the division family); the
margin covers how much slower than that an op runs on its worst inputs (measured on CPU,
bench/README.md "Op time estimates"). The estimate is for refusing outliers before they
run, not a promise of a duration: the rates are measured once, on a machine that may be
busy, and an op whose estimate is under the limit may still run somewhat longer.
"""
from __future__ import annotations

from dataclasses import dataclass

from hookwire.op_costs import Cost

# The slowest registered elementwise op or reduction on its worst inputs (inf, nan, huge,
# tiny operands), per flop the registry charges it, over an add per element (same size,
# same run): <= 8.4 measured on CPU (sin of inf; 4.5-6.3 for exp, log, sqrt; the division
# family's 23-30 per element is charged in its own flops). bench/README.md, "Op time
# estimates".
ELEMENT_MARGIN = 4.0
# Temporaries are written and read: bytes of them, in elements of 4 bytes, count as work.
TEMPORARY_BYTES_PER_ELEMENT = 4


@dataclass(frozen=True)
class DeviceRates:
    """What the server's device does per second: ``contraction_flops`` of a float32 matrix
    product, ``element_ops`` elements of a float32 add over tensors larger than its caches."""
    contraction_flops: float
    element_ops: float

    def seconds(self, cost: Cost) -> float:
        """The estimated time of one op of this cost on the device."""
        elementwise = max(cost.flops - cost.contraction, 0.0) + \
            cost.transient_bytes / TEMPORARY_BYTES_PER_ELEMENT
        return cost.contraction / self.contraction_flops + \
            ELEMENT_MARGIN * elementwise / self.element_ops


__all__ = ["DeviceRates", "ELEMENT_MARGIN"]
