"""Review: held saves in generation steps (HF module hooks), remote against local."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import hookwire.hf as hhf
from test_hf_remote import PROMPT

BLOCKS = {"tiny-gpt2": ("transformer.h.0", "transformer.h.1"),
          "tiny-llama": ("model.layers.0", "model.layers.1")}


@pytest.fixture(scope="module")
def plain(hosted, server):
    from hookwire.server.hf_modules import plain_hf_model
    return {n: plain_hf_model(h.bridge) for n, h in hosted.items()}


def store_output(state, module, args, output):
    state.append(output[0] if isinstance(output, tuple) else output)


def double_input(module, args):
    args[0].mul_(2.0)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_generation_steps_keep_values_that_show_the_next_blocks_edit(server, plain, name):
    b0, b1 = BLOCKS[name]
    states = {"remote": [], "local": []}

    def hooks(state):
        return {b0: functools.partial(store_output, state), b1 + ":input": double_input}
    remote = hhf.RemoteModel(name).generate(PROMPT, 3, hooks(states["remote"]))
    local = hhf.LocalModel(plain[name]).generate(PROMPT, 3, hooks(states["local"]))
    assert torch.equal(remote.sequences, local.sequences)
    assert len(states["remote"]) == len(states["local"]) == 3
    for r, loc in zip(states["remote"], states["local"]):
        assert_close(r, loc)
