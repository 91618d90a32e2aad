"""Call-indexed hooks ("path@k") for a module that runs several times in one forward.

Neither served family has such a module, so the remote side is checked where it decides
things -- the traced graph's sites, against a manifest in which one module runs twice -- and
the local side on a real model whose two blocks share one MLP module, against torch hooks."""
from __future__ import annotations

import copy

import torch
from torch.testing import assert_close

import hookwire.hf as hhf
from hookwire.client import get_connection
from hookwire.families import build_hf_model
from hookwire.hf.hooks import hook_list
from hookwire.hf.trace_forward import trace_forward
from hookwire.server.models import BUILTIN_MODELS

IDS = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))


def shared_mlp_model():
    spec = BUILTIN_MODELS["tiny-gpt2"]
    model = build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0]
    model.transformer.h[1].mlp = model.transformer.h[0].mlp  # runs twice per forward
    return model


def test_local_call_index_equals_counted_torch_hook():
    model = shared_mlp_model()

    def bump(module, args, output):
        return output + 1.0
    calls = [0]

    def second_call_only(module, args, output):
        calls[0] += 1
        return bump(module, args, output) if calls[0] == 2 else None
    handle = model.transformer.h[0].mlp.register_forward_hook(second_call_only)
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    handle.remove()
    got = hhf.LocalModel(model).run_with_hooks(IDS, {"transformer.h.0.mlp@1": bump}).logits
    assert_close(got, want, rtol=0, atol=0)
    every = hhf.LocalModel(model).run_with_hooks(IDS, {"transformer.h.0.mlp": bump}).logits
    assert not torch.equal(every, got)


def test_traced_sites_follow_the_call_index(server):
    info = copy.deepcopy(get_connection().model_info("tiny-gpt2"))
    # The manifest of a model whose block 1 calls block 0's MLP: same sites, renamed.
    for s in list(info.sites):
        if s.name.startswith("hf:transformer.h.1.mlp:"):
            i = info.sites.index(s)
            info.sites[i] = type(s)(s.name.replace(".h.1.", ".h.0."), 1, s.shape, s.dtype,
                                    s.grad)
    info.site_index = {(s.name, s.call): i for i, s in enumerate(info.sites)}
    stand_in = hhf.RemoteModel("tiny-gpt2").stand_in

    def sites_for(key):
        traced = trace_forward(info, stand_in, 2, 5, hook_list({key: lambda m, a, o: o * 2}))
        return [(s["name"], s["call"]) for s in traced.tracer.sites]
    out, inp = "hf:transformer.h.0.mlp:output", "hf:transformer.h.0.mlp:input"
    assert sites_for("transformer.h.0.mlp@1") == [(inp, 1), (out, 1)]
    assert sites_for("transformer.h.0.mlp@0") == [(inp, 0), (out, 0)]
    assert sites_for("transformer.h.0.mlp") == [(inp, 0), (out, 0), (inp, 1), (out, 1)]
