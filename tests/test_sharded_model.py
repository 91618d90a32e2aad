"""A model spread over two devices with accelerate's ``device_map`` (how a replica holds a
model larger than one GPU) gives the same results as the unsharded model.

No GPU here, so the two parts are the CPU and disk offload: the second half of each model's
layers lives on disk and accelerate's hooks bring its weights in for each forward -- the same
dispatch machinery that moves activations between GPUs. The server hosts the sharded models
(conftest's ``sharded`` engine); ``local_models`` (conftest) are the unsharded ones. The core
TL tests marked ``EVERY_ENGINE`` (tests/engines.py) run on this engine from their own files.
"""
from __future__ import annotations

import pytest
import torch

import hookwire
import hookwire.client
import hookwire.server as hs
from conftest import MODEL_NAMES

# The module's tests that take ``server`` run on the sharded engine (tests/engines.py); the
# core TL tests marked EVERY_ENGINE in their own files run there too.
pytestmark = [pytest.mark.engines("sharded"),
              pytest.mark.filterwarnings("ignore:.*gated-off hook name.*",
                                         "ignore:.*offloaded to the disk.*")]


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def test_the_models_really_are_in_two_parts(sharded):
    for name, hosted in sharded.items():
        hf = hosted.bridge.original_model
        assert set(hf.hf_device_map.values()) == {"cpu", "disk"}
        devices = {p.device.type for p in hf.parameters()}
        assert devices == {"cpu", "meta"}, devices  # offloaded weights are not in memory


def test_sharded_forward_equals_unsharded(sharded, hosted, tokens):
    for name in MODEL_NAMES:
        torch.testing.assert_close(sharded[name].bridge(tokens), hosted[name].bridge(tokens),
                                   rtol=0, atol=0)


# ---- HF module sites survive accelerate's dispatch: hookwire.hf, generation, pyvene ------------

import copy  # noqa: E402

import pyvene as pv  # noqa: E402
from torch.testing import assert_close  # noqa: E402

import hookwire.hf as hhf  # noqa: E402
import hookwire.pyvene as hpv  # noqa: E402
from hookwire.families import build_hf_model  # noqa: E402
from hookwire.hf.local import LocalModel  # noqa: E402
from hookwire.server.models import BUILTIN_MODELS  # noqa: E402

PATHS = {"tiny-gpt2": "transformer.h.1", "tiny-llama": "model.layers.1"}


def local_hf(name):
    spec = BUILTIN_MODELS[name]
    return build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0]


def steer(module, args, output):
    return (output[0] + 0.25,) + output[1:] if isinstance(output, tuple) else output + 0.25


def test_module_sites_survive_the_split(server, hosted, name):
    from hookwire.server.prepare import prepare_model
    info = hookwire.client.get_connection().model_info(name)
    split_sites = [s.name for s in info.sites if s.name.startswith("hf:")]
    whole_sites = [s.name for s in prepare_model(hosted[name]).sites
                   if s.name.startswith("hf:")]
    assert split_sites == whole_sites and "hf:*" not in info.unserved
    assert info.generate_refused is None


def test_hf_hooks_cache_and_generation_on_the_split(server, tokens, name):
    local, remote = LocalModel(local_hf(name)), hhf.RemoteModel(name)
    hooks, modules = {PATHS[name]: steer}, [PATHS[name], PATHS[name] + ".mlp"]
    got, cache = remote.run_with_cache(tokens, modules=modules, hooks=hooks)
    expected, expected_cache = local.run_with_cache(tokens, modules=modules, hooks=hooks)
    assert_close(got.logits, expected.logits)
    for key in modules:
        assert_close(cache[key], expected_cache[key])
    got = remote.generate(tokens, max_new_tokens=3, hooks=hooks, intervene_on="all")
    expected = local.generate(tokens, max_new_tokens=3, hooks=hooks, intervene_on="all")
    assert torch.equal(got.sequences, expected.sequences)


def test_pyvene_on_the_split(server, tokens, name):
    def config():
        return pv.IntervenableConfig([{"layer": 0, "component": "block_output",
                                       "intervention_type": pv.VanillaIntervention}])
    source = torch.flip(tokens, dims=[1])
    call = ({"input_ids": tokens}, [{"input_ids": source}], {"sources->base": 3})
    expected = pv.IntervenableModel(config(), copy.deepcopy(local_hf(name)))(*call)
    got = hpv.RemoteIntervenableModel(config(), name)(*call)
    assert_close(got[1].logits, expected[1].logits)


def test_a_mixture_of_experts_split_over_cpu_and_disk():
    """Mixtral (router sites with a flattened batch*seq dim) split like the models above:
    TL and HF module hooks on both parts equal the unsharded model."""
    import sys as _sys
    _sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from family_configs import tiny_config
    from hookwire.families import family_for_architecture
    from hookwire.server.models import place_on_devices, wrap_in_bridge

    arch = "MixtralForCausalLM"
    config = tiny_config(arch, family_for_architecture(arch).config_class)
    split = place_on_devices(build_hf_model(arch, config, seed=0)[0], {
        "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
        "model.layers.1": "disk", "model.norm": "disk", "lm_head": "disk"})
    whole, cfg = build_hf_model(arch, config, seed=0)
    local_tl = wrap_in_bridge(build_hf_model(arch, config, seed=0)[0], arch, cfg, None, "l")
    toks = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(2))
    srv = hs.start(models={"moe-split": split}, port=0)
    try:
        url = srv.url

        def tl_hooks(store):
            def route(x, hook):
                store[hook.name] = x.clone()
                x[:, 1] += 1.0
            return [("blocks.1.mlp.gate.hook_out", route), ("blocks.0.hook_out",
                                                             lambda x, hook: x * 0.5)]
        local_store, remote_store = {}, {}
        expected = local_tl.run_with_hooks(toks, fwd_hooks=tl_hooks(local_store))
        got = htl.RemoteModel("moe-split", url=url).run_with_hooks(
            toks, fwd_hooks=tl_hooks(remote_store))
        assert_close(got, expected)
        assert_close(remote_store, local_store)
        hooks = {"model.layers.1.mlp.gate:input": lambda m, a: (a[0] * 3.0,) + a[1:],
                 "model.layers.0": steer}
        assert_close(hhf.RemoteModel("moe-split", url=url).run_with_hooks(toks, hooks).logits,
                     LocalModel(whole).run_with_hooks(toks, hooks).logits)
    finally:
        hookwire.client.close_connections()
        srv.stop()


import hookwire.transformerlens as htl  # noqa: E402
