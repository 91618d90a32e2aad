"""Everything the server checks before a single op runs.

Structure (ids unique, refs point backwards so the graph is acyclic, ops registered, args
fit their schema, sites exist and are listed in firing order), then shapes and dtypes by
running every op on the meta device, which also bounds memory before a byte is allocated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hookwire.errors import GraphValidationError, LimitExceeded
from hookwire.frames import DTYPE_NAMES
from hookwire.graph import Const, Graph, Ref, decode_arg, is_parameter
from hookwire.ops import OPS, OpSpec, check_args
from hookwire.shape_probe import run_for_shape

SPECIAL = ("site.read", "site.write", "site.grad")
# "narrow": replace the site's value by its first k batch rows; the rest of the forward runs on
# those rows only (rows a graph no longer needs, e.g. pyvene's source rows, stop computing).
WRITE_MODES = ("replace", "inplace", "narrow")
OUTPUT_KINDS = {"logits": ("logits", "both"), "loss": ("loss", "both")}  # kind -> return types


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
    max_total_value_bytes: int = 16 << 30  # all intermediates together (upper bound)
    max_batch: int = 1024
    # What the model's own forward makes for one request (its logits, and attention weights
    # when asked for), sent back or not: batch and sequence alone would let a request of
    # 1024 x 1024 tokens make 200 GB of GPT-2 logits.
    max_output_bytes: int = 2 << 30
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
    # Seconds of the front's time (reading, parsing, admitting, answering messages) each
    # user may spend per second; over it, its connections' next reads wait.
    front_share: float = 0.25


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


def flat_dim(k: int) -> str:
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

    def concrete_shape(self, batch: int, seq: int) -> tuple[int, ...]:
        return tuple(batch if d == "B" else seq if d == "S" else
                     batch * seq * flat_factor(d) if flat_factor(d) else d for d in self.shape)

    @property
    def flattened(self) -> bool:
        """Batch and sequence share one dim: a request's rows are not a block of it once
        requests of different lengths are padded together (such requests run alone)."""
        return any(flat_factor(d) for d in self.shape)


@dataclass
class DecodedNode:
    """A node after :func:`validate_structure`: arguments decoded (``Ref``/``Const``
    placeholders), its registry entry (``spec``; None for special ops), and the *stage* it
    runs at -- the latest stage of anything it depends on."""
    id: int
    op: str
    args: tuple
    kwargs: dict
    spec: OpSpec | None
    # When the node can run: -1 before the forward, k at site k, len(sites) once the
    # forward's output exists, len(sites) + 1 after the backward pass.
    stage: int = -1
    site: int | None = None    # for site.read / site.write
    mode: str | None = None    # for site.write


@dataclass
class ValidatedGraph:
    """The server's form of a graph: the wire :class:`~hookwire.graph.Graph`, its decoded
    nodes, the :class:`SiteInfo` of each listed site, and -- after :func:`infer_shapes` --
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

    @property
    def output_stage(self) -> int:
        return len(self.site_infos)

    @property
    def grad_stage(self) -> int:
        return len(self.site_infos) + 1


def _fail(node_id, op, rule, message, cls=GraphValidationError):
    where = f"node {node_id} ({op})" if node_id is not None else "graph"
    raise cls(f"{where}: {message}", node=node_id, op=op, rule=rule)


def walk_refs(value, out: list) -> list:
    """Append to ``out`` the node id of every ``Ref`` in a decoded argument (nested tuples,
    lists and slice bounds included) and return ``out``: the edges of the graph, as the
    validator and the executor both read them."""
    if isinstance(value, Ref):
        out.append(value.node)
    elif isinstance(value, (tuple, list)):
        for v in value:
            walk_refs(v, out)
    elif isinstance(value, slice):
        for v in (value.start, value.stop, value.step):
            walk_refs(v, out)
    return out


def _walk_consts(value, out: list):
    if isinstance(value, Const):
        out.append(value.tid)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _walk_consts(v, out)
    return out


def validate_structure(graph: Graph, site_table: dict[tuple[str, int], SiteInfo],
                       site_order: dict[tuple[str, int], int], limits: Limits
                       ) -> ValidatedGraph:
    if len(graph.nodes) > limits.max_nodes:
        _fail(None, None, "max_nodes", f"{len(graph.nodes)} nodes; limit {limits.max_nodes}",
              LimitExceeded)
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
    constants = set(graph.constants)
    if len(constants) != len(graph.constants):
        _fail(None, None, "constants", "a constant id is declared twice")
    decoded: list[DecodedNode] = []
    by_id: dict[int, DecodedNode] = {}
    reads, writes, grads, outputs_read, const_grads = set(), set(), set(), set(), set()
    for node in graph.nodes:
        where = f"node {node.id} ({node.op})"
        if node.id in by_id:
            _fail(node.id, node.op, "unique_id", "node id used twice")
        args = tuple(decode_arg(a, where) for a in node.args)
        kwargs = {str(k)[:64]: decode_arg(v, where) for k, v in node.kwargs.items()}
        dn = DecodedNode(node.id, node.op, args, kwargs, None)
        if node.op == "output.read":
            kind = args[0] if len(args) == 1 and not kwargs else None
            if not isinstance(kind, str) or kind not in OUTPUT_KINDS:
                _fail(node.id, node.op, "args", f"output.read takes one of {list(OUTPUT_KINDS)}")
            if graph.forward.return_type not in OUTPUT_KINDS[kind]:
                _fail(node.id, node.op, "output_kind", f"reads the forward's {kind}, but the "
                      f"forward's return_type is {graph.forward.return_type!r}")
            if kind in outputs_read:
                _fail(node.id, node.op, "output_read_once", f"{kind} read twice")
            outputs_read.add(kind)
            dn.stage = len(graph.sites)
        elif node.op == "const.grad":
            # The gradient of Graph.backward with respect to an attached constant: what a
            # client needs to train its own parameters (pyvene's rotations) through the
            # served model. The weights are never a target, only the request's own tensors.
            tid = args[0].tid if len(args) == 1 and isinstance(args[0], Const) and \
                not kwargs else None
            if tid is None:
                _fail(node.id, node.op, "args", "const.grad takes exactly one constant")
            if graph.backward is None:
                _fail(node.id, node.op, "grad_without_backward", "reads a gradient, but "
                      "the graph names no value to differentiate (backward)")
            if tid in const_grads:
                _fail(node.id, node.op, "const_grad_once", "gradient of a constant read twice")
            if is_parameter(tid):
                _fail(node.id, node.op, "const_grad_parameter", "the model's weights are never "
                      "differentiated")
            const_grads.add(tid)
            dn.stage = len(graph.sites) + 1
        elif node.op in SPECIAL:
            if not args or not isinstance(args[0], int) or isinstance(args[0], bool) or \
                    not 0 <= args[0] < len(graph.sites):
                _fail(node.id, node.op, "site_index", "first argument must be a site index")
            dn.site = args[0]
            if node.op == "site.read":
                if len(args) != 1 or kwargs:
                    _fail(node.id, node.op, "args", "site.read takes exactly a site index")
                if dn.site in reads:
                    _fail(node.id, node.op, "site_read_once", "site read twice")
                reads.add(dn.site)
                dn.stage = dn.site
            elif node.op == "site.grad":
                if len(args) != 1 or kwargs:
                    _fail(node.id, node.op, "args", "site.grad takes exactly a site index")
                if graph.backward is None:
                    _fail(node.id, node.op, "grad_without_backward", "reads a gradient, but "
                          "the graph names no value to differentiate (backward)")
                if dn.site in grads:
                    _fail(node.id, node.op, "site_grad_once", "gradient of a site read twice")
                grads.add(dn.site)
                dn.stage = len(graph.sites) + 1
            else:
                mode = kwargs.get("mode", "replace")
                if len(args) != 2 or not isinstance(args[1], (Ref, Const)) or \
                        set(kwargs) - {"mode"} or mode not in WRITE_MODES:
                    _fail(node.id, node.op, "args", "site.write takes (site, tensor) and "
                          f"mode in {WRITE_MODES}")
                if (dn.site, mode) in writes or (dn.site, {"replace": "narrow", "narrow":
                                                         "replace"}.get(mode)) in writes:
                    _fail(node.id, node.op, "site_write_once", f"site written twice ({mode})")
                writes.add((dn.site, mode))
                dn.mode = mode
        else:
            spec = OPS.get(node.op)
            if spec is None:
                _fail(node.id, node.op, "unknown_op", f"op {node.op[:64]!r} is not in the "
                      "registry of allowed operations")
            reason = check_args(spec, args, kwargs)
            if reason:
                _fail(node.id, node.op, "op_schema", reason)
            dn.spec = spec
        refs = walk_refs(args, []) + walk_refs(tuple(kwargs.values()), [])
        stage = dn.stage
        for r in refs:
            if r not in by_id:
                _fail(node.id, node.op, "ref_order", f"refers to node {r}, which is not "
                      "defined before it (graphs are topologically ordered; cycles refused)")
            stage = max(stage, by_id[r].stage)
        for tid in _walk_consts(args, []) + _walk_consts(tuple(kwargs.values()), []):
            if tid not in constants:
                _fail(node.id, node.op, "const_ref", f"refers to undeclared constant {tid!r}")
        if node.op == "site.write" and stage > dn.site:
            _fail(node.id, node.op, "write_stage", f"writes site {dn.site} with a value that "
                  f"depends on site {stage}, which fires later")
        dn.stage = stage if node.op != "site.write" else dn.site
        decoded.append(dn)
        by_id[node.id] = dn
    for name, nid in graph.saves.items():
        if nid not in by_id:
            _fail(None, None, "save_ref", f"save {name[:64]!r} refers to unknown node {nid}")
    if graph.backward is not None:
        if graph.backward not in by_id:
            _fail(None, None, "backward_ref", f"backward refers to unknown node {graph.backward}")
        if by_id[graph.backward].stage > len(graph.sites):
            _fail(graph.backward, by_id[graph.backward].op, "backward_stage",
                  "the value to differentiate cannot depend on gradients")
    return ValidatedGraph(graph, decoded, site_infos)


def resolve(value, values: dict, constants: dict):
    if isinstance(value, Ref):
        return values[value.node]
    if isinstance(value, Const):
        return constants[value.tid]
    if isinstance(value, tuple):
        return tuple(resolve(v, values, constants) for v in value)
    if isinstance(value, list):
        return [resolve(v, values, constants) for v in value]
    return value


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
                 on_node=None) -> ValidatedGraph:
    """Run the graph on the meta device: shapes, dtypes and byte counts, nothing allocated.

    ``outputs`` gives the (shape, dtype) of the forward's ``logits`` and ``loss`` for
    ``output.read`` nodes; ``on_node()`` is called before each node (it may raise: a
    request's deadline covers its validation too)."""
    if batch > limits.max_batch or seq > limits.max_seq:
        _fail(None, None, "input_size", f"input {batch}x{seq} exceeds "
              f"{limits.max_batch}x{limits.max_seq}", LimitExceeded)
    metas = {tid: _meta_constant(t) for tid, t in constants.items()}
    values: dict[int, object] = {}
    total = flops = 0
    rows, read_at, last_read = batch, {}, -1  # batch rows now, at each site's read
    for dn in vg.nodes:
        if on_node is not None:
            on_node()
        if dn.op in ("site.read", "site.grad"):
            info = vg.site_infos[dn.site]
            if dn.op == "site.grad" and not info.grad:
                _fail(dn.id, dn.op, "no_grad_site", f"site {info.name!r} has no gradient: its "
                      f"value ({info.dtype}) does not depend on the model's weights")
            if dn.op == "site.read":
                read_at[dn.site], last_read = rows, max(last_read, dn.site)
            out = torch.empty(info.concrete_shape(rows, seq), dtype=info.dtype, device="meta")
        elif dn.op == "output.read":
            if not outputs or dn.args[0] not in outputs:
                _fail(dn.id, dn.op, "output_kind", f"this model has no {dn.args[0]} output")
            shape, dtype = outputs[dn.args[0]]
            out = torch.empty(shape, dtype=dtype, device="meta")
        elif dn.op == "const.grad":
            const = metas[dn.args[0].tid]
            if not const.dtype.is_floating_point:
                _fail(dn.id, dn.op, "const_grad_dtype", f"constant {dn.args[0].tid!r} is "
                      f"{const.dtype}; only floating-point constants have gradients")
            out = torch.empty(const.shape, dtype=const.dtype, device="meta")
        elif dn.op == "site.write":
            info = vg.site_infos[dn.site]
            val = resolve(dn.args[1], values, metas)
            want = info.concrete_shape(read_at.get(dn.site, rows), seq)
            if dn.mode == "narrow" and isinstance(val, torch.Tensor) and val.dim() and \
                    val.shape[0] <= want[0]:
                if info.shape[:1] != ("B",):
                    _fail(dn.id, dn.op, "narrow_site", f"site {info.name!r} has no batch dim")
                if last_read > dn.site:
                    _fail(dn.id, dn.op, "narrow_order", "a narrowing write must come before "
                          "any read of a later site")
                want = (val.shape[0],) + tuple(want[1:])
                rows = val.shape[0]
            if not isinstance(val, torch.Tensor) or tuple(val.shape) != want or \
                    val.dtype != info.dtype:
                got = (tuple(val.shape), val.dtype) if isinstance(val, torch.Tensor) else type(val)
                _fail(dn.id, dn.op, "write_shape", f"writes {got} into site "
                      f"{info.name!r}, which holds {want} {info.dtype}")
            out = None
        else:
            args = resolve(dn.args, values, metas)
            kwargs = {k: resolve(v, values, metas) for k, v in dn.kwargs.items()}
            refs = walk_refs(dn.args, []) + walk_refs(tuple(dn.kwargs.values()), [])
            if dn.op == "tuple_get":
                if not isinstance(dn.args[0], Ref) or not isinstance(args[0], tuple) or \
                        not -len(args[0]) <= args[1] < len(args[0]):
                    _fail(dn.id, dn.op, "tuple_get", "needs a multi-output node and an "
                          "index inside it")
            elif any(isinstance(values[r], tuple) for r in refs):
                _fail(dn.id, dn.op, "tuple_value", "a multi-output value must be unpacked "
                      "with tuple_get before use")
            try:
                # Sized on meta first, even when small int constants are real (shape_probe);
                # the cost model of the op's registry entry prices it from the same shapes.
                out, cost = run_for_shape(dn.spec, args, kwargs, limits.max_value_bytes)
            except Exception as exc:  # the op itself refused these shapes/dtypes
                _fail(dn.id, dn.op, "shape_inference", f"{type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:300] if str(exc) else ''}")
            if isinstance(out, torch.Tensor) and out.device.type != "meta":
                out = out.to("meta")
            if isinstance(out, tuple) and not isinstance(out, torch.Tensor):
                out = tuple(out)
            size = _nbytes(out)
            if size > limits.max_value_bytes:
                _fail(dn.id, dn.op, "max_value_bytes", f"would allocate {size} bytes; limit "
                      f"{limits.max_value_bytes}", LimitExceeded)
            flops += cost.flops
            if flops > limits.max_flops:
                _fail(dn.id, dn.op, "max_flops", f"ops would take {flops:.3g} flops; "
                      f"limit {limits.max_flops:.3g}", LimitExceeded)
            # What torch allocates inside the op and frees before it returns (casts, copies,
            # broadcast products, sort buffers, workspaces) is an intermediate too.
            if cost.transient_bytes > limits.max_value_bytes:
                _fail(dn.id, dn.op, "max_transient_bytes", f"would allocate "
                      f"{cost.transient_bytes} bytes of temporaries inside the op; limit "
                      f"{limits.max_value_bytes}", LimitExceeded)
            total += size
            if total + cost.transient_bytes > limits.max_total_value_bytes:
                _fail(dn.id, dn.op, "max_total_value_bytes", f"intermediates would total "
                      f"{total + cost.transient_bytes} bytes; limit "
                      f"{limits.max_total_value_bytes}", LimitExceeded)
        values[dn.id] = out
    saved = 0
    for name, nid in vg.graph.saves.items():
        if not isinstance(values[nid], torch.Tensor):
            _fail(nid, None, "save_value", f"save {name[:64]!r} is not a single tensor")
        if values[nid].dtype not in DTYPE_NAMES:
            _fail(nid, None, "save_dtype", f"save {name[:64]!r} is {values[nid].dtype}, which "
                  "cannot be sent back; save x.real and x.imag, torch.view_as_real(x) or "
                  "x.abs() instead")
        saved += _nbytes(values[nid])
    if saved > limits.max_saved_bytes:
        _fail(None, None, "max_saved_bytes", f"saves total {saved} bytes; limit "
              f"{limits.max_saved_bytes}", LimitExceeded)
    if vg.graph.backward is not None:
        target = values[vg.graph.backward]
        if not isinstance(target, torch.Tensor) or target.numel() != 1 or \
                not target.dtype.is_floating_point:
            got = (tuple(target.shape), target.dtype) if isinstance(target, torch.Tensor) \
                else type(target).__name__
            _fail(vg.graph.backward, None, "backward_scalar", f"the value to differentiate "
                  f"must be a floating-point scalar, got {got}")
    vg.shapes = values
    vg.saved_bytes = saved
    vg.value_bytes = total
    vg.flops = flops
    return vg
