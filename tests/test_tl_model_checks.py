"""What is checked before a remote TL call is sent: the local model must be the server
model's architecture and shapes; token ids must be integers; a hand-made HookedRootModule
cannot stand for a server model. And bridges over non-HF modules (TL's native models) can be
hosted and run remotely."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import hookwire.client
import hookwire.server as hs
import hookwire.transformerlens as htl
from hookwire.errors import HookwireError
from hookwire.families import build_hf_model
from hookwire.server.models import wrap_in_bridge
from hookwire.tokenizer import byte_level_tokenizer


def _double(act, hook):
    return act * 2


def test_other_architecture_is_refused_before_sending(local_models, tokens):
    llama = local_models["tiny-llama"]
    with pytest.raises(HookwireError, match="LlamaForCausalLM.*GPT2LMHeadModel"):
        llama.run_with_hooks(tokens, remote=True, remote_model="tiny-gpt2",
                             fwd_hooks=[("blocks.0.hook_resid_post", _double)])
    with pytest.raises(HookwireError, match="same architecture"):
        with llama.hooks(fwd_hooks=[("blocks.0.hook_resid_post", _double)], remote=True,
                         remote_model="tiny-gpt2"):
            llama(tokens)


def test_other_shapes_are_refused_before_sending(server, tokens):
    hf_model, cfg = build_hf_model("GPT2LMHeadModel", dict(
        n_layer=2, n_embd=32, n_head=4, n_positions=256, vocab_size=257, bos_token_id=256,
        eos_token_id=256), seed=1)
    narrow = wrap_in_bridge(hf_model, "GPT2LMHeadModel", cfg,
                            byte_level_tokenizer(bos_id=256), "narrow-gpt2")
    with pytest.raises(HookwireError, match="d_model=32.*d_model=64"):
        narrow.run_with_hooks(tokens, remote=True, remote_model="tiny-gpt2",
                              fwd_hooks=[("blocks.0.hook_resid_post", _double)])


@pytest.mark.parametrize("name", ("tiny-gpt2", "tiny-llama"))
def test_float_token_ids_raise_as_locally(local_models, remote_models, tokens, name):
    local, remote = local_models[name], remote_models[name]
    floats = tokens.float()
    with pytest.raises(Exception):
        local(floats)  # TL hands floats to the model as input embeddings: wrong shape
    with pytest.raises(HookwireError, match="integer token ids"):
        remote(floats)
    with pytest.raises(HookwireError, match="integer token ids"):
        local.run_with_hooks(floats, remote=True, fwd_hooks=[("blocks.0.hook_resid_post",
                                                              _double)])
    assert_close(remote(floats.long()), local(tokens))  # .long(), as the message says


def test_hooked_root_module_gets_a_typed_error_not_a_type_error(server):
    from transformer_lens import HookedRootModule
    from transformer_lens.hook_points import HookPoint

    class Toy(HookedRootModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.hook_x = HookPoint()
            self.setup()

        def forward(self, x):
            return self.lin(self.hook_x(x))

    toy = Toy()
    x = torch.randn(2, 4)
    zero = [("hook_x", lambda act, hook: act * 0)]
    assert_close(toy.run_with_hooks(x, fwd_hooks=zero, remote=False),
                 toy.lin(torch.zeros(2, 4)))
    with pytest.raises(HookwireError, match="not a TransformerLens model"):
        toy.run_with_hooks(x, fwd_hooks=zero, remote=True)


def _native_bridge():
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=32, d_head=16, n_heads=2, n_layers=2, n_ctx=8,
                                  d_vocab=16, d_mlp=64, act_fn="gelu",
                                  normalization_type="LN", seed=0)
    return TransformerBridge.boot_native(cfg)


def test_native_tl_model_is_hosted_and_runs_remotely():
    """A bridge over TL's own native model (no HF model, no tokenizer, n_ctx=8) is served
    with its TL hook points; a local copy's hooks run on it and equal local TL."""
    local = _native_bridge()
    srv = hs.start(models={"native": copy.deepcopy(local)}, port=0)
    try:
        tokens = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
        got = local.run_with_hooks(tokens, remote=srv.url, remote_model="native",
                                   fwd_hooks=[("blocks.0.hook_resid_post", _double)])
        want = local.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", _double)])
        assert_close(got, want)
        got_logits, got_cache = local.run_with_cache(tokens, remote=srv.url,
                                                     remote_model="native")
        want_logits, want_cache = local.run_with_cache(tokens)
        assert_close(got_logits, want_logits)
        assert list(got_cache.keys()) == list(want_cache.keys())
        for key in want_cache.keys():
            assert_close(got_cache[key], want_cache[key])
        # no weightless stand-in for it: a typed error that says what to do
        with pytest.raises(HookwireError, match="remote_model='native'"):
            htl.RemoteModel("native", url=srv.url)
    finally:
        hookwire.client.close_connections()
        srv.stop()
