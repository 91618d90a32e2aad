"""Everything the server checks before a single op runs: wire graph in, validated graph out
(both forms: :mod:`hookwire.ir`).

Two passes, each dispatching on a node's ``kind`` as ``torch.fx.Interpreter`` does (one
method per special op, :mod:`hookwire.ir.special`, and ``call_op`` for every registry op):

* :func:`validate_structure` -- ids unique, refs point backwards so the graph is acyclic, ops
  registered, arguments fit their signature, sites exist and are listed in firing order, each
  special op's own rules; every node gets its stage.
* :func:`infer_shapes` -- shapes and dtypes by running every op on the meta device, which also
  bounds memory and work before a byte is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hookwire.errors import GraphValidationError, LimitExceeded
from hookwire.frames import DTYPE_NAMES
from hookwire.ir.args import Const, Ref, decode_arg, resolve, walk_consts, walk_refs
from hookwire.ir.kinds import check_args
from hookwire.ir.special import OUTPUT_KINDS, SPECIAL_OPS, WRITE_MODES, SpecialOp
from hookwire.ir.stages import Stages
from hookwire.ir.validated import (FLAT, DecodedNode, SiteInfo, ValidatedGraph, flat_dim,
                                   flat_factor)
from hookwire.ir.wire import Graph, Node, is_parameter
from hookwire.op_time import DeviceRates
from hookwire.ops import OPS
from hookwire.shape_probe import run_for_shape

# The validated form and the walks over arguments used to live here; these names stay
# importable from this module for the code that imports them from it.
__all__ = ["Limits", "validate_structure", "infer_shapes", "StructureCheck", "ShapeInference",
           "FLAT", "DecodedNode", "SiteInfo", "ValidatedGraph", "flat_dim", "flat_factor",
           "resolve", "walk_refs", "OUTPUT_KINDS", "WRITE_MODES"]


@dataclass(frozen=True)
class Limits:
    """Every bound a server enforces, in one place (``hookwire serve`` exposes the main ones
    as flags; ``hookwire.server.start(limits=Limits(...))`` sets any). A request over one is
    refused with a typed error whose ``rule`` is the field's name (``LimitExceeded``,
    ``QueueFull``, ``DeadlineExceeded``; see :mod:`hookwire.errors`)."""
    max_nodes: int = 100_000
    max_constant_bytes: int = 512 << 20
    max_saved_bytes: int = 2 << 30
    # any single intermediate, and the temporaries inside one op together
    max_value_bytes: int = 2 << 30
    # Work of a graph's ops, from each op's cost model before anything runs
    # (hookwire.op_costs): contractions, decompositions and sorts cost more than their
    # result's bytes show. ~1e13 is a minute or two of CPU, well under a second of GPU.
    max_flops: int = 10 ** 13
    # One op runs to its end once started: neither the deadline nor another user's waiting
    # request can interrupt it. Its time on the server's device is estimated before it runs
    # (hookwire.op_time, from the rates the server measured there) and bounded here.
    max_node_seconds: float = 1.0
    max_total_value_bytes: int = 16 << 30  # all intermediates together (upper bound)
    max_batch: int = 1024
    # What the model's own forward makes for one request (its logits, and attention weights
    # when asked for), sent back or not: batch and sequence alone would let a request of
    # 1024 x 1024 tokens make 200 GB of GPT-2 logits.
    max_output_bytes: int = 2 << 30
    # ... and the forward's activations at its peak, with its output (attention scores grow
    # as seq^2: hookwire.server.forward_memory estimates them from the model's shapes)
    max_forward_bytes: int = 16 << 30
    max_seq: int = 8192
    max_resident_bytes: int = 1 << 30     # per user: values kept between requests
    # server-wide: of those, bytes kept in accelerator (GPU) memory; the rest stay in CPU
    # memory and move to the activation's device when a request uses them
    max_resident_device_bytes: int = 1 << 30
    max_queued_per_user: int = 64         # requests waiting to run, per user
    max_connections_per_user: int = 32
    max_request_seconds: float = 600.0    # wall time of one request once it starts
    # One websocket message (larger: close code 1009). Tensors travel in 1 MiB frames, so
    # this bounds control messages (a graph of 100,000 nodes is ~10 MB of JSON) and what
    # a connection's message in flight can hold; a shared server may well lower it.
    max_message_bytes: int = 64 << 20
    resident_ttl_s: float = 900.0         # ... each dropped this long after its last use
    max_new_tokens: int = 1024            # tokens one generate request may ask for
    # Graphs may compute with the served model's parameters and buffers ("@<name>" constants:
    # what a logit lens does with the unembedding), read only. False refuses them.
    allow_parameter_reads: bool = True
    max_weight_bytes: int = 2 << 30       # parameters one `weights` request may fetch
    # Memory requests hold while not running: uploads, materialised references to resident
    # values, results not yet read by their client (server/memory.py). Per user, and for
    # the whole server (without API keys every connection is a user).
    max_pending_bytes_per_user: int = 2 << 30
    max_pending_bytes_total: int = 8 << 30
    max_resident_bytes_total: int = 8 << 30  # resident values of all users together
    submit_timeout_s: float = 60.0        # a submit's declared tensors must all arrive by then
    send_timeout_s: float = 120.0         # a client that reads nothing this long is dropped
    max_connections: int = 1024           # all users together (each holds buffers, a task)
    # Before a handshake is through there is no user, only the peer's address (IPv6: its
    # /64): sockets still in their opening handshake, in all and per address (over either,
    # a socket is closed as it is accepted), the bytes one handshake may send, and
    # connections per address (HTTP 429; None behind a reverse proxy, where every peer is
    # the proxy). server/connection_gate.py.
    max_handshakes: int = 512
    max_handshakes_per_address: int = 64
    max_handshake_bytes: int = 64 << 10
    max_connections_per_address: int | None = 256
    # The listening socket's queue of connections not yet accepted; asyncio accepts up to
    # this many per turn of the event loop, each costing the loop ~0.1-0.2 ms. asyncio's 100
    # let a connect flood hold everyone's reads for ~20 ms a turn (a victim's p99 5.8x
    # idle, bench_fairness slow_handshakes); at 32 the kernel holds the flood back instead.
    listen_backlog: int = 32
    # Seconds of the front's time (reading, parsing, admitting, answering messages) each
    # user may spend per second; over it, its connections' next reads wait.
    front_share: float = 0.25



def _fail(node_id, op, rule, message, cls=GraphValidationError):
    where = f"node {node_id} ({op})" if node_id is not None else "graph"
    raise cls(f"{where}: {message}", node=node_id, op=op, rule=rule)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- structure ---------------------------------------------------------------------------

def validate_structure(graph: Graph, site_table: dict[tuple[str, int], SiteInfo],
                       site_order: dict[tuple[str, int], int], limits: Limits,
                       on_node=None) -> ValidatedGraph:
    """The wire ``graph`` checked against the served model's sites (``site_table``: (name,
    call) -> :class:`SiteInfo`; ``site_order``: its firing position) and decoded: a
    :class:`ValidatedGraph` whose every node has its stage. Raises
    :class:`~hookwire.errors.GraphValidationError` (or ``LimitExceeded``) naming the node and
    the rule. ``on_node()``, if given, is called before each node (as in
    :func:`infer_shapes`)."""
    if len(graph.nodes) > limits.max_nodes:
        _fail(None, None, "max_nodes", f"{len(graph.nodes)} nodes; limit {limits.max_nodes}",
              LimitExceeded)
    site_infos = _site_infos(graph, site_table, site_order)
    constants = set(graph.constants)
    if len(constants) != len(graph.constants):
        _fail(None, None, "constants", "a constant id is declared twice")
    check = StructureCheck(graph, len(site_infos), constants)
    for node in graph.nodes:
        if on_node is not None:
            on_node()
        check.add(node)
    check.finish()
    return ValidatedGraph(graph, check.decoded, site_infos)


def _site_infos(graph: Graph, site_table, site_order) -> list[SiteInfo]:
    """The listed sites as the model declares them; each must exist, in firing order."""
    site_infos = []
    last_pos = -1
    for i, site in enumerate(graph.sites):
        key = (site.name, site.call)
        if key not in site_table:
            _fail(None, None, "unknown_site", f"site {i} {site.name!r} (call {site.call}) "
                  "does not exist on this model")
        if site_order[key] <= last_pos:
            _fail(None, None, "site_order", f"site {i} {site.name!r} is listed out of firing "
                  "order or twice")
        last_pos = site_order[key]
        site_infos.append(site_table[key])
    return site_infos


# A "replace" and a "narrow" write both hand the model the site's value: one of them per site.
_EXCLUSIVE_WRITES = {"replace": "narrow", "narrow": "replace"}


class StructureCheck:
    """:func:`validate_structure`'s walk over the nodes. :meth:`add` decodes a node, checks a
    special op's signature and pins its stage, runs the method named by the node's ``kind``
    (that kind's own rules), then the rules every node shares (refs backwards, constants
    declared, a pinned node's inputs ready in time); :meth:`finish` checks saves and
    ``backward``."""

    def __init__(self, graph: Graph, n_sites: int, constants: set[str]):
        self.graph = graph
        self.n_sites = n_sites
        self.stages = Stages(n_sites)
        self.constants = constants
        self.decoded: list[DecodedNode] = []
        self.by_id: dict[int, DecodedNode] = {}
        # What the graph has read, written and differentiated so far: each at most once.
        self.reads: set[int] = set()
        self.writes: set[tuple[int, str]] = set()
        self.grads: set[int] = set()
        self.outputs_read: set[str] = set()
        self.const_grads: set[str] = set()

    def add(self, node: Node) -> None:
        where = f"node {node.id} ({node.op})"
        if node.id in self.by_id:
            _fail(node.id, node.op, "unique_id", "node id used twice")
        args = tuple(decode_arg(a, where) for a in node.args)
        kwargs = {str(k)[:64]: decode_arg(v, where) for k, v in node.kwargs.items()}
        dn = DecodedNode(node.id, node.op, args, kwargs, None)
        special = SPECIAL_OPS.get(node.op)
        if special is not None:
            self._special_signature(dn, special)
            dn.stage = self.stages.of(special.stage, dn.site)
        getattr(self, dn.kind)(dn)
        self._inputs(dn, pinned=special is not None and special.pinned)
        self.decoded.append(dn)
        self.by_id[node.id] = dn

    def _special_signature(self, dn: DecodedNode, special: SpecialOp) -> None:
        if special.site_arg:
            site = dn.args[0] if dn.args else None
            if not _is_int(site) or not 0 <= site < self.n_sites:
                _fail(dn.id, dn.op, "site_index", "first argument must be a site index")
            dn.site = site
        if check_args(special, dn.args, dn.kwargs) is not None:
            self._usage(dn)

    @staticmethod
    def _usage(dn: DecodedNode):
        _fail(dn.id, dn.op, "args", SPECIAL_OPS[dn.op].usage)

    def _once(self, dn: DecodedNode, seen: set, key, rule: str, message: str) -> None:
        if key in seen:
            _fail(dn.id, dn.op, rule, message)
        seen.add(key)

    def _needs_backward(self, dn: DecodedNode) -> None:
        if self.graph.backward is None:
            _fail(dn.id, dn.op, "grad_without_backward", "reads a gradient, but the graph "
                  "names no value to differentiate (backward)")

    # ---- one method per node kind (hookwire.ir.special) ----------------------------------
    def site_read(self, dn: DecodedNode) -> None:
        self._once(dn, self.reads, dn.site, "site_read_once", "site read twice")

    def site_write(self, dn: DecodedNode) -> None:
        mode = dn.kwargs.get("mode", "replace")
        if mode not in WRITE_MODES:
            self._usage(dn)
        if (dn.site, mode) in self.writes or \
                (dn.site, _EXCLUSIVE_WRITES.get(mode)) in self.writes:
            _fail(dn.id, dn.op, "site_write_once", f"site written twice ({mode})")
        self.writes.add((dn.site, mode))
        dn.mode = mode

    def site_grad(self, dn: DecodedNode) -> None:
        self._needs_backward(dn)
        self._once(dn, self.grads, dn.site, "site_grad_once", "gradient of a site read twice")

    def output_read(self, dn: DecodedNode) -> None:
        kind = dn.args[0]
        if kind not in OUTPUT_KINDS:
            self._usage(dn)
        if self.graph.forward.return_type not in OUTPUT_KINDS[kind]:
            _fail(dn.id, dn.op, "output_kind", f"reads the forward's {kind}, but the "
                  f"forward's return_type is {self.graph.forward.return_type!r}")
        self._once(dn, self.outputs_read, kind, "output_read_once", f"{kind} read twice")

    def const_grad(self, dn: DecodedNode) -> None:
        # The gradient of Graph.backward with respect to an attached constant: what a client
        # needs to train its own parameters (pyvene's rotations) through the served model.
        # The weights are never a target, only the request's own tensors.
        if not isinstance(dn.args[0], Const):
            self._usage(dn)
        tid = dn.args[0].tid
        self._needs_backward(dn)
        self._once(dn, self.const_grads, tid, "const_grad_once",
                   "gradient of a constant read twice")
        if is_parameter(tid):
            _fail(dn.id, dn.op, "const_grad_parameter", "the model's weights are never "
                  "differentiated")

    def call_op(self, dn: DecodedNode) -> None:
        spec = OPS.get(dn.op)
        if spec is None:
            _fail(dn.id, dn.op, "unknown_op", f"op {dn.op[:64]!r} is not in the "
                  "registry of allowed operations")
        reason = check_args(spec, dn.args, dn.kwargs)
        if reason:
            _fail(dn.id, dn.op, "op_schema", reason)
        dn.spec = spec

    # ---- rules every node shares ---------------------------------------------------------
    def _inputs(self, dn: DecodedNode, pinned: bool) -> None:
        """Refs name earlier nodes (so the graph is acyclic), constants are declared, and the
        node's stage becomes the latest of its own and its inputs'; a pinned node (a write)
        keeps its own, so its inputs must exist by then."""
        stage = dn.stage
        for r in walk_refs(dn.args, []) + walk_refs(tuple(dn.kwargs.values()), []):
            if r not in self.by_id:
                _fail(dn.id, dn.op, "ref_order", f"refers to node {r}, which is not "
                      "defined before it (graphs are topologically ordered; cycles refused)")
            stage = max(stage, self.by_id[r].stage)
        for tid in walk_consts(dn.args, []) + walk_consts(tuple(dn.kwargs.values()), []):
            if tid not in self.constants:
                _fail(dn.id, dn.op, "const_ref", f"refers to undeclared constant {tid!r}")
        if pinned and stage > dn.stage:
            _fail(dn.id, dn.op, "write_stage", f"writes site {dn.site} with a value that "
                  f"depends on site {stage}, which fires later")
        if not pinned:
            dn.stage = stage

    def finish(self) -> None:
        for name, nid in self.graph.saves.items():
            if nid not in self.by_id:
                _fail(None, None, "save_ref", f"save {name[:64]!r} refers to unknown node {nid}")
        backward = self.graph.backward
        if backward is not None:
            if backward not in self.by_id:
                _fail(None, None, "backward_ref", f"backward refers to unknown node {backward}")
            if self.by_id[backward].stage > self.stages.output:
                _fail(backward, self.by_id[backward].op, "backward_stage",
                      "the value to differentiate cannot depend on gradients")


# ---- shapes, dtypes and costs ------------------------------------------------------------

def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


def kept_real(t: torch.Tensor) -> bool:
    """Whether shape inference uses this constant's values, not only its shape: small
    integer/bool constants stay real (indexing with a boolean mask has a shape that depends
    on the mask's values)."""
    return t.dtype in (torch.bool, torch.int64, torch.int32, torch.uint8) and \
        t.numel() <= 1 << 20


def _meta_constant(t: torch.Tensor):
    return t if kept_real(t) else torch.empty_like(t, device="meta")


def infer_shapes(vg: ValidatedGraph, batch: int, seq: int, constants: dict[str, torch.Tensor],
                 limits: Limits, outputs: dict[str, tuple[tuple, torch.dtype]] | None = None,
                 on_node=None, rates: DeviceRates | None = None) -> ValidatedGraph:
    """Run the graph on the meta device: shapes, dtypes and byte counts, nothing allocated.

    ``outputs`` gives the (shape, dtype) of the forward's ``logits`` and ``loss`` for
    ``output.read`` nodes; ``on_node()`` is called before each node (it may raise: a
    request's deadline covers its validation too). ``rates``: the device's, where the graph
    will run (a server's); each op's estimated time is then held to
    ``limits.max_node_seconds``."""
    if batch > limits.max_batch or seq > limits.max_seq:
        _fail(None, None, "input_size", f"input {batch}x{seq} exceeds "
              f"{limits.max_batch}x{limits.max_seq}", LimitExceeded)
    run = ShapeInference(vg, batch, seq, constants, limits, outputs, rates)
    for dn in vg.nodes:
        if on_node is not None:
            on_node()
        run.values[dn.id] = getattr(run, dn.kind)(dn)
    return run.finish()


class ShapeInference:
    """:func:`infer_shapes`' walk: one method per node kind returns the node's meta value
    (None for a write), checking the limits as it goes; :meth:`finish` checks the saves and
    the value to differentiate, and records the totals on the graph."""

    def __init__(self, vg: ValidatedGraph, batch: int, seq: int, constants: dict,
                 limits: Limits, outputs: dict | None, rates: DeviceRates | None = None):
        self.vg = vg
        self.rates = rates
        self.seq = seq
        self.limits = limits
        self.outputs = outputs
        self.metas = {tid: _meta_constant(t) for tid, t in constants.items()}
        self.values: dict[int, object] = {}
        self.total = self.flops = 0
        self.seconds = 0.0
        # Batch rows now (a narrowing write lowers them), at each site's read, and the
        # latest site read so far.
        self.rows, self.read_at, self.last_read = batch, {}, -1

    def _site_value(self, dn: DecodedNode) -> torch.Tensor:
        info = self.vg.site_infos[dn.site]
        return torch.empty(info.concrete_shape(self.rows, self.seq), dtype=info.dtype,
                           device="meta")

    # ---- one method per node kind (hookwire.ir.special) ----------------------------------
    def site_read(self, dn: DecodedNode):
        # Strided as the activation is (hookwire.site_layout), as the client traced it.
        out = self.vg.site_infos[dn.site].meta_value(self.rows, self.seq)
        self.read_at[dn.site], self.last_read = self.rows, max(self.last_read, dn.site)
        return out

    def site_grad(self, dn: DecodedNode):
        info = self.vg.site_infos[dn.site]
        if not info.grad:
            _fail(dn.id, dn.op, "no_grad_site", f"site {info.name!r} has no gradient: its "
                  f"value ({info.dtype}) does not depend on the model's weights")
        return self._site_value(dn)

    def output_read(self, dn: DecodedNode):
        if not self.outputs or dn.args[0] not in self.outputs:
            _fail(dn.id, dn.op, "output_kind", f"this model has no {dn.args[0]} output")
        shape, dtype = self.outputs[dn.args[0]]
        return torch.empty(shape, dtype=dtype, device="meta")

    def const_grad(self, dn: DecodedNode):
        const = self.metas[dn.args[0].tid]
        if not const.dtype.is_floating_point:
            _fail(dn.id, dn.op, "const_grad_dtype", f"constant {dn.args[0].tid!r} is "
                  f"{const.dtype}; only floating-point constants have gradients")
        return torch.empty(const.shape, dtype=const.dtype, device="meta")

    def site_write(self, dn: DecodedNode):
        info = self.vg.site_infos[dn.site]
        val = resolve(dn.args[1], self.values, self.metas)
        want = info.concrete_shape(self.read_at.get(dn.site, self.rows), self.seq)
        if dn.mode == "narrow" and isinstance(val, torch.Tensor) and val.dim() and \
                val.shape[0] <= want[0]:
            if info.shape[:1] != ("B",):
                _fail(dn.id, dn.op, "narrow_site", f"site {info.name!r} has no batch dim")
            if self.last_read > dn.site:
                _fail(dn.id, dn.op, "narrow_order", "a narrowing write must come before "
                      "any read of a later site")
            want = (val.shape[0],) + tuple(want[1:])
            self.rows = val.shape[0]
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != want or \
                val.dtype != info.dtype:
            got = (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else type(val)
            _fail(dn.id, dn.op, "write_shape", f"writes {got} into site "
                  f"{info.name!r}, which holds {want} {info.dtype}")
        return None

    def call_op(self, dn: DecodedNode):
        args = resolve(dn.args, self.values, self.metas)
        kwargs = {k: resolve(v, self.values, self.metas) for k, v in dn.kwargs.items()}
        self._tuple_use(dn, args)
        try:
            # Sized on meta first, even when small int constants are real (shape_probe);
            # the cost model of the op's registry entry prices it from the same shapes.
            out, cost = run_for_shape(dn.spec, args, kwargs, self.limits.max_value_bytes)
        except Exception as exc:  # the op itself refused these shapes/dtypes
            _fail(dn.id, dn.op, "shape_inference", f"{type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
        if isinstance(out, torch.Tensor) and out.device.type != "meta":
            out = out.to("meta")
        if isinstance(out, tuple) and not isinstance(out, torch.Tensor):
            out = tuple(out)
        self._charge(dn, _nbytes(out), cost)
        return out

    # ---- helpers of call_op ----------------------------------------------------------------
    def _tuple_use(self, dn: DecodedNode, args: tuple) -> None:
        """A multi-output value is used only through ``tuple_get``, with an index inside it."""
        if dn.op == "tuple_get":
            if not isinstance(dn.args[0], Ref) or not isinstance(args[0], tuple) or \
                    not -len(args[0]) <= args[1] < len(args[0]):
                _fail(dn.id, dn.op, "tuple_get", "needs a multi-output node and an "
                      "index inside it")
            return
        refs = walk_refs(dn.args, []) + walk_refs(tuple(dn.kwargs.values()), [])
        if any(isinstance(self.values[r], tuple) for r in refs):
            _fail(dn.id, dn.op, "tuple_value", "a multi-output value must be unpacked "
                  "with tuple_get before use")

    def _charge(self, dn: DecodedNode, size: int, cost) -> None:
        """Count one op's result bytes, flops and temporaries against the limits."""
        limits = self.limits
        if size > limits.max_value_bytes:
            _fail(dn.id, dn.op, "max_value_bytes", f"would allocate {size} bytes; limit "
                  f"{limits.max_value_bytes}", LimitExceeded)
        self.flops += cost.flops
        if self.flops > limits.max_flops:
            _fail(dn.id, dn.op, "max_flops", f"ops would take {self.flops:.3g} flops; "
                  f"limit {limits.max_flops:.3g}", LimitExceeded)
        # What torch allocates inside the op and frees before it returns (casts, copies,
        # broadcast products, sort buffers, workspaces) is an intermediate too.
        if cost.transient_bytes > limits.max_value_bytes:
            _fail(dn.id, dn.op, "max_transient_bytes", f"would allocate "
                  f"{cost.transient_bytes} bytes of temporaries inside the op; limit "
                  f"{limits.max_value_bytes}", LimitExceeded)
        if self.rates is not None:
            seconds = self.rates.seconds(cost)
            self.seconds += seconds
            if seconds > limits.max_node_seconds:
                _fail(dn.id, dn.op, "max_node_seconds", f"would run ~{seconds:.3g} s on this "
                      f"server's device as one op ({cost.flops:.3g} flops, "
                      f"{cost.transient_bytes} bytes of temporaries), which nothing can "
                      f"interrupt once it starts; limit {limits.max_node_seconds:g} s per op: "
                      "split the work into smaller ops (a slice of rows at a time)",
                      LimitExceeded)
        self.total += size
        if self.total + cost.transient_bytes > limits.max_total_value_bytes:
            _fail(dn.id, dn.op, "max_total_value_bytes", f"intermediates would total "
                  f"{self.total + cost.transient_bytes} bytes; limit "
                  f"{limits.max_total_value_bytes}", LimitExceeded)

    def finish(self) -> ValidatedGraph:
        vg, values = self.vg, self.values
        saved = 0
        for name, nid in vg.graph.saves.items():
            if not isinstance(values[nid], torch.Tensor):
                _fail(nid, None, "save_value", f"save {name[:64]!r} is not a single tensor")
            if values[nid].dtype not in DTYPE_NAMES:
                _fail(nid, None, "save_dtype", f"save {name[:64]!r} is {values[nid].dtype}, "
                      "which cannot be sent back; save x.real and x.imag, "
                      "torch.view_as_real(x) or x.abs() instead")
            saved += _nbytes(values[nid])
        if saved > self.limits.max_saved_bytes:
            _fail(None, None, "max_saved_bytes", f"saves total {saved} bytes; limit "
                  f"{self.limits.max_saved_bytes}", LimitExceeded)
        if vg.graph.backward is not None:
            target = values[vg.graph.backward]
            if not isinstance(target, torch.Tensor) or target.numel() != 1 or \
                    not target.dtype.is_floating_point:
                got = (tuple(target.shape), target.dtype) if isinstance(target, torch.Tensor) \
                    else type(target).__name__
                _fail(vg.graph.backward, None, "backward_scalar", f"the value to "
                      f"differentiate must be a floating-point scalar, got {got}")
        vg.shapes = values
        vg.saved_bytes = saved
        vg.value_bytes = self.total
        vg.flops = self.flops
        vg.seconds = self.seconds
        return vg
