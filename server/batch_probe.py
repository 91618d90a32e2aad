"""Sites where *how* a request writes decides the code path of the whole forward.

Some TL 4 bridge components look at the identity of what a hook hands back: a normalization
bridge keeps HF's native computation when ``hook_scale``/``hook_normalized`` come back as the
very tensors it handed out, and recomputes from the hooked values (different float rounding)
when a hook returned a new tensor. In a batched forward, one member's replacing write there
would move every batch mate onto the other path: their values change at rounding scale, so
they are no longer bit-equal to their solo runs. A request that replaces such a site runs
alone.

Which sites behave so is found by trying, not by a list: at start-up the model runs with every
TL site hooked, returning ``None`` everywhere, then returning a copy with the very same
values at some sites; where the logits differ, replacing the site changes the path.
"""
from __future__ import annotations

import warnings

import torch

from hookwire.module_sites import attach, is_module_site
from hookwire.server.manifest import probe_vocab
from hookwire.server.tl_modes import tl_hooks_marked

_PROBE = (2, 5)  # (batch, seq): small; the path, not the size, is what is probed


class _Probe:
    """Every TL site hooked at once (and marked, as a batch whose reader reads everything
    is); ``logits(copy)`` runs a forward whose hooks hand back an equal copy at the sites in
    ``copy`` and nothing elsewhere."""

    def __init__(self, bridge, sites, site_modules):
        self.bridge = bridge
        self.copy: set = set()
        self.calls: dict = {}
        device = next(bridge.parameters()).device
        self.tokens = torch.randint(0, probe_vocab(getattr(bridge, "original_model", None),
                                                bridge.cfg.d_vocab), _PROBE,
                                    generator=torch.Generator().manual_seed(1)).to(device)
        self.modules = {}
        for site in sites:
            self.modules.setdefault(site.name, site_modules[site.name])

    def _hook(self, name):
        def hook(mod, args, output):
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            if (name, call) in self.copy and isinstance(output, torch.Tensor):
                return output.clone()
            return None
        return hook

    def logits(self, copy) -> torch.Tensor:
        self.copy, self.calls = set(copy), {}
        handles = [attach(module, name, self._hook(name))
                   for name, module in self.modules.items()]
        try:
            with torch.no_grad(), tl_hooks_marked(fwd_points=list(self.modules.values())), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TL's notes on the path it takes: the point
                return type(self.bridge).forward(self.bridge, self.tokens,
                                                 return_type="logits")
        finally:
            for h in handles:
                h.remove()


def replace_sensitive_sites(bridge, sites, site_modules: dict) -> set[tuple[str, int]]:
    """(name, call) of every TL site where returning an equal copy changes the logits.
    Found by group testing (copies at half the candidates at a time), so a model with no
    such site costs two forwards."""
    candidates = [(s.name, s.call) for s in sites
                  if not is_module_site(s.name) and site_modules.get(s.name) is not None]
    if not candidates:
        return set()
    probe = _Probe(bridge, [s for s in sites if (s.name, s.call) in set(candidates)],
                   site_modules)
    baseline = probe.logits(())
    out, groups = set(), [candidates]
    while groups:
        group = groups.pop()
        if torch.equal(probe.logits(group), baseline):
            continue
        if len(group) == 1:
            out.add(group[0])
        else:
            groups += [group[:len(group) // 2], group[len(group) // 2:]]
    return out


__all__ = ["replace_sensitive_sites"]
