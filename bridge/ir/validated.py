"""The validated form of the intervention graph: what the server runs.

:func:`hookwire.validate.validate_structure` turns a wire :class:`~hookwire.ir.wire.Graph`
into a :class:`ValidatedGraph`: its nodes decoded (:class:`DecodedNode`: arguments with
``Ref``/``Const`` placeholders, the registry entry or special op they run, their ``kind`` and
*stage*) and the :class:`SiteInfo` of each site it touches, as the served model declares it.
:func:`hookwire.validate.infer_shapes` then adds every node's meta value and the totals the
limits were checked against. The executor takes nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hookwire.ir.special import node_kind
from hookwire.ir.stages import BEFORE_FORWARD, Stages
from hookwire.ir.wire import Graph
from hookwire.site_layout import Layout, strides_for

if TYPE_CHECKING:
    from hookwire.ops import OpSpec


# A dim of a site's symbolic shape: "B" (batch), "S" (sequence), "B*S" (batch and sequence
# flattened into one dim, batch-major: OPT's MLP, MoE routers), "B*S*k" (the same with a
# further factor: a top-k router's token x expert pairs, heads folded into the rows) or a
# fixed size.
FLAT = "B*S"


def flat_factor(d) -> int | None:
    """k for a "B*S" (1) or "B*S*k" dim; None for any other dim."""
    if not isinstance(d, str) or not d.startswith(FLAT):
        return None
    rest = d[len(FLAT):]
    if not rest:
        return 1
    return int(rest[1:]) if rest[0] == "*" and rest[1:].isdigit() else None


def _concrete_dim(d, batch: int, seq: int) -> int:
    """One dim of a symbolic shape, for a request of ``batch`` rows of ``seq`` tokens."""
    if d == "B":
        return batch
    if d == "S":
        return seq
    k = flat_factor(d)
    return batch * seq * k if k else d


def flat_dim(k: int) -> str:
    """The symbolic dim of batch x sequence x ``k`` flattened into one."""
    return FLAT if k == 1 else f"{FLAT}*{k}"


@dataclass(frozen=True)
class SiteInfo:
    """A site as the model declares it: symbolic shape ('B', 'S', 'B*S' or an int per dim)."""
    name: str
    call: int
    shape: tuple
    dtype: torch.dtype
    grad: bool = False  # its value depends on the weights, so a backward pass reaches it
    eager: bool = False  # fires only when attention runs eagerly (patterns, scores)
    # How its activation lies in memory (hookwire.site_layout; None: contiguous).
    layout: Layout | None = None

    def concrete_shape(self, batch: int, seq: int) -> tuple[int, ...]:
        return tuple(_concrete_dim(d, batch, seq) for d in self.shape)

    def concrete_strides(self, batch: int, seq: int) -> tuple[int, ...] | None:
        """The strides its activation has for this request (None: contiguous)."""
        return strides_for(self.layout, batch, seq)

    def meta_value(self, batch: int, seq: int) -> torch.Tensor:
        """A meta tensor shaped and strided as its activation is for this request."""
        shape = self.concrete_shape(batch, seq)
        strides = strides_for(self.layout, batch, seq)
        if strides is None:
            return torch.empty(shape, dtype=self.dtype, device="meta")
        return torch.empty_strided(shape, strides, dtype=self.dtype, device="meta")

    @property
    def flattened(self) -> bool:
        """Batch and sequence share one dim: a request's rows are not a block of it once
        requests of different lengths are padded together (such requests run alone)."""
        return any(flat_factor(d) for d in self.shape)


@dataclass
class DecodedNode:
    """A node after :func:`hookwire.validate.validate_structure`: arguments decoded (``Ref``/``Const``
    placeholders), its registry entry (``spec``; None for special ops), its ``kind`` (the
    method each pass runs it with) and the *stage* it runs at -- the latest stage of anything
    it depends on."""
    id: int
    op: str
    args: tuple
    kwargs: dict
    spec: OpSpec | None
    # When the node can run (hookwire.ir.stages): -1 before the forward, k at site k,
    # len(sites) once the forward's output exists, len(sites) + 1 after the backward pass.
    stage: int = BEFORE_FORWARD
    site: int | None = None    # for the special ops that take a site index
    mode: str | None = None    # for site.write
    # Which method each pass runs it with (hookwire.ir.special): "call_op" for registry ops.
    kind: str = field(init=False)

    def __post_init__(self):
        self.kind = node_kind(self.op)


@dataclass
class ValidatedGraph:
    """The server's form of a graph: the wire :class:`~hookwire.ir.wire.Graph`, its
    decoded nodes, the :class:`SiteInfo` of each listed site, and -- after
    :func:`hookwire.validate.infer_shapes` --
    every node's meta value and the totals the limits were checked against (saved bytes,
    intermediate bytes, flops). Stages: ``-1`` before the forward, ``k`` at site k,
    ``output_stage`` once the forward's output exists, ``grad_stage`` after the backward."""
    graph: Graph
    nodes: list[DecodedNode]
    site_infos: list[SiteInfo]
    shapes: dict[int, object] = field(default_factory=dict)  # node id -> meta value
    saved_bytes: int = 0
    value_bytes: int = 0  # all intermediates together (an upper bound of what it holds)
    flops: int = 0        # counted work of its ops
    seconds: float = 0.0  # its ops' estimated time on the server's device (hookwire.op_time)

    @property
    def stages(self) -> Stages:
        """Its stage numbers, named (:mod:`hookwire.ir.stages`)."""
        return Stages(len(self.site_infos))

    @property
    def output_stage(self) -> int:
        return self.stages.output

    @property
    def grad_stage(self) -> int:
        return self.stages.gradient
