"""A model spread over two devices with accelerate's ``device_map`` (how a replica holds a
model larger than one GPU) gives the same results as the unsharded model.

No GPU here, so the two parts are the CPU and disk offload: the second half of each model's
layers lives on disk and accelerate's hooks bring its weights in for each forward -- the same
dispatch machinery that moves activations between GPUs. The server hosts the sharded models;
``local_models`` (conftest) are the unsharded ones. Core TL tests are imported and re-run
against this module's ``server``.
"""
from __future__ import annotations

import pytest
import torch

import hookwire
import hookwire.client
import hookwire.server as hs
from conftest import MODEL_NAMES
from hookwire.server.models import load_model
from test_tl_cache_and_hooks import (  # noqa: F401
    remote, test_run_with_cache_everything)
from test_tl_gradients import (  # noqa: F401
    _zero_grads, test_bwd_hooks_with_loss_then_backward)
from test_tl_remote_equals_local import (  # noqa: F401
    remote_model, remote_run, test_activation_patching_with_partial,
    test_head_ablation_in_place_hook_z, test_no_hooks_gives_local_logits, test_return_types,
    test_store_in_outer_dict_and_list)

pytestmark = pytest.mark.filterwarnings("ignore:.*gated-off hook name.*",
                                        "ignore:.*offloaded to the disk.*")

TWO_PARTS = {
    "tiny-gpt2": {"transformer.wte": "cpu", "transformer.wpe": "cpu", "transformer.drop": "cpu",
                  "transformer.h.0": "cpu", "transformer.h.1": "disk",
                  "transformer.ln_f": "disk", "lm_head": "disk"},
    "tiny-llama": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu",
                   "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "disk",
                   "lm_head": "disk"},
}


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture(params=("stand_in", "bridge_url"))
def front(request):
    return request.param


@pytest.fixture
def local(local_models, name):
    return local_models[name]


@pytest.fixture(scope="module")
def sharded():
    return {name: load_model(name, device_map=TWO_PARTS[name]) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def server(sharded, request):
    srv = hs.start(models=sharded, port=0)

    def finalize():
        try:
            hookwire.client.close_connections()
        finally:
            try:
                srv.stop()
            finally:
                hookwire.configure(url=None)

    request.addfinalizer(finalize)
    hookwire.configure(url=srv.url)
    return srv


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
