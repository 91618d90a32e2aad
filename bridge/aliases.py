"""Send each storage once: values a hook stored that are views of one another locally (TL's
``run_with_cache`` stores ``act.detach()`` once per alias name of a hook point, so a cache of
everything holds each activation under two or three names) come back as *one* tensor, and the
client makes the views itself -- the same torch ops, so the cache entries alias each other as
they do locally, and the bytes on the wire are those of the distinct storages.

Only views that keep every element are followed (``detach``, ``view``/``reshape`` that alias,
``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``, permutations): a slice is sent as
itself, never as the larger tensor it was cut from.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AliasPlan:
    """``roots[k]``: the k-th value to save; ``members[k]``: (index into the escaped list,
    the view ops that make that value from the root, innermost first)."""
    roots: list = field(default_factory=list)
    members: list[list[tuple[int, list]]] = field(default_factory=list)

    def values_for(self, k: int, root_value: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """(escaped index, tensor) for every stored value made from root ``k``."""
        out = []
        for index, chain in self.members[k]:
            value = root_value
            for replay in reversed(chain):
                value = replay(value)
            out.append((index, value))
        return out


def _same_view_key(proxy) -> tuple:
    """(the value a proxy is ultimately a view of, the views taken, detach left out): two
    proxies with equal keys hold the same elements (TL's ``pos_slice`` cuts the same slice
    of an activation once per alias name)."""
    keys, node = [], proxy
    while node._hw_view is not None and node._hw_view.key is not None:
        if node._hw_view.key != ("detach",):
            keys.append(node._hw_view.key)
        node = node._hw_view.base
    return id(node), tuple(reversed(keys))


def plan_aliases(escaped: list) -> AliasPlan:
    """Group escaped proxies by the value they are whole views of."""
    plan = AliasPlan()
    slot: dict[int, int] = {}
    first_of: dict[tuple, int] = {}  # view key -> the escaped proxy first seen with it
    for index, proxy in enumerate(escaped):
        same = first_of.setdefault(_same_view_key(proxy), index)
        if same != index:
            # The same view as an earlier value: a detached view of that one, as locally.
            for k, members in enumerate(plan.members):
                for i, chain in members:
                    if i == same:
                        plan.members[k].append((index, [torch.Tensor.detach] + chain))
            continue
        chain, node = [], proxy
        while node._hw_view is not None and getattr(node._hw_view, "replay", None) is not None:
            chain.append(node._hw_view.replay)
            node = node._hw_view.base
        if id(node) not in slot:
            slot[id(node)] = len(plan.roots)
            plan.roots.append(node)
            plan.members.append([])
        plan.members[slot[id(node)]].append((index, chain))
    return plan


__all__ = ["AliasPlan", "plan_aliases"]
