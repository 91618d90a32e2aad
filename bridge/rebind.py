"""After a remote run: put the real tensors where the user's code stored the traced ones.

A hook that did ``cache[hook.name] = act`` left a Proxy in ``cache``. We find every container
still holding it (dicts -- including objects' ``__dict__`` and ActivationCache's dict --, lists,
closure cells, objects' attributes and slots, and tuples inside those) and swap in the tensor
that came back. ``gc.get_referrers`` walks the whole heap, so it is called once for all
proxies together, not once per proxy.

That walk costs tens of milliseconds in a client that has torch, TL and pyvene imported, a
large share of a small model's remote call. So :func:`rebind` first looks where the hooks
themselves can reach (``roots``: the hook functions and hook points; from a function, its
closure, defaults and the globals its code names), and counts what it replaced: the
replacements of each proxy must number the user references
:meth:`hookwire.trace.Tracer.escaped` counted by reference count when the run was traced.
Only otherwise does it walk the heap, for the proxies still held somewhere else.
"""
from __future__ import annotations

import functools
import gc
import types

_MAX_TUPLE_DEPTH = 4


def _holders(objs, skip_ids: set) -> list:
    return [h for h in gc.get_referrers(*objs)
            if id(h) not in skip_ids and not isinstance(h, types.FrameType)]


_REPLACED: dict | None = None  # old id -> replacements made, while rebind counts them (ids of
# other threads' proxies landing here are never looked up: harmless)


def _count(value) -> int:
    if _REPLACED is not None:
        _REPLACED[id(value)] = _REPLACED.get(id(value), 0) + 1
    return 1


def _replace_in(holder, mapping: dict, skip_ids: set, depth: int) -> int:
    """Replace, inside ``holder``, every object whose id is a key of ``mapping``."""
    done = 0
    if isinstance(holder, dict):
        for key, value in list(holder.items()):
            new = mapping.get(id(value))
            if new is not None and new[0] is value:
                holder[key] = new[1]
                done += _count(value)
    elif isinstance(holder, list):
        for i, value in enumerate(holder):
            new = mapping.get(id(value))
            if new is not None and new[0] is value:
                holder[i] = new[1]
                done += _count(value)
    elif isinstance(holder, types.CellType):
        try:
            value = holder.cell_contents
        except ValueError:
            return 0
        new = mapping.get(id(value))
        if new is not None and new[0] is value:
            holder.cell_contents = new[1]
            done += _count(value)
    elif _rebuildable_tuple(holder):
        if depth < _MAX_TUPLE_DEPTH:
            done += _replace_in_tuple(holder, mapping, skip_ids, depth)
    else:
        done += _replace_attributes(holder, mapping)
    return done


def _replace_attributes(holder, mapping: dict) -> int:
    """Objects whose attributes live inline (CPython 3.11+ does not materialize ``__dict__``
    until asked, so gc reports the object itself) or in ``__slots__``."""
    if type(holder).__module__.startswith("hookwire.") or isinstance(holder, type):
        return 0  # our own tracing objects and classes are not the user's containers
    done = 0
    attrs = getattr(holder, "__dict__", None)  # materializes inline attributes
    if isinstance(attrs, dict):
        done += _replace_in(attrs, mapping, set(), _MAX_TUPLE_DEPTH)
    for cls in type(holder).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            try:
                value = getattr(holder, slot)
            except (AttributeError, TypeError):
                continue
            new = mapping.get(id(value))
            if new is not None and new[0] is value:
                setattr(holder, slot, new[1])
                done += _count(value)
    return done


def _rebuildable_tuple(holder) -> bool:
    """A tuple, a named tuple, or one of torch's named result tuples (``torch.topk``'s
    ``values, indices``, ``x.max(dim)``'s): rebuilt with the new values by
    :func:`_replace_in_tuple`."""
    cls = type(holder)
    return cls is tuple or (isinstance(holder, tuple) and (
        hasattr(cls, "_make") or cls.__module__ == "torch.return_types"))


def _replace_in_tuple(holder, mapping, skip_ids, depth) -> int:
    """Tuples are immutable: build the new one and put it where the old one was."""
    items = [mapping[id(v)][1] if id(v) in mapping and mapping[id(v)][0] is v else v
             for v in holder]
    cls = type(holder)
    new_tuple = tuple(items) if cls is tuple else \
        cls._make(items) if hasattr(cls, "_make") else cls(items)
    pair = (holder, new_tuple)
    outer_map = {id(holder): pair}
    skip_ids = skip_ids | {id(new_tuple), id(pair), id(outer_map)}
    done = 0
    for outer in _holders([holder], skip_ids):
        done += _replace_in(outer, outer_map, skip_ids, depth + 1)
    return done


def rebuilt(value, new_by_id: dict, depth: int = 0):
    """``value`` with the objects whose ids ``new_by_id`` maps replaced, rebuilding tuples
    (named and torch's result tuples too, nested up to the depth :func:`rebind` follows);
    ``value`` itself when nothing in it changes. For a tuple held where :func:`rebind`
    cannot write back -- a function's fast local variable."""
    if id(value) in new_by_id:
        return new_by_id[id(value)]
    if depth >= _MAX_TUPLE_DEPTH or not _rebuildable_tuple(value):
        return value
    items = [rebuilt(v, new_by_id, depth + 1) for v in value]
    if all(new is old for new, old in zip(items, value)):
        return value
    cls = type(value)
    return tuple(items) if cls is tuple else \
        cls._make(items) if hasattr(cls, "_make") else cls(items)


_MAX_REACH_DEPTH = 12
_MAX_REACH_OBJECTS = 20_000


def _reachable(roots, skip_ids: set, opaque: tuple = ()):
    """Containers the hooks can reach, breadth first and bounded, one list per level (the
    nearest first, so a caller can stop once it found what it looks for): functions lead
    to their closure cells, defaults and the globals their code names (and, through those,
    to the functions they call); partials and bound methods to what they wrap; dicts,
    lists, tuples, cells and plain objects to what they hold -- except instances of
    ``opaque`` (models: large, and never where user code keeps a traced value; if one is,
    the count check of :func:`rebind` sends it to the heap walk)."""
    seen = set(skip_ids)
    found, frontier = 0, list(roots)
    for _ in range(_MAX_REACH_DEPTH):
        nxt: list = []
        out: list = []
        for obj in frontier:
            if id(obj) in seen or found + len(out) >= _MAX_REACH_OBJECTS or \
                    (opaque and isinstance(obj, opaque)):
                continue
            seen.add(id(obj))
            if isinstance(obj, (types.FunctionType, types.MethodType, functools.partial)):
                nxt.extend(_callable_parts(obj))
            elif isinstance(obj, (dict, list, tuple, types.CellType)):
                out.append(obj)
                if not isinstance(obj, types.CellType) and len(obj) > 50_000:
                    continue  # replaced in, not searched through
                if isinstance(obj, dict):
                    nxt.extend(obj.values())
                elif isinstance(obj, types.CellType):
                    nxt.extend(_cell_contents(obj))
                else:
                    nxt.extend(obj)
            elif not isinstance(obj, (type, types.ModuleType, str, bytes, int, float)) and \
                    not type(obj).__module__.startswith(("torch", "hookwire.")):
                out.append(obj)  # a user object: its attributes (or slots)
                attrs = getattr(obj, "__dict__", None)
                if isinstance(attrs, dict):
                    nxt.extend(attrs.values())
            elif isinstance(ctx := _own_attribute(obj, "ctx"), dict):
                nxt.append(ctx)  # a TL hook point: hook.ctx is the user's
        found += len(out)
        yield out
        del out
        if not nxt:
            return
        frontier = nxt


def _own_attribute(obj, name: str):
    """``obj.name`` where the instance itself holds it (None otherwise), read without running
    a ``__getattr__``: a stand-in such as :class:`hookwire.nnsight.NotSent` (in a
    ``tracer.cache()``) raises on any attribute a block reads."""
    attrs = getattr(obj, "__dict__", None)
    return attrs.get(name) if isinstance(attrs, dict) else None


def _cell_contents(cell) -> list:
    try:
        return [cell.cell_contents]
    except ValueError:
        return []


def _callable_parts(fn) -> list:
    if isinstance(fn, functools.partial):
        return [fn.func, *fn.args, *fn.keywords.values()]
    if isinstance(fn, types.MethodType):
        return [fn.__func__, fn.__self__]
    parts = list(fn.__closure__ or ()) + list(fn.__defaults__ or ()) + \
        list((fn.__kwdefaults__ or {}).values())
    names = set(fn.__code__.co_names)
    for const in fn.__code__.co_consts:  # names used by nested functions and lambdas
        if isinstance(const, types.CodeType):
            names.update(const.co_names)
    parts.extend(fn.__globals__[n] for n in names if n in fn.__globals__)
    return parts


def rebind(olds: list, news: list, skip: tuple = (), roots: tuple = (),
           expected: dict | None = None, opaque: tuple = ()) -> int:
    """Replace each ``olds[i]`` by ``news[i]`` wherever user code holds it. ``skip`` lists
    containers of the caller's own that must be left alone. With ``roots`` and ``expected``
    (id -> how many user references each old has), look near the roots first, without
    entering instances of the types in ``opaque``."""
    if not olds:
        return 0
    mapping = {id(o): (o, n) for o, n in zip(olds, news)}
    # Our own bookkeeping (the mapping and its pairs) must never be rewritten.
    skip_ids = {id(olds), id(news), id(mapping)} | {id(s) for s in skip} | {
        id(pair) for pair in mapping.values()}
    total = 0
    remaining = list(olds)
    if roots and expected is not None:
        global _REPLACED
        replaced: dict[int, int] = {}
        _REPLACED = replaced
        try:
            # Level by level from the hooks outwards: most calls are done after a few levels
            # (the cache dict sits in the hook's closure), before the walk reaches the
            # globals of the libraries the hooks call into.
            for near in _reachable(roots, skip_ids, opaque):
                for holder in near:
                    if _rebuildable_tuple(holder) and \
                            not any(id(v) in mapping for v in holder):
                        continue  # rebuilding a tuple means finding its holders: if needed
                    total += _replace_in(holder, mapping, skip_ids | {id(near)}, 0)
                del near
                # Every reference user code held (counted when the run was traced) replaced?
                if all(replaced.get(id(o), 0) >= expected.get(id(o), 1) for o in olds):
                    return total
        finally:
            _REPLACED = None
        remaining = [o for o in olds if replaced.get(id(o), 0) < expected.get(id(o), 1)]
        if not remaining:
            return total
        mapping = {id(o): mapping[id(o)] for o in remaining}
        skip_ids |= {id(mapping), id(remaining)}
    holders = _holders(remaining, skip_ids)
    for holder in holders:
        total += _replace_in(holder, mapping, skip_ids | {id(holders)}, 0)
    return total


def discard(objs: list) -> int:
    """Take ``objs`` (proxies that will never get a value) out of the lists and dicts that
    hold them; returns how many places they were removed from. Other holders keep them
    (using one then raises: its trace is closed)."""
    if not objs:
        return 0
    ids = {id(o) for o in objs}
    removed = 0
    for holder in gc.get_referrers(*objs):
        if isinstance(holder, list):
            before = len(holder)
            holder[:] = [v for v in holder if id(v) not in ids]
            removed += before - len(holder)
        elif isinstance(holder, dict) and not isinstance(holder, types.MappingProxyType):
            for key in [k for k, v in holder.items() if id(v) in ids]:
                del holder[key]
                removed += 1
    return removed
