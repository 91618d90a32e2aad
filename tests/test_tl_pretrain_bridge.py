"""A TransformerLens bridge over a model that is no HF model and not causal -- the kind TL's
own tests build by hand (``build_pretrain_bridge``) -- hosted and run remotely as locally:

- the server hosts it although a later token changes earlier positions (its attention looks
  both ways), and never pads it: requests of different lengths sent together each equal
  their local run;
- its config declares a larger vocabulary than its LM head has (as TL's test models do): the
  server measures the output's width at load, and traced logits use it;
- backward hooks with a plain forward and ``.backward()`` afterwards (TL's hook-orchestration
  tests' spelling): the backward runs on the server on demand, and the hooks see the local
  gradients.

The model below is written here; it follows the module protocol TL's pretrain adapter
documents (embed / blocks[i].norm1, attn, norm2, mlp with gate/up/down / norm_f / lm_head;
blocks take cos and sin). Every server is real (127.0.0.1) and stopped by its test.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import hookwire
import hookwire.client
import hookwire.transformerlens  # noqa: F401  (installs remote= on TL's methods)
from transformer_lens.config.transformer_bridge_config import TransformerBridgeConfig
from transformer_lens.model_bridge.supported_architectures.pretrain import (
    ARCHITECTURE_NAME, build_pretrain_bridge)

from serving import serving

VOCAB, D_MODEL, N_HEADS, N_LAYERS = 48, 16, 2, 2
TOL = dict(rtol=1e-5, atol=1e-6)


class Scale(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x):
        return x * self.weight


class BidirectionalAttention(nn.Module):
    """Softmax attention with no causal mask: every position sees every other."""

    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x, cos, sin):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / x.shape[-1] ** 0.5, dim=-1)
        return self.out(weights @ v)


class SwiGLU(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate = nn.Linear(d, 2 * d, bias=False)
        self.up = nn.Linear(d, 2 * d, bias=False)
        self.down = nn.Linear(2 * d, d, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1, self.attn = Scale(d), BidirectionalAttention(d)
        self.norm2, self.mlp = Scale(d), SwiGLU(d)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PretrainStyleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, D_MODEL)
        self.blocks = nn.ModuleList(Block(D_MODEL) for _ in range(N_LAYERS))
        self.norm_f = Scale(D_MODEL)
        self.lm_head = nn.Linear(D_MODEL, VOCAB, bias=False)

    def forward(self, tokens, **kwargs):
        x = self.embed(tokens)
        half = D_MODEL // N_HEADS // 2
        cos, sin = torch.ones(tokens.shape[1], half), torch.zeros(tokens.shape[1], half)
        for block in self.blocks:
            x = block(x, cos, sin)
        return {"logits": self.lm_head(self.norm_f(x))}


def build_bridge():
    torch.manual_seed(0)
    cfg = TransformerBridgeConfig(d_model=D_MODEL, d_head=D_MODEL // N_HEADS,
                                  n_layers=N_LAYERS, n_ctx=64, n_heads=N_HEADS,
                                  d_vocab=4 * VOCAB,  # more than the LM head has, as TL's own
                                  d_mlp=2 * D_MODEL, architecture=ARCHITECTURE_NAME)
    return build_pretrain_bridge(PretrainStyleModel(), cfg)


@pytest.fixture(scope="module")
def hosted():
    """(local bridge, server URL): the server hosts a copy of the very same bridge."""
    local = build_bridge()
    with serving(models={"pretrain": copy.deepcopy(local)}) as srv:
        yield local, srv.url


def remote(url):
    return dict(remote=url, remote_model="pretrain")


def test_manifest_says_not_causal_and_the_measured_width(hosted):
    local, url = hosted
    info = hookwire.client.get_connection(url).model_info("pretrain")
    assert info.causal is False
    assert info.output_width == VOCAB != local.cfg.d_vocab


def test_requests_of_different_lengths_each_equal_local(hosted):
    local, url = hosted
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randint(0, VOCAB, (1, n), generator=gen) for n in (3, 7, 3, 7, 5)]
    # The model must be one a later token changes, or this test would prove nothing.
    longer = torch.cat([inputs[0], inputs[1][:, :2]], dim=1)
    assert not torch.allclose(local(longer)[:, :3], local(inputs[0]))

    def hooks():
        return [("blocks.0.hook_out", lambda x, hook: x * 1.25)]
    runs = [local.run_with_hooks(t, fwd_hooks=hooks(), blocking=False, **remote(url))
            for t in inputs]
    for t, got in zip(inputs, hookwire.gather(runs)):
        assert_close(got.detach(), local.run_with_hooks(t, fwd_hooks=hooks()).detach(),
                     **TOL)


def test_plain_forward_then_backward_runs_backward_hooks_remotely(hosted):
    """TL's hook-orchestration spelling: hooks() with backward hooks, then
    ``bridge(tokens).sum().backward()`` -- and a metric on the logits in a permanent hook's
    ``add_hook`` spelling."""
    local, url = hosted
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))
    names = ["blocks.0.hook_out", "blocks.1.hook_out"]

    def run(**kw):
        grads, acts = {}, {}
        with local.hooks(fwd_hooks=[(n, lambda x, hook: acts.__setitem__(hook.name,
                                                                         x.detach()))
                                    for n in names],
                         bwd_hooks=[(n, lambda g, hook: grads.__setitem__(hook.name,
                                                                          g.detach()))
                                    for n in names], **kw):
            logits = local(tokens)
            logits.log_softmax(-1)[:, -1, 3].sum().backward()
        local.zero_grad(set_to_none=True)
        return logits.detach(), acts, grads

    expected, got = run(), run(**remote(url))
    assert_close(got[0], expected[0], **TOL)
    for want, have in zip(expected[1:], got[1:]):
        assert sorted(have) == sorted(want) and want
        for name in want:
            assert_close(have[name], want[name], **TOL)
