"""The pieces TL 2.x clients rely on, checked from the main environment: the alias table the
server publishes, the legacy name -> site mapping, ``hooks(remote=...)`` contexts, and
tokenizer files that a transformers 4.x client can load."""
from __future__ import annotations

import json

import pytest
from torch.testing import assert_close

import hookwire.client
from hookwire.tokenizer import _loadable_here
from hookwire.transformerlens import legacy

from conftest import MODEL_NAMES
from legacy_cases import COMMON_POINTS, FAMILY_POINTS

pytestmark = pytest.mark.filterwarnings("ignore:.*gated-off hook name.*")


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def test_server_publishes_tl4_alias_table(server, name):
    info = hookwire.client.get_connection().model_info(name)
    assert info.hook_aliases["blocks.0.hook_resid_pre"] == "blocks.0.hook_in"
    assert info.hook_aliases["blocks.1.attn.hook_z"] == "blocks.1.attn.o.hook_in"
    assert info.hook_aliases["hook_embed"] == "embed.hook_out"
    assert all(alias != canonical for alias, canonical in info.hook_aliases.items())


def test_every_legacy_name_maps_to_the_site_tl4_hooks(server, hosted, name):
    info = hookwire.client.get_connection().model_info(name)
    bridge = hosted[name].bridge
    for point in COMMON_POINTS + FAMILY_POINTS[name]:
        site = legacy.site_for(info, point)
        assert site == bridge.hook_dict[point].name, point
    # Points TL 4 never computes on these models map to nothing (an error at trace time).
    assert legacy.site_for(info, "blocks.0.attn.hook_result") is None
    assert legacy.site_for(info, "blocks.0.hook_mlp_in") is None


def test_tl4_bridge_is_not_legacy(hosted, remote_models, name):
    assert not legacy.is_legacy(hosted[name].bridge)
    assert not legacy.is_legacy(remote_models[name])


def test_hooks_context_with_remote_routes_plain_forward(server, local_models, tokens, name):
    bridge = local_models[name]

    def ablate(z, hook):
        z[:, :, 1, :] = 0.0

    with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)]):
        expected = bridge(tokens)
    with bridge.hooks(fwd_hooks=[("blocks.0.attn.hook_z", ablate)], remote=True,
                      remote_model=name):
        assert "forward" in bridge.__dict__  # routed for the block's duration
        remote = bridge(tokens)
        inner = bridge.run_with_hooks(tokens, remote=True, remote_model=name)
    assert "forward" not in bridge.__dict__
    assert_close(remote, expected)
    assert_close(inner, expected)
    assert not any(hp._forward_hooks for hp in bridge.hook_dict.values())


def test_tokenizer_config_rewritten_only_for_unknown_classes():
    files = {"tokenizer.json": "{}",
             "tokenizer_config.json": json.dumps({"tokenizer_class": "NoSuchTokenizerHere",
                                                  "bos_token": "<s>"})}
    fixed = json.loads(_loadable_here(files)["tokenizer_config.json"])
    assert fixed == {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"}
    known = {"tokenizer.json": "{}",
             "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"})}
    assert _loadable_here(known) == known
