"""A known-good request and its local answer: what protocol, fuzz, hostile-corpus and
integrity tests send after each bad request, to show the connection still serves correctly.

``good_graph(model)`` zeroes the first 8 residual dims entering block 1 and saves what it
read; ``local_answers(local_models, tokens)`` is the same edit run with TL locally (conftest's
``good_answers`` fixture holds it per module); ``assert_good`` sends the graph and compares.
"""
from __future__ import annotations

import torch
from torch.testing import assert_close

import graphs

SITE = "blocks.1.hook_resid_pre"


def good_graph(model: str) -> dict:
    """Zero the first 8 residual dims entering block 1; save what was read."""
    return graphs.graph(model, nodes=[
        {"id": 0, "op": "site.read", "args": [0]},
        {"id": 1, "op": "setitem", "args": [{"ref": 0}, [graphs.FULL, graphs.FULL,
                                                          {"slice": [0, 8, None]}], 0.0]},
        {"id": 2, "op": "site.write", "args": [0, {"ref": 1}], "kwargs": {"mode": "replace"}},
    ], sites=[(SITE, 0)], saves={"resid": 0}, version=1)


def local_answers(local_models: dict, tokens) -> dict:
    """name -> {"logits", "resid"}: the good graph's edit run with local TL."""
    out = {}
    for name, bridge in local_models.items():
        seen = {}

        def hook(act, hook):
            seen["resid"] = act.detach().clone()
            act[:, :, :8] = 0

        logits = bridge.run_with_hooks(tokens, fwd_hooks=[(SITE, hook)])
        out[name] = {"logits": logits.detach(), "resid": seen["resid"]}
        assert not torch.allclose(logits, bridge(tokens))  # the edit changes the answer
    return out


def assert_good(conn, good_answers: dict, tokens, model: str = "tiny-gpt2") -> None:
    """Send the good graph on ``conn``: its answer equals local TL's."""
    result = conn.run(good_graph(model), {"input_ids": tokens})
    assert set(result.values) == {"resid", "__logits__"}
    assert type(result.values["__logits__"]) is torch.Tensor
    assert_close(result.values["__logits__"], good_answers[model]["logits"])
    assert_close(result.values["resid"], good_answers[model]["resid"])
