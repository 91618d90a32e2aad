"""Where nnsight's handoffs fall in one forward of the served model.

nnsight hands a trace block every module's values at three locations per call --
``<path>.input`` (``(args, kwargs)``), ``<path>.skip`` (the skip gate) and ``<path>.output`` --
in the order the forward reaches them. The server's manifest lists its HF module sites in
firing order (``hf:<path>:input`` / ``hf:<path>:output`` / ``hf:<path>:output.<i>``, by call),
so that order is rebuilt here as a list of :class:`Event` s: an input event where a module is
entered, an output event where it returns.

Modules that never run with a tensor on the server have no sites and no events, as modules
that never run locally have no handoffs. A module whose input is no tensor (called with
keywords only, or with none) still gets its input event, just before its first descendant's;
one that returns no tensor (a ``ModelOutput``) gets its output event just after its last
descendant's. ``attn_dropout`` modules are left out: the server lists them for requests that
hook attention probabilities (it then runs an eager attention that calls them), but
transformers 5 never calls them, so locally nnsight never reaches them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hookwire.module_sites import is_module_site, parse_module_site, site_element


@dataclass(frozen=True)
class Event:
    kind: str                 # "input" or "output"
    path: str                 # the module's path in the HF model ("transformer.h.0")
    call: int                 # which call of the module in this forward
    site: int | None = None   # index in the manifest's sites: the input, or output element 0
    elements: tuple = ()      # (element >= 1, site index) of a tuple output's other tensors


def _never_called(stand_in: torch.nn.Module) -> set[str]:
    """Paths of modules the local forward never calls although the server lists them."""
    ids = {id(m.attn_dropout) for m in stand_in.modules()
           if isinstance(getattr(m, "attn_dropout", None), torch.nn.Module)}
    return {path for path, m in stand_in.named_modules() if id(m) in ids}


def _inside(path: str, ancestor: str) -> bool:
    return path.startswith(ancestor + ".")


def forward_events(info, stand_in: torch.nn.Module) -> list[Event]:
    """The handoffs of one forward, in the order nnsight makes them locally."""
    skip = _never_called(stand_in)
    events: list[Event] = []
    elements: dict[tuple[str, int], list] = {}
    entered: set[tuple[str, int]] = set()
    for index, site in enumerate(info.sites):
        if not is_module_site(site.name):
            continue
        path, kind = parse_module_site(site.name)
        if path in skip or any(_inside(path, s) for s in skip):
            continue
        key = (path, site.call)
        if kind == "input":
            events.append(Event("input", path, site.call, index))
            entered.add(key)
            continue
        element = site_element(site.name)
        if element:
            elements.setdefault(key, []).append((element, index))
            continue
        if key not in entered:  # an input that is no tensor: enter just before its subtree
            at = len(events)
            while at > 0 and _inside(events[at - 1].path, path):
                at -= 1
            events.insert(at, Event("input", path, site.call))
        events.append(Event("output", path, site.call, index, tuple(elements.pop(key, ()))))
    returned = {(e.path, e.call) for e in events if e.kind == "output"}
    for entry in [e for e in events if e.kind == "input" and (e.path, e.call) not in returned]:
        at = events.index(entry) + 1  # returns no tensor: leave just after its subtree
        while at < len(events) and _inside(events[at].path, entry.path):
            at += 1
        events.insert(at, Event("output", entry.path, entry.call))
    return events


__all__ = ["Event", "forward_events"]
