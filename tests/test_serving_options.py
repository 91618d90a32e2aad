"""How models are hosted: dtypes (bf16 and fp16 remote == local, checkpoints keep theirs),
the whole config on the client (lists, dtype), models without a tokenizer, base models
without an LM head, architectures refused at load with the reason, and the ``serve`` flags.

Every server here is real (127.0.0.1) and stopped by the test that started it.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.testing import assert_close

import hookwire
import hookwire.client
import hookwire.hf as hhf
import hookwire.nnsight as hnn
import hookwire.pyvene as hpv
import hookwire.transformerlens as htl
import pyvene as pv
from hookwire.errors import HookwireError, UnsupportedModel
from hookwire.families import (base_architectures, build_hf_model, family_for_architecture,
                               refusal, served_architectures, tl_architectures)
from hookwire.hf.local import LocalModel
from hookwire.server.models import BUILTIN_MODELS, load_model, wrap_in_bridge
from hookwire.tl_architectures import TL_ARCHITECTURES

from family_configs import tiny_config
from serving import serving

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

TOKENS = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(3))
SOURCE = torch.randint(3, 250, (2, 6), generator=torch.Generator().manual_seed(4))




# ---- the family table ------------------------------------------------------------------------

def test_snapshot_of_transformerlens_table_is_current():
    """Clients without TL 4 use the snapshot; it must be TL's table as installed."""
    assert tl_architectures() == TL_ARCHITECTURES


def test_families_listed_in_the_issue_are_served():
    wanted = {"GPT2LMHeadModel", "GPTNeoForCausalLM", "GPTNeoXForCausalLM", "GPTJForCausalLM",
              "OPTForCausalLM", "BloomForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
              "MixtralForCausalLM", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM",
              "Qwen3ForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
              "PhiForCausalLM", "Phi3ForCausalLM", "Olmo2ForCausalLM", "StableLmForCausalLM",
              "GraniteForCausalLM"}
    assert wanted <= served_architectures()
    assert {"GPT2Model", "LlamaModel"} <= set(base_architectures())


@pytest.mark.parametrize("arch,why", [
    ("T5ForConditionalGeneration", "encoder-decoder"),
    ("BertForMaskedLM", "masked language model"),
    ("Gemma3ForConditionalGeneration", "images or audio"),
    ("BaichuanForCausalLM", "never runs a checkpoint's code"),
    ("ViTModel", "not a language model"),
    ("NoSuchForCausalLM", "no bridge"),
])
def test_unserved_architectures_say_why(arch, why):
    assert why in refusal(arch)
    with pytest.raises(UnsupportedModel, match=arch):
        family_for_architecture(arch)


def test_checkpoint_of_an_unserved_architecture_is_refused_at_load(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration
    cfg = T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=100, d_kv=16)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5")
    with pytest.raises(UnsupportedModel, match="T5ForConditionalGeneration.*encoder-decoder"):
        load_model(str(tmp_path / "t5"))


def test_a_model_that_is_not_causal_is_served_unpadded():
    """BERT as a decoder without is_decoder=True attends both ways: a later token changes
    earlier positions, so right-padding a short request to a batch mate's length would change
    its result. The server hosts it, says so in the manifest, and never pads it: requests of
    equal length share a forward, others get their own. Sent together, requests of two
    lengths each equal the local bridge's run on the same weights."""
    arch = "BertLMHeadModel"
    config = dict(tiny_config(arch, family_for_architecture(arch).config_class),
                  is_decoder=False)
    served, cfg = build_hf_model(arch, config, seed=0)
    local_hf, _ = build_hf_model(arch, config, seed=0)
    local = wrap_in_bridge(local_hf, arch, cfg, None, "bert")
    gen = torch.Generator().manual_seed(5)
    short, long = (torch.randint(3, 90, (2, n), generator=gen) for n in (4, 7))
    assert not torch.equal(local(torch.cat([short, long[:, 4:]], 1))[:, :4], local(short)), \
        "the model must be one a later token changes (else this test proves nothing)"

    def scale(x, hook):
        return x * 1.5

    def hooks(site):
        return [(site, scale)]

    with serving(models={"bert": served}):
        assert hookwire.client.get_connection().model_info("bert").causal is False
        remote = htl.RemoteModel("bert")
        site = "blocks.0.hook_out"
        inputs = [short, long, short.flip(0), long.flip(0)]
        runs = [remote.run_with_hooks(t, fwd_hooks=hooks(site), remote=True, blocking=False)
                for t in inputs]
        results = hookwire.gather(runs)
        for t, got in zip(inputs, results):
            assert_close(got, local.run_with_hooks(t, fwd_hooks=hooks(site)),
                         rtol=1e-5, atol=1e-5)


def test_hosting_a_copy_keeps_the_order_its_sets_iterate_in():
    """Gemma 4's forward computes one rotary table per element of ``set(layer_types)``, so
    its ``rotary_emb.hook_cos`` call 0 is whichever the set yields first. The server hosts a
    copy of a model object; a plain deepcopy of that set reverses its order under some hash
    seeds (PYTHONHASHSEED=2 here), and the copy's call 0 would be the caller's call 1."""
    code = "\n".join([
        "import copy",
        "from hookwire.families import build_hf_model, family_for_architecture",
        "from hookwire.server.models import copy_keeping_set_order",
        "from family_configs import tiny_config",
        "arch = 'Gemma4ForCausalLM'",
        "cfg = tiny_config(arch, family_for_architecture(arch).config_class)",
        "model, _ = build_hf_model(arch, cfg, seed=0)",
        "want = list(model.model.unique_layer_types)",
        "assert list(copy.deepcopy(model).model.unique_layer_types) != want, 'no flip'",
        "assert list(copy_keeping_set_order(model).model.unique_layer_types) == want",
        "print('kept')"])
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONHASHSEED="2", PYTHONPATH=tests)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and "kept" in out.stdout, out.stderr[-2000:]


# ---- dtypes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_half_precision_remote_equals_local(name, dtype):
    dtype_name = str(dtype).replace("torch.", "")
    local = load_model(name, dtype=dtype_name).bridge
    spec = BUILTIN_MODELS[name]
    local_hf, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed, dtype=dtype)
    with serving(models=[name], dtype=dtype_name):
        remote = htl.RemoteModel(name)
        assert remote.cfg.dtype == dtype == local.cfg.dtype
        d_model = remote.cfg.d_model

        def hooks(model, store):
            def steer(x, hook):  # the known failure: cfg.dtype was float32 on the stand-in
                return x + torch.ones(d_model, dtype=model.cfg.dtype) * 0.5

            def keep(x, hook):
                store[hook.name] = x.clone()
            return [("blocks.0.hook_resid_post", steer), ("blocks.1.hook_resid_post", keep)]
        local_store, remote_store = {}, {}
        expected = local.run_with_hooks(TOKENS, fwd_hooks=hooks(local, local_store))
        got = remote.run_with_hooks(TOKENS, fwd_hooks=hooks(remote, remote_store))
        assert got.dtype == dtype
        assert_close(got, expected, rtol=0, atol=0)
        assert_close(remote_store, local_store, rtol=0, atol=0)

        path = "transformer.h.0" if name == "tiny-gpt2" else "model.layers.0"
        hooked = {path: lambda m, a, out: (out[0] * 0.5,) + out[1:] if isinstance(out, tuple)
                  else out * 0.5}
        got = hhf.RemoteModel(name).run_with_hooks(TOKENS, hooks=hooked).logits
        expected = LocalModel(local_hf).run_with_hooks(TOKENS, hooks=hooked).logits
        assert got.dtype == dtype
        assert_close(got, expected, rtol=0, atol=0)


def test_bfloat16_checkpoint_keeps_its_dtype_unless_told(tmp_path):
    spec = BUILTIN_MODELS["tiny-llama"]
    model, _ = build_hf_model(spec.architecture, spec.config, seed=0, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "llama-bf16")
    auto = load_model(str(tmp_path / "llama-bf16"))
    assert auto.dtype == torch.bfloat16 and auto.config_dict["dtype"] == "bfloat16"
    assert load_model(str(tmp_path / "llama-bf16"), dtype="float32").dtype == torch.float32
    with serving(models=[str(tmp_path / "llama-bf16")]):
        remote = htl.RemoteModel("llama-bf16")
        assert remote.cfg.dtype == torch.bfloat16
        assert_close(remote(TOKENS), auto.bridge(TOKENS), rtol=0, atol=0)


def test_non_scalar_config_values_reach_the_client():
    """GPT-Neo's attention_types (a nested list) and its dtype: the stand-in is built from
    the same config as the server's model, not from its defaults."""
    arch = "GPTNeoForCausalLM"
    config = tiny_config(arch, family_for_architecture(arch).config_class)
    model, cfg = build_hf_model(arch, config, seed=0, dtype=torch.bfloat16)
    with serving(models={"neo": model}):
        remote = htl.RemoteModel("neo")
        stand_in_cfg = remote.original_model.config
        assert stand_in_cfg.attention_types == cfg.attention_types == [[["global", "local"], 1]]
        assert stand_in_cfg.attention_layers == ["global", "local"]
        assert remote.cfg.dtype == torch.bfloat16
        assert_close(remote(TOKENS), hookwire_local_bridge(arch, config, torch.bfloat16)(TOKENS),
                     rtol=0, atol=0)


def hookwire_local_bridge(arch, config, dtype=None):
    model, cfg = build_hf_model(arch, config, seed=0, dtype=dtype)
    return wrap_in_bridge(model, arch, cfg, None, "local")


# ---- tokenizers --------------------------------------------------------------------------------

def test_bridge_without_a_tokenizer_is_served_and_to_tokens_says_why():
    spec = BUILTIN_MODELS["tiny-gpt2"]
    model, cfg = build_hf_model(spec.architecture, spec.config, seed=0)
    bridge = wrap_in_bridge(model, spec.architecture, cfg, None, "no-tok")
    assert bridge.tokenizer is None
    local = hookwire_local_bridge(spec.architecture, spec.config)
    with serving(models={"no-tok": bridge}):
        remote = htl.RemoteModel("no-tok")
        assert_close(remote(TOKENS), local(TOKENS))
        with pytest.raises(HookwireError, match="without a tokenizer.*token ids"):
            remote.to_tokens("hello")
        with pytest.raises(HookwireError, match="without a tokenizer"):
            remote.run_with_hooks("hello", fwd_hooks=[])
        # nnsight's spelling: token ids trace as with a tokenizer, text says why it cannot.
        nn_remote = hnn.RemoteLanguageModel("no-tok")
        with nn_remote.trace(TOKENS):
            hidden = nn_remote.transformer.h[0].output.save()
            logits = nn_remote.output.logits.save()
        assert_close(logits, local(TOKENS))
        assert_close(hidden, local.run_with_cache(TOKENS)[1]["blocks.0.hook_out"])
        with pytest.raises(HookwireError, match="without a tokenizer.*token ids"):
            with nn_remote.trace("hello"):
                pass


def test_checkpoint_folder_without_tokenizer_files(tmp_path):
    spec = BUILTIN_MODELS["tiny-llama"]
    model, _ = build_hf_model(spec.architecture, spec.config, seed=0)
    model.save_pretrained(tmp_path / "bare")
    model.save_pretrained(tmp_path / "with-tok")
    tokenizer = load_model("tiny-llama").tokenizer
    tokenizer.save_pretrained(tmp_path / "with-tok")
    with serving(models=[str(tmp_path / "bare"), str(tmp_path / "with-tok")]):
        bare = htl.RemoteModel("bare")
        with pytest.raises(HookwireError, match="without a tokenizer"):
            bare.to_tokens("hello world")
        assert_close(bare(TOKENS), model(input_ids=TOKENS).logits)
        with_tok = htl.RemoteModel("with-tok")
        local = load_model(str(tmp_path / "with-tok")).bridge   # TL with the folder's files
        assert torch.equal(with_tok.to_tokens("hello world"), local.to_tokens("hello world"))
        assert with_tok.to_tokens("hello world").shape[1] > 2   # not just BOS


# ---- base models without an LM head --------------------------------------------------------------

BASES = {"GPT2Model": dict(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=300),
         "LlamaModel": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=300)}


@pytest.mark.parametrize("arch", list(BASES))
def test_base_model_is_hosted_and_returns_what_the_local_model_returns(arch, tmp_path):
    model, _ = build_hf_model(arch, BASES[arch], seed=0)
    model.save_pretrained(tmp_path / "base")   # served from a checkpoint folder, as in use
    local, _ = build_hf_model(arch, BASES[arch], seed=0)
    layer = "h.0" if arch == "GPT2Model" else "layers.0"

    def double(module, args, output):
        return (output[0] * 2,) + output[1:] if isinstance(output, tuple) else output * 2
    with serving(models=[str(tmp_path / "base")]):
        remote = hhf.RemoteModel("base")
        got = remote.run_with_hooks(TOKENS, hooks={layer: double})
        expected = LocalModel(local).run_with_hooks(TOKENS, hooks={layer: double})
        assert type(got) is type(expected) and not hasattr(got, "logits")
        assert_close(got.last_hidden_state, expected.last_hidden_state)
        plain = remote.run_with_hooks(TOKENS)    # no hooks at all: the plain forward
        assert_close(plain.last_hidden_state, local(input_ids=TOKENS).last_hidden_state)

        def config():
            return pv.IntervenableConfig([{"layer": 0, "component": "block_output",
                                           "intervention_type": pv.VanillaIntervention}])
        call = ({"input_ids": TOKENS}, [{"input_ids": SOURCE}], {"sources->base": 3})
        expected = pv.IntervenableModel(config(), copy.deepcopy(local))(*call)
        got = hpv.RemoteIntervenableModel(config(), "base")(*call)
        assert_close(got[1].last_hidden_state, expected[1].last_hidden_state)

        with pytest.raises(UnsupportedModel, match="no LM head.*hookwire.hf"):
            htl.RemoteModel("base")
        with pytest.raises(UnsupportedModel, match="no LM head"):
            remote.generate(TOKENS, max_new_tokens=2)


# ---- the serve command ---------------------------------------------------------------------------

def _serve(*args, timeout=180):
    return subprocess.Popen([sys.executable, "-m", "hookwire", "serve", "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_dtype_and_device_flags():
    proc = _serve("--model", "tiny-gpt2", "--dtype", "bfloat16", "--device", "cpu")
    try:
        line = proc.stdout.readline()
        assert line.startswith("hookwire serving tiny-gpt2 on ws://127.0.0.1:"), \
            line + proc.stderr.read()
        url = line.split()[-1]
        remote = htl.RemoteModel("tiny-gpt2", url=url)
        assert remote.cfg.dtype == torch.bfloat16
        local = load_model("tiny-gpt2", dtype="bfloat16").bridge
        assert_close(remote(TOKENS), local(TOKENS), rtol=0, atol=0)
    finally:
        hookwire.client.close_connections()
        proc.terminate()
        proc.wait(60)


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda:99"], "CUDA device"),
    (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
    (["--device", "cpu", "--device-map", "auto"], "exclude each other"),
    (["--dtype", "int8"], "invalid choice"),
])
def test_serve_refuses_bad_device_and_dtype(args, message):
    proc = _serve("--model", "tiny-gpt2", *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert message in err
