"""HF module sites (``hf:<path>:output|input``) on the real server: listed in the manifest after
the TL hook points, reading and writing them equals the same edit done with torch hooks on a
plain local HF model, and a graph cannot mix them with TL hook points."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import hookwire
from hookwire.client import get_connection
from hookwire.families import build_hf_model
from hookwire.module_sites import module_site, parse_module_site
from hookwire.server.models import BUILTIN_MODELS
from hookwire.trace import Tracer, tracing

TOKENS = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(3))


def plain(name):
    spec = BUILTIN_MODELS[name]
    return build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0]


def test_naming_round_trip():
    name = module_site("transformer.h.1.mlp", "input")
    assert name == "hf:transformer.h.1.mlp:input"
    assert parse_module_site(name) == ("transformer.h.1.mlp", "input")
    with pytest.raises(ValueError):
        module_site("transformer.h.1.mlp", "grad")


def test_manifest_lists_module_sites_after_tl_sites(server):
    info = get_connection().model_info("tiny-gpt2")
    kinds = [s.name.startswith("hf:") for s in info.sites]
    assert kinds == sorted(kinds) and any(kinds) and not all(kinds)
    shapes = {s.name: s.shape for s in info.sites}
    # GPT-2's fused qkv projection runs in the plain HF forward (not in the TL bridge's).
    assert shapes["hf:transformer.h.0.attn.c_attn:output"] == ("B", "S", 192)
    assert shapes["hf:transformer.h.1:output"] == ("B", "S", 64)  # tuple -> element 0
    assert shapes["hf:lm_head:output"] == ("B", "S", 257)


def run_graph(name, edits):
    """edits: [(site name, fn(proxy) -> new value, mode)] in firing order; returns logits."""
    info = get_connection().model_info(name)
    tracer = Tracer()
    with tracing(tracer):
        for site, fn, mode in edits + [("hf:lm_head:output", None, None)]:
            s = info.sites[info.site_index[(site, 0)]]
            x = tracer.read_site(site, 0, s.concrete_shape(*TOKENS.shape), s.dtype)
            if fn is None:
                tracer.save("logits", x)
            else:
                tracer.write_site(len(tracer.sites) - 1, fn(x), mode)
    graph = {"version": 1, "model": name, "inputs": {"input_ids": "input_ids"},
             "constants": list(tracer.constants), "sites": tracer.sites,
             "nodes": tracer.nodes, "saves": tracer.saves, "forward": {"return_type": None}}
    tensors = {"input_ids": TOKENS, **tracer.constants}
    return get_connection().run(graph, tensors).values["logits"]


@pytest.mark.parametrize("name,path,kind", [
    ("tiny-gpt2", "transformer.h.0", "output"),          # tuple output
    ("tiny-gpt2", "transformer.h.1.mlp", "input"),       # positional input (pre-hook)
    ("tiny-gpt2", "transformer.h.0.attn.c_proj", "input"),
    ("tiny-llama", "model.layers.0.self_attn", "input"),  # called with keywords only
    ("tiny-llama", "model.layers.1.mlp.act_fn", "output"),
])
@pytest.mark.parametrize("mode", ["replace", "inplace"])
def test_module_site_edit_equals_local_hook(server, name, path, kind, mode):
    remote = run_graph(name, [(module_site(path, kind), lambda x: x * 0.5 + 1.0, mode)])
    model = plain(name)
    module = model.get_submodule(path)
    if kind == "output":
        def hook(mod, args, out):
            if isinstance(out, tuple):
                return (out[0] * 0.5 + 1.0,) + out[1:]
            return out * 0.5 + 1.0
        handle = module.register_forward_hook(hook)
    else:
        def hook(mod, args, kwargs):
            if args:
                return (args[0] * 0.5 + 1.0,) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * 0.5 + 1.0}
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        local = model(input_ids=TOKENS).logits
    handle.remove()
    assert_close(remote, local)
    with torch.no_grad():
        assert not torch.allclose(remote, model(input_ids=TOKENS).logits)


def test_graph_cannot_mix_tl_and_module_sites(server):
    info = get_connection().model_info("tiny-gpt2")
    tracer = Tracer()
    with tracing(tracer):
        for site in ("blocks.0.hook_out", "hf:transformer.h.1:output"):
            s = info.sites[info.site_index[(site, 0)]]
            tracer.save(site, tracer.read_site(site, 0, s.concrete_shape(2, 6), s.dtype))
    graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
             "sites": tracer.sites, "nodes": tracer.nodes, "saves": tracer.saves,
             "forward": {"return_type": None}}
    with pytest.raises(hookwire.GraphValidationError, match="not both"):
        get_connection().run(graph, {"input_ids": TOKENS})


def test_narrow_write_drops_rows_for_the_rest_of_the_forward(server):
    """A "narrow" write keeps the first k rows: later sites (and the logits) hold k rows, and
    those rows compute what they compute alone."""
    info = get_connection().model_info("tiny-gpt2")
    tracer = Tracer()
    with tracing(tracer):
        for site, batch in (("hf:transformer.h.0:output", 2), ("hf:lm_head:output", 1)):
            s = info.sites[info.site_index[(site, 0)]]
            x = tracer.read_site(site, 0, s.concrete_shape(batch, 6), s.dtype)
            if batch == 2:
                tracer.write_site(0, x[:1], "narrow")
            else:
                tracer.save("logits", x)
    graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
             "constants": list(tracer.constants), "sites": tracer.sites,
             "nodes": tracer.nodes, "saves": tracer.saves, "forward": {"return_type": None}}
    logits = get_connection().run(graph, {"input_ids": TOKENS}).values["logits"]
    with torch.no_grad():
        assert_close(logits, plain("tiny-gpt2")(input_ids=TOKENS[:1]).logits)


def test_narrow_write_after_a_later_read_is_refused(server):
    info = get_connection().model_info("tiny-gpt2")
    tracer = Tracer()
    with tracing(tracer):
        s0 = info.sites[info.site_index[("hf:transformer.h.0:output", 0)]]
        s1 = info.sites[info.site_index[("hf:transformer.h.1:output", 0)]]
        x = tracer.read_site(s0.name, 0, s0.concrete_shape(2, 6), s0.dtype)
        y = tracer.read_site(s1.name, 0, s1.concrete_shape(2, 6), s1.dtype)
        tracer.write_site(0, x[:1], "narrow")
        tracer.save("y", y)
    graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
             "sites": tracer.sites, "nodes": tracer.nodes, "saves": tracer.saves,
             "forward": {"return_type": None}}
    with pytest.raises(hookwire.GraphValidationError, match="narrowing write"):
        get_connection().run(graph, {"input_ids": TOKENS})


def test_narrow_write_on_tl_sites_is_refused(server):
    info = get_connection().model_info("tiny-gpt2")
    tracer = Tracer()
    with tracing(tracer):
        s = info.sites[info.site_index[("blocks.0.hook_out", 0)]]
        x = tracer.read_site(s.name, 0, s.concrete_shape(2, 6), s.dtype)
        tracer.write_site(0, x[:1], "narrow")
    graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
             "sites": tracer.sites, "nodes": tracer.nodes, "saves": tracer.saves,
             "forward": {"return_type": "logits"}}
    with pytest.raises(hookwire.GraphValidationError, match="HF module sites only"):
        get_connection().run(graph, {"input_ids": TOKENS})
