"""The special ops: the few nodes that touch the model or the autograd pass instead of
computing, in one table beside the op registry.

Every other op is an entry of :data:`hookwire.ops.OPS` and runs its torch callable. A special
op has no callable: each pass over a graph handles it with a method of its own, named by the
op's ``kind``, as ``torch.fx.Interpreter`` runs ``getattr(self, node.op)``:

* the structure check (``hookwire.validate``, before anything runs),
* shape inference on the meta device (``hookwire.validate``),
* execution alongside the forward (:class:`hookwire.executor.Interleaver`).

Registry ops have the kind :data:`CALL_OP`, so each pass has one ``call_op`` method for all
of them. Adding a special op is a row here and one method in each pass
(``tests/test_ir.py`` checks every pass has one for every kind).

A :class:`SpecialOp` has the registry's signature shape (``required``/``optional``/
``varargs``/``kwargs`` in the kind codes of :mod:`hookwire.ir.kinds`, checked by the same
``check_args``) plus what only these ops have: the stage they are pinned to
(:mod:`hookwire.ir.stages`), whether their first argument is a site index, and the usage line
a misfit is refused with.
"""
from __future__ import annotations

from dataclasses import dataclass

from hookwire.ir.kinds import parse_signature
from hookwire.ir.stages import GRADIENT, OUTPUT, SITE

SITE_READ = "site.read"
SITE_WRITE = "site.write"
SITE_GRAD = "site.grad"
OUTPUT_READ = "output.read"
CONST_GRAD = "const.grad"

CALL_OP = "call_op"  # the kind of every registry op: run its torch callable

# How a site.write applies its value. "narrow": replace the site's value by its first k batch
# rows; the rest of the forward runs on those rows only (rows a graph no longer needs, e.g.
# pyvene's source rows, stop computing).
WRITE_MODES = ("replace", "inplace", "narrow")
# output.read's argument -> the forward return types that produce it.
OUTPUT_KINDS = {"logits": ("logits", "both"), "loss": ("loss", "both")}


@dataclass(frozen=True)
class SpecialOp:
    """One special op: its wire ``name``; ``kind``, the name of the method each pass handles
    it with; its signature (as :class:`hookwire.ops.OpSpec`'s); the ``stage`` kind it runs
    at (``site``: its site's stage); ``site_arg``: its first argument is a site index;
    ``pinned``: it runs exactly at that stage, so its inputs must exist by then (a write
    cannot wait for a later site); ``usage``: the refusal when its arguments misfit;
    ``what``: one line for the docs."""
    name: str
    kind: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    varargs: str | None
    kwargs: dict[str, str]
    stage: str
    site_arg: bool
    pinned: bool
    usage: str
    what: str


def _special(name: str, sig: str, *, stage: str, usage: str, what: str, site_arg=False,
             pinned=False, **kwargs: str) -> SpecialOp:
    required, optional, varargs = parse_signature(sig)
    return SpecialOp(name, name.replace(".", "_"), required, optional, varargs, dict(kwargs),
                     stage, site_arg, pinned, usage, what)


SPECIAL_OPS: dict[str, SpecialOp] = {s.name: s for s in (
    _special(SITE_READ, "i", stage=SITE, site_arg=True,
             usage="site.read takes exactly a site index",
             what="the activation at the site (at most once per site)"),
    _special(SITE_WRITE, "i,t", stage=SITE, site_arg=True, pinned=True, mode="s",
             usage=f"site.write takes (site, tensor) and mode in {WRITE_MODES}",
             what="the model goes on with the value: `replace` (default), `inplace` (copied "
                  "into the activation) or `narrow` (its first k batch rows replace the "
                  "site and the rest of the forward runs on those rows only)"),
    _special(OUTPUT_READ, "s", stage=OUTPUT,
             usage=f"output.read takes one of {list(OUTPUT_KINDS)}",
             what='the forward\'s `"logits"` or `"loss"`, once it exists (must match '
                  "`ForwardSpec.return_type`; each read once)"),
    _special(SITE_GRAD, "i", stage=GRADIENT, site_arg=True,
             usage="site.grad takes exactly a site index",
             what="the gradient of `Graph.backward` at the site (at most once per site)"),
    _special(CONST_GRAD, "t", stage=GRADIENT,
             usage="const.grad takes exactly one constant",
             what="the gradient of `Graph.backward` with respect to one of the request's own "
                  "constants (how a client trains its parameters through the served model; "
                  "never a weight)"),
)}

# Every node kind a pass must handle: one per special op, and the registry's.
NODE_KINDS = tuple(s.kind for s in SPECIAL_OPS.values()) + (CALL_OP,)


def node_kind(op: str) -> str:
    """The kind of a node running ``op``: the name of the method each pass dispatches to."""
    special = SPECIAL_OPS.get(op)
    return CALL_OP if special is None else special.kind
