"""Stages: the points of a request's run at which a node can execute.

A graph of ``n`` sites runs in ``n + 3`` stages, in this order:

=====================  =========  ========================================================
stage                  value      what exists by then
=====================  =========  ========================================================
``BEFORE_FORWARD``     ``-1``     the request's constants only
site ``k``             ``k``      the activation at site ``k`` (sites in firing order)
``output``             ``n``      the forward's output (``output.read``)
``gradient``           ``n + 1``  the backward pass's gradients (``site.grad``, ``const.grad``)
=====================  =========  ========================================================

A node's stage is the latest stage of anything it depends on (its special op's own stage, or
its arguments' stages); the interleaver runs each stage's nodes when that point of the run is
reached. Stages are plain ints so they order and index naturally; :class:`Stages` names them
for a graph of a given number of sites.
"""
from __future__ import annotations

from dataclasses import dataclass

BEFORE_FORWARD = -1

# The stage kinds a special op is pinned to (``SpecialOp.stage``).
SITE, OUTPUT, GRADIENT = "site", "output", "gradient"


@dataclass(frozen=True)
class Stages:
    """The stage numbers of a graph with ``n_sites`` sites (module docstring)."""
    n_sites: int

    before_forward = BEFORE_FORWARD

    @property
    def output(self) -> int:
        """Once the forward's output exists: after the last site."""
        return self.n_sites

    @property
    def gradient(self) -> int:
        """After the backward pass of ``Graph.backward``."""
        return self.n_sites + 1

    def of(self, kind: str, site: int | None = None) -> int:
        """The stage of a special op pinned to ``kind`` (:data:`SITE` needs its ``site``)."""
        if kind == SITE:
            if site is None:
                raise ValueError("a site-pinned stage needs its site index")
            return site
        return self.output if kind == OUTPUT else self.gradient

    def describe(self, stage: int) -> str:
        """A stage in words, for messages and logs."""
        if stage == BEFORE_FORWARD:
            return "before the forward"
        if stage < self.n_sites:
            return f"site {stage}"
        return "output" if stage == self.output else "gradient"
