"""The registry as a document: ``docs/ops.md`` is this module's output -- every op with its
spellings, signature and cost model, the special ops and the argument kinds
(``python -m hookwire.op_table > docs/ops.md``; ``tests/test_op_costs.py`` checks it is
current), so the list of supported spellings and their cost models cannot go stale."""
from __future__ import annotations

from hookwire.ir.kinds import KINDS, signature_text
from hookwire.ir.special import SPECIAL_OPS
from hookwire.op_advice import display_name
from hookwire.op_costs import (Copy, CostModel, Formula, Linalg, Pointwise, Reduction,
                               Sorting)
from hookwire.ops import INPLACE_OPS, OPS

HEADER = """# Operations a remote hook may use

Generated from the registry (`hookwire.ops.OPS`) by `python -m hookwire.op_table`; do not
edit by hand. {count} ops. Each traces from the spellings listed (in-place forms such as
`x.add_(y)` or `x[i] = v` trace to the same op and rebind the edited tensor), has the
signature its arguments are checked against on the server ([argument kinds](#argument-kinds),
below) and carries the cost model the server prices it with before anything runs
(`hookwire.op_costs`: flops and the bytes torch allocates inside the op; SECURITY.md,
"Exhausting memory, CPU or the queue"). The [special ops](#special-ops) that read and write
the model follow the table.

Randomness: `torch.randn_like`, `rand_like`, `randint_like`, in-place fills (`normal_`,
`uniform_`, `bernoulli_(p)`, ...) and `F.dropout` / `nn.Dropout` in training mode are drawn
on your machine while tracing, from your generator, exactly as a local CPU run draws them, and
sent as constants: the remote result equals the local one and your RNG state afterwards is
the same. `hookwire.randn_like(x, seed)` / `hookwire.rand_like(x, seed)` draw on the server
instead (nothing uploaded; the same numbers locally and remotely, not torch's). Draws whose
distribution depends on values (`torch.bernoulli(p)`, `torch.normal(mean, std)`,
`multinomial`) are refused with the spelling to use instead.

Anything else is refused while tracing, naming the function and the nearest supported
spelling.

| op | spellings | signature | cost model |
|---|---|---|---|
"""

SPECIAL_HEADER = """
## Special ops

Nodes that touch the model or the backward pass instead of computing
(`hookwire.ir.special.SPECIAL_OPS`); the tracers emit them, a hook never spells them.

| op | signature | stage | what |
|---|---|---|---|
"""

KINDS_HEADER = """
## Argument kinds

Signatures list one kind code per positional argument (`hookwire.ir.kinds.KINDS`): `?` after
a code also allows None, `*code` takes any number of that kind, codes after `|` are optional,
and keyword arguments follow `;` as `name=code`.

| kind | accepts |
|---|---|
"""


def _model(cost: CostModel) -> str:
    if isinstance(cost, Pointwise):
        return f"pointwise, {cost.k:g} flop/element" + (f", {cost.temps:g} temporaries"
                                                        if cost.temps else "")
    if isinstance(cost, Reduction):
        return f"reduction, {cost.k:g} flop/element read"
    if isinstance(cost, Sorting):
        return "selection" if cost.select else "sort"
    if isinstance(cost, Linalg):
        return f"decomposition ({cost.decomposition})"
    if isinstance(cost, Copy):
        return "copy"
    if isinstance(cost, Formula):
        return cost.label
    return cost.kind


def _signature(spec) -> str:
    # GitHub tables split cells at "|" even inside code spans, unless escaped.
    return "`" + signature_text(spec).replace("|", "\\|") + "`"


def markdown() -> str:
    inplace: dict[str, list[str]] = {}
    for func, name in INPLACE_OPS.items():
        inplace.setdefault(name, []).append(display_name(func))
    rows = []
    for name in sorted(OPS):
        spec = OPS[name]
        spellings = sorted({display_name(f) for f in spec.clients} |
                           set(inplace.get(name, ())))
        shown = ", ".join(f"`{s}`" for s in spellings) or "(built by the tracer)"
        rows.append(f"| `{name}` | {shown} | {_signature(spec)} | {_model(spec.cost)} |")
    special = [f"| `{s.name}` | {_signature(s)} | {s.stage} | {s.what} |"
               for s in SPECIAL_OPS.values()]
    kinds = [f"| `{k.code}` | {k.accepts} |" for k in KINDS.values()]
    return (HEADER.format(count=len(OPS)) + "\n".join(rows) + "\n" + SPECIAL_HEADER +
            "\n".join(special) + "\n" + KINDS_HEADER + "\n".join(kinds) + "\n")


if __name__ == "__main__":
    print(markdown(), end="")
