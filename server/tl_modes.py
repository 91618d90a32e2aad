"""TL 4 bridge components pick code paths by asking whether their hook points carry TL hooks.

A normalization bridge, for one, runs a python re-implementation (whose ``hook_normalized``
is part of the autograd graph) when ``hook_scale``/``hook_normalized`` have backward hooks,
and builds autograd history for its intermediates only when they have forward hooks. The
server's interleaver hooks modules with plain torch hooks, which TL does not see; so for
the duration of a request the server marks, in TL's own hook lists, exactly the hook points
where the user's local run would have had TL hooks: forward at the sites the graph reads or
writes, backward at the sites whose gradient it reads. Same paths, same numerics as local.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict

from torch.utils.hooks import RemovableHandle

from hookwire.ir.special import SITE_GRAD


def _marker():
    from transformer_lens.hook_points import LensHandle

    # A handle to nothing: removing it (TL's reset_hooks) is harmless.
    return LensHandle(hook=RemovableHandle(OrderedDict()), is_permanent=False,
                      context_level=None)


@contextlib.contextmanager
def tl_hooks_marked(fwd_points=(), bwd_points=()):
    """Mark hook points as hooked (forward / backward) in TL's lists, then unmark them."""
    added = []
    for points, attr in ((fwd_points, "fwd_hooks"), (bwd_points, "bwd_hooks")):
        for hp in dict.fromkeys(points):  # each point once, in order
            hooks = getattr(hp, attr, None)
            if isinstance(hooks, list):
                marker = _marker()
                hooks.append(marker)
                added.append((hooks, marker))
    try:
        yield Marks(added)
    finally:
        for hooks, marker in added:
            if marker in hooks:
                hooks.remove(marker)


class Marks:
    """The marks one request put in TL's hook lists (``tl_hooks_marked`` yields it)."""

    def __init__(self, added: list):
        self._added = added

    @contextlib.contextmanager
    def suspended(self):
        """Take the marks out for a while -- while another request's forward runs nested in
        this one's (server/give_way.py) -- and put them back: the nested forward takes the
        code paths its own graph asks for, not this request's."""
        present = [(hooks, marker) for hooks, marker in self._added if marker in hooks]
        for hooks, marker in present:
            hooks.remove(marker)
        try:
            yield
        finally:
            for hooks, marker in present:
                hooks.append(marker)


def marked_for_graph(site_modules: dict, vg):
    """The marks for one validated graph: forward where it reads or writes a site, backward
    where it reads a gradient."""
    fwd, bwd = [], []
    for dn in vg.nodes:
        if dn.site is None:
            continue
        module = site_modules.get(vg.site_infos[dn.site].name)
        (bwd if dn.op == SITE_GRAD else fwd).append(module)
    return tl_hooks_marked([m for m in fwd if m is not None], [m for m in bwd if m is not None])




# ---- TL's hook switches (set_use_attn_result & co.), per request -------------------------

def current_flags(bridge) -> frozenset:
    from hookwire.ir import TL_HOOK_FLAGS

    return frozenset(f for f in TL_HOOK_FLAGS if bool(getattr(bridge.cfg, f, False)))


def _set_flags(bridge, flags) -> None:
    from hookwire.ir import TL_HOOK_FLAGS

    on = set(flags)
    # Off first: use_split_qkv_input and use_attn_in refuse to be on together.
    for flag in TL_HOOK_FLAGS:
        if flag not in on and getattr(bridge.cfg, flag, False):
            getattr(bridge, f"set_{flag}")(False)
    for flag in TL_HOOK_FLAGS:
        if flag in on and not getattr(bridge.cfg, flag, False):
            getattr(bridge, f"set_{flag}")(True)


@contextlib.contextmanager
def flags_applied(bridge, flags=()):
    """Run with exactly ``flags`` of TL's hook switches on (the others off), then put back
    what the bridge had: a request's switches are its own, never the next request's."""
    before = current_flags(bridge)
    if before == frozenset(flags):
        yield
        return
    try:
        _set_flags(bridge, flags)
        yield
    finally:
        _set_flags(bridge, before)


__all__ = ["tl_hooks_marked", "Marks", "marked_for_graph", "flags_applied", "current_flags"]
