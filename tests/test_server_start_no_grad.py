"""Starting a server from code that has turned gradients off (as notebooks often do with
``torch.set_grad_enabled(False)``) works, and gradient sites are still known: the site probe
differentiates under its own ``enable_grad``."""
from __future__ import annotations

import torch

import hookwire
import hookwire.server as hs
import hookwire.transformerlens as htl
from hookwire.client import close_connections
from hookwire.server.models import load_model


def test_start_under_no_grad_then_remote_gradients():
    local = load_model("tiny-gpt2").bridge
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        srv = hs.start(models=["tiny-gpt2"], port=0)
    try:
        hookwire.configure(url=srv.url)
        remote = htl.RemoteModel("tiny-gpt2")
        _, grads = remote.run_with_cache(tokens, incl_bwd=True, return_type="loss",
                                         names_filter=lambda n: n.endswith("resid_pre"),
                                         progress=False)
        _, want = local.run_with_cache(tokens, incl_bwd=True, return_type="loss",
                                       names_filter=lambda n: n.endswith("resid_pre"))
        assert "blocks.0.hook_resid_pre_grad" in want
        for key in want:
            torch.testing.assert_close(grads[key], want[key])
    finally:
        close_connections()
        srv.stop()
        hookwire.configure(url=None)
