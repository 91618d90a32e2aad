"""Which sites of a served model hand graphs a tensor that shares memory with one of the
model's parameters or buffers (a helper of test_integrity.py and test_families.py)."""
from __future__ import annotations

import torch

from hookwire.module_sites import attach


def sites_sharing_weight_memory(entry, tokens: torch.Tensor) -> tuple[list[str], set]:
    """(sites whose value shares a weight's storage, sites that fired), as the server's own
    site hooks see them in a TL forward (where TL hook points are served) and an HF
    forward of ``entry`` (a server ModelEntry) on ``tokens``."""
    weights = entry.weight_storages
    shared, seen = [], set()

    def check(site):
        def hook(module, args, value):
            seen.add(site)
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, torch.Tensor) and v.numel() and \
                        v.untyped_storage().data_ptr() in weights and site not in shared:
                    shared.append(site)
        return hook
    handles = [attach(entry.site_modules[name], name, check(name))
               for name in {s.name for s in entry.sites} if name in entry.site_modules]
    try:
        with torch.no_grad():
            tokens = tokens.to(entry.hosted.device)
            if entry.hosted.bridge is not None and entry.tl_refused is None:
                entry.hosted.bridge(tokens)
            if entry.hf_model is not None:
                entry.hf_model(input_ids=tokens)
    finally:
        for handle in handles:
            handle.remove()
    return shared, seen
