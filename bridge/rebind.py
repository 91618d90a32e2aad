"""After a remote run: put the real tensors where the user's code stored the traced ones.

A hook that did ``cache[hook.name] = act`` left a Proxy in ``cache``. We find every container
still holding it (dicts -- including objects' ``__dict__`` and ActivationCache's dict --, lists,
closure cells, objects' attributes and slots, and tuples inside those) and swap in the tensor
that came back. ``gc.get_referrers`` walks the whole heap, so it is called once for all
proxies together, not once per proxy."""
from __future__ import annotations

import gc
import types

_MAX_TUPLE_DEPTH = 4


def _holders(objs, skip_ids: set) -> list:
    return [h for h in gc.get_referrers(*objs)
            if id(h) not in skip_ids and not isinstance(h, types.FrameType)]


def _replace_in(holder, mapping: dict, skip_ids: set, depth: int) -> int:
    """Replace, inside ``holder``, every object whose id is a key of ``mapping``."""
    done = 0
    if isinstance(holder, dict):
        for key, value in list(holder.items()):
            new = mapping.get(id(value))
            if new is not None and new[0] is value:
                holder[key] = new[1]
                done += 1
    elif isinstance(holder, list):
        for i, value in enumerate(holder):
            new = mapping.get(id(value))
            if new is not None and new[0] is value:
                holder[i] = new[1]
                done += 1
    elif isinstance(holder, types.CellType):
        try:
            value = holder.cell_contents
        except ValueError:
            return 0
        new = mapping.get(id(value))
        if new is not None and new[0] is value:
            holder.cell_contents = new[1]
            done += 1
    elif type(holder) is tuple:
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
                done += 1
    return done


def _replace_in_tuple(holder, mapping, skip_ids, depth) -> int:
    """Tuples are immutable: build the new one and put it where the old one was."""
    new_tuple = tuple(mapping[id(v)][1] if id(v) in mapping and mapping[id(v)][0] is v else v
                      for v in holder)
    pair = (holder, new_tuple)
    outer_map = {id(holder): pair}
    skip_ids = skip_ids | {id(new_tuple), id(pair), id(outer_map)}
    done = 0
    for outer in _holders([holder], skip_ids):
        done += _replace_in(outer, outer_map, skip_ids, depth + 1)
    return done


def rebind(olds: list, news: list, skip: tuple = ()) -> int:
    """Replace each ``olds[i]`` by ``news[i]`` wherever user code holds it. ``skip`` lists
    containers of the caller's own that must be left alone."""
    if not olds:
        return 0
    mapping = {id(o): (o, n) for o, n in zip(olds, news)}
    # Our own bookkeeping (the mapping and its pairs) must never be rewritten.
    skip_ids = {id(olds), id(news), id(mapping)} | {id(s) for s in skip} | {
        id(pair) for pair in mapping.values()}
    holders = _holders(olds, skip_ids)
    total = 0
    for holder in holders:
        total += _replace_in(holder, mapping, skip_ids | {id(holders)}, 0)
    return total
