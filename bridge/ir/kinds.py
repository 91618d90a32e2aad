"""The argument-kind language: how an op's signature says what each argument may be.

A signature is a comma-separated string of kind codes, one per positional argument::

    "t,ii|b"        a tensor, an int or tuple of ints, then optionally a bool
    "t,*t"          a tensor, then any number of tensors
    "t,tn?"         a tensor, then a tensor, a number or None

``?`` after a code also allows None; ``*code`` takes any number of that kind (varargs); the
codes after ``|`` are optional. Keyword arguments name their kind one by one
(``op(..., dim="ii?", keepdim="b")``). :data:`KINDS` is the table of codes -- what each
accepts, in words and as the test :func:`kind_matches` runs on a decoded argument
(:mod:`hookwire.ir.args`). :func:`check_args` checks a node's decoded arguments against a
signature before anything runs; registry ops (:class:`hookwire.ops.OpSpec`) and the special
ops (:data:`hookwire.ir.special.SPECIAL_OPS`) carry signatures of the same shape.
``docs/ops.md`` lists this table (``python -m hookwire.op_table``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from hookwire.ir.args import Const, Ref

_EQ_RE = re.compile(r"^[a-zA-Z ,.>\-]{1,128}$")
_S_RE = re.compile(r"^[a-zA-Z_]{1,40}$")
MAX_INT_TUPLE = 16      # ``ii``: a shape or a list of dims
MAX_TENSOR_TUPLE = 4096  # ``ts``: torch.cat's inputs and the like
MAX_INDEX_DEPTH = 3     # ``idx``: nesting of an index expression


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_tensor(v) -> bool:
    return isinstance(v, (Ref, Const))


def _is_number(v) -> bool:
    return isinstance(v, (int, float, bool))


def _is_index(v, depth=0) -> bool:
    if depth > MAX_INDEX_DEPTH:
        return False
    if v is None or v is Ellipsis or isinstance(v, (bool, int, slice)) or _is_tensor(v):
        return True
    if isinstance(v, tuple):
        return all(_is_index(x, depth + 1) for x in v)
    if isinstance(v, list):
        return all(_is_int(x) or isinstance(x, bool) for x in v) or all(
            _is_index(x, depth + 1) for x in v)
    return False


@dataclass(frozen=True)
class Kind:
    """One kind code: what it ``accepts`` (in words, for the docs) and the ``test`` run on a
    decoded argument."""
    code: str
    accepts: str
    test: Callable[[object], bool]


KINDS: dict[str, Kind] = {k.code: k for k in (
    Kind("t", "a tensor: a node's value or a constant", _is_tensor),
    Kind("n", "a number (int, float or bool)", _is_number),
    Kind("tn", "a tensor or a number", lambda v: _is_tensor(v) or _is_number(v)),
    Kind("i", "an int (not a bool)", _is_int),
    Kind("ii", f"an int, or a tuple or list of at most {MAX_INT_TUPLE} ints (a shape, dims)",
         lambda v: _is_int(v) or (isinstance(v, (tuple, list)) and len(v) <= MAX_INT_TUPLE
                                  and all(_is_int(x) for x in v))),
    Kind("b", "a bool", lambda v: isinstance(v, bool)),
    Kind("d", "a dtype (from the frame dtype allow-list)", lambda v: isinstance(v, torch.dtype)),
    Kind("idx", "an index expression: ints, bools, slices, `...`, None, index tensors, "
                f"tuples and lists of them (nested at most {MAX_INDEX_DEPTH} deep)", _is_index),
    Kind("ts", f"a tuple or list of 1 to {MAX_TENSOR_TUPLE} tensors",
         lambda v: isinstance(v, (tuple, list)) and 0 < len(v) <= MAX_TENSOR_TUPLE and all(
             _is_tensor(x) for x in v)),
    Kind("eq", "an einsum equation (letters, spaces, `,`, `.`, `->`; at most 128 characters)",
         lambda v: isinstance(v, str) and bool(_EQ_RE.match(v))),
    Kind("s", "a short name (letters and `_`, at most 40: a reduction, a mode)",
         lambda v: isinstance(v, str) and bool(_S_RE.match(v))),
    Kind("nps", 'a norm order: a number, "fro" or "nuc"',
         lambda v: isinstance(v, (int, float)) or (isinstance(v, str) and v in ("fro", "nuc"))),
    Kind("any", "anything in the argument vocabulary (a ref to a multi-output node is still "
                "refused: unpack it with `tuple_get`)", lambda v: True),
)}


def kind_matches(kind: str, v) -> bool:
    """Whether the decoded argument ``v`` fits the kind code ``kind`` (``?`` suffix: or None)."""
    if kind.endswith("?"):
        if v is None:
            return True
        kind = kind[:-1]
    entry = KINDS.get(kind)
    if entry is None:
        raise AssertionError(f"unknown kind {kind}")
    return entry.test(v)


def parse_signature(sig: str) -> tuple[tuple[str, ...], tuple[str, ...], str | None]:
    """``"t,ii|b,*t"`` -> (required kinds, optional kinds, varargs kind or None)."""
    required: list[str] = []
    optional: list[str] = []
    varargs: str | None = None
    target = required
    for part in [p.strip() for p in sig.replace("|", ",|,").split(",") if p.strip()]:
        if part == "|":
            target = optional
        elif part.startswith("*"):
            varargs = part[1:]
        else:
            target.append(part)
    return tuple(required), tuple(optional), varargs


def signature_text(signature: "Signed") -> str:
    """A parsed signature written back in the language: ``t,ii|b,*t; dim=ii?``."""
    parts = list(signature.required)
    if signature.optional:
        parts.append("|" + ",".join(signature.optional))
    if signature.varargs:
        parts.append("*" + signature.varargs)
    text = ",".join(parts).replace(",|", "|")
    if signature.kwargs:
        text += "; " + ", ".join(f"{k}={v}" for k, v in signature.kwargs.items())
    return text


def kind_codes(signature: "Signed") -> set[str]:
    """Every kind code a signature uses, without its ``?``."""
    kinds = [*signature.required, *signature.optional, *signature.kwargs.values()]
    if signature.varargs:
        kinds.append(signature.varargs)
    return {k.rstrip("?") for k in kinds}


class Signed(Protocol):
    """What :func:`check_args` reads: an op's signature, parsed. (Read-only members, so the
    frozen ``OpSpec`` and ``SpecialOp`` both fit.)"""
    @property
    def required(self) -> tuple[str, ...]: ...
    @property
    def optional(self) -> tuple[str, ...]: ...
    @property
    def varargs(self) -> str | None: ...
    @property
    def kwargs(self) -> dict[str, str]: ...


def check_args(spec: Signed, args: tuple, kwargs: dict) -> str | None:
    """None if the arguments fit the op's signature, else the reason they do not."""
    n_fixed = len(spec.required) + len(spec.optional)
    if len(args) < len(spec.required):
        return f"needs at least {len(spec.required)} arguments, got {len(args)}"
    if spec.varargs is None and len(args) > n_fixed:
        return f"takes at most {n_fixed} arguments, got {len(args)}"
    kinds = list(spec.required) + list(spec.optional)
    for i, a in enumerate(args):
        kind = kinds[i] if i < len(kinds) else spec.varargs
        assert kind is not None  # extra arguments without varargs were refused above
        if not kind_matches(kind, a):
            return f"argument {i} does not fit kind {kind!r}"
    for k, v in kwargs.items():
        if k not in spec.kwargs:
            return f"keyword {k!r} is not accepted (accepted: {sorted(spec.kwargs)})"
        if not kind_matches(spec.kwargs[k], v):
            return f"keyword {k!r} does not fit kind {spec.kwargs[k]!r}"
    return None
