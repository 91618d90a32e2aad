"""After a remote run: put the real tensors where the user's code stored the traced ones.

A hook that did ``cache[hook.name] = act`` left a Proxy in ``cache``. We find every container
still holding it (dicts -- including objects' ``__dict__`` and ActivationCache's dict --, lists,
closure cells, and tuples inside those) and swap in the tensor that came back."""
from __future__ import annotations

import gc
import types

_MAX_TUPLE_DEPTH = 4


def _holders(obj, skip_ids: set) -> list:
    return [h for h in gc.get_referrers(obj)
            if id(h) not in skip_ids and not isinstance(h, types.FrameType)]


def _replace_in(holder, old, new, skip_ids: set, depth: int) -> int:
    done = 0
    if isinstance(holder, dict):
        for key, value in list(holder.items()):
            if value is old:
                holder[key] = new
                done += 1
    elif isinstance(holder, list):
        for i, value in enumerate(holder):
            if value is old:
                holder[i] = new
                done += 1
    elif isinstance(holder, types.CellType):
        if holder.cell_contents is old:
            holder.cell_contents = new
            done += 1
    elif type(holder) is tuple and depth < _MAX_TUPLE_DEPTH:
        done += _replace_in_tuple(holder, old, new, skip_ids, depth)
    else:
        # An object whose attributes live inline (CPython 3.11+ does not materialize
        # __dict__ until asked) or in __slots__.
        done += _replace_attributes(holder, old, new)
    return done


def _replace_attributes(holder, old, new) -> int:
    if type(holder).__module__.startswith("hookwire.") or isinstance(holder, type):
        return 0  # our own tracing objects and classes are not the user's containers
    done = 0
    attrs = getattr(holder, "__dict__", None)  # materializes inline attributes
    if isinstance(attrs, dict):
        for key, value in list(attrs.items()):
            if value is old:
                attrs[key] = new
                done += 1
    for cls in type(holder).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for slot in (slots,) if isinstance(slots, str) else slots:
            try:
                if getattr(holder, slot) is old:
                    setattr(holder, slot, new)
                    done += 1
            except (AttributeError, TypeError):
                continue
    return done


def _replace_in_tuple(holder, old, new, skip_ids, depth) -> int:
    """Tuples are immutable: build the new one and put it where the old one was."""
    done = 0
    new_tuple = tuple(new if v is old else v for v in holder)
    skip_ids = skip_ids | {id(new_tuple)}
    for outer in _holders(holder, skip_ids):
        done += _replace_in(outer, holder, new_tuple, skip_ids, depth + 1)
    return done


def rebind(olds: list, news: list, skip: tuple = ()) -> int:
    """Replace each ``olds[i]`` by ``news[i]`` wherever user code holds it. ``skip`` lists
    containers of the caller's own that must be left alone."""
    skip_ids = {id(olds), id(news)} | {id(s) for s in skip}
    total = 0
    for i in range(len(olds)):
        holders = _holders(olds[i], skip_ids)
        for holder in holders:
            total += _replace_in(holder, olds[i], news[i], skip_ids, 0)
        del holders
    return total
