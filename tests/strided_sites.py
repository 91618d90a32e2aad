"""The TL hook points whose activation is not contiguous, as a model's code hands it to them:
what the site-layout tests (hookwire.site_layout) compare the server's descriptions and the
remote runs with."""
from __future__ import annotations

import torch


def strided_hook_points(model, tokens) -> dict[str, tuple]:
    """{hook point: (shape, strides)} of those whose activation is not contiguous (before
    TL's conversion for its hooks; first call), after one forward of ``tokens``."""
    from transformer_lens.hook_points import HookPoint

    found, handles = {}, []
    for name, hp in model.hook_dict.items():
        if isinstance(hp, HookPoint):
            def record(module, args, out, name=hp.name or name):
                if isinstance(out, torch.Tensor) and not out.is_contiguous():
                    found.setdefault(name, (tuple(out.shape), out.stride()))
            handles.append(hp.register_forward_hook(record))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    return found
