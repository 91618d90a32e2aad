"""pyvene's own integration tests (v0.1.8), spelled as pyvene spells them, against a server.

What pyvene's ``tests/integration_tests`` exercise, re-written here with models built from
configs (no hub): GPT-2 and Llama LMs loaded as pyvene's ``create_gpt2_lm`` / ``create_llama``
load them (eager attention), hosted in-process with ``hookwire.server.start(models={name:
obj})``; a tokenizer's ``BatchEncoding`` as base and sources; ``set_device``; ``save`` /
``load``. Every remote result is compared with local pyvene on the caller's own model object
(which hosting leaves untouched), and where pyvene's test compares two runs with each other,
that comparison is made remotely too. ``scripts/upstream/run_pyvene_tests.py`` runs pyvene's
test files themselves, re-pointed at a server.

(pyvene's ``test_*_demo`` and friends use ``GPT2Model``, a base model without an LM head: here
they run on a ``GPT2LMHeadModel`` of the same layout until base models can be hosted.)
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch.testing import assert_close

import pyvene as pv
from pyvene import (IntervenableConfig, RepresentationConfig, VanillaIntervention,
                    RotatedSpaceIntervention, LowRankRotatedSpaceIntervention)
from transformers import BatchEncoding, GPT2Config, GPT2LMHeadModel, LlamaConfig, \
    LlamaForCausalLM

import hookwire
import hookwire.client
import hookwire.pyvene as hpv
import hookwire.server as hs
from hookwire.errors import HookwireError
from hookwire.tokenizer import byte_level_tokenizer
from pyvene_inputs import record_sends
from serving import serving

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning",
                                        "ignore:To copy construct from a tensor:UserWarning")


def gpt2_lm(**cfg):
    """As pyvene's create_gpt2_lm(config=...) builds it: eager attention."""
    config = GPT2Config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return GPT2LMHeadModel(config)


def llama_lm(**cfg):
    config = LlamaConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models():
    """The caller's objects: pyvene's test models (shapes scaled down where pyvene's are large),
    and a 256-wide GPT-2 for the tokenizer-based demos (their partitions reach 256)."""
    return {
        # ComplexInterventionWithGPT2TestCase / InterventionWithGPT2TestCase
        "gpt2-pyvene": gpt2_lm(n_embd=24, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0,
                               summary_first_dropout=0.0, n_layer=4, bos_token_id=0,
                               eos_token_id=0, n_positions=128, vocab_size=10),
        # InterventionWithLlamaTestCase (4096 wide there)
        "llama-pyvene": llama_lm(bos_token_id=1, eos_token_id=2, intermediate_size=96,
                                 max_position_embeddings=128, num_attention_heads=8,
                                 num_hidden_layers=4, num_key_value_heads=8, hidden_size=64,
                                 rms_norm_eps=1e-5, vocab_size=10),
        # IntervenableBasicTestCase (gpt2-small there)
        "gpt2-demo": gpt2_lm(n_embd=256, n_layer=4, n_head=8, vocab_size=300, n_positions=128,
                             bos_token_id=256, eos_token_id=256),
    }


@pytest.fixture(scope="module")
def server(models):
    with serving(models=dict(models)) as srv:
        yield srv


@pytest.fixture(scope="module")
def tokenizer():
    return byte_level_tokenizer(bos_id=256)


def both(models, name, config_fn, **kwargs):
    """(local pyvene, remote) for the same config, the remote interventions holding the local
    ones' weights."""
    local = pv.IntervenableModel(config_fn(), models[name], **kwargs)
    remote = hpv.RemoteIntervenableModel(config_fn(), name, **kwargs)
    for key, iv in local.interventions.items():
        remote.interventions[key].load_state_dict(iv.state_dict())
    return local, remote


def same(got, expected):
    """Everything pyvene returns: output objects, logits, collected activations."""
    if expected is None or isinstance(expected, torch.Tensor):
        if expected is None:
            assert got is None
        else:
            assert_close(got, expected)
        return
    if isinstance(expected, (tuple, list)):
        assert type(got) is type(expected) and len(got) == len(expected)
        for g, e in zip(got, expected):
            same(g, e)
        return
    assert type(got) is type(expected)
    for field in ("logits", "loss", "original_outputs", "intervened_outputs",
                  "collected_activations"):
        if hasattr(expected, field):
            same(getattr(got, field), getattr(expected, field))


def ids(seed, batch, seq, vocab=10):
    return {"input_ids": torch.randint(0, vocab, (batch, seq),
                                       generator=torch.Generator().manual_seed(seed))}


# ---- ComplexInterventionWithGPT2TestCase ---------------------------------------------------

def test_clean_run_positive(models, server):
    gpt2 = models["gpt2-pyvene"]
    config = IntervenableConfig(
        model_type=type(gpt2),
        representations=[RepresentationConfig(0, "block_output", "pos", 1,
                                              subspace_partition=[[0, 6], [6, 24]])],
        intervention_types=VanillaIntervention)
    intervenable = hpv.RemoteIntervenableModel(config, "gpt2-pyvene")
    intervenable.set_device("cpu")
    base = ids(0, 10, 5)
    golden_out = gpt2(**base).logits
    our_output = intervenable(base, output_original_output=True)[0][0]
    assert_close(our_output, golden_out, rtol=1e-05, atol=1e-06)


@pytest.mark.parametrize("intervention_type", [VanillaIntervention, RotatedSpaceIntervention,
                                               LowRankRotatedSpaceIntervention])
def test_subspace_partition_in_forward(models, server, intervention_type):
    """pyvene's _test_subspace_partition_in_forward: partition [[0, 6], [6, 24]] with subspace
    0 equals dims 0..5 without a partition (use_fast), batch 10 with a source -- the case
    that crashed on eager attention. Both runs also equal local pyvene."""
    batch_size, gpt2 = 10, models["gpt2-pyvene"]

    def with_partition():
        return IntervenableConfig(
            model_type=type(gpt2),
            representations=[RepresentationConfig(0, "block_output", "pos", 1,
                                                  low_rank_dimension=24,
                                                  subspace_partition=[[0, 6], [6, 24]])],
            intervention_types=intervention_type)

    def without_partition():
        return IntervenableConfig(
            model_type=type(gpt2),
            representations=[RepresentationConfig(0, "block_output", "pos", 1,
                                                  low_rank_dimension=24)],
            intervention_types=intervention_type)

    base, source = ids(1, batch_size, 5), ids(2, batch_size, 5)
    locs = {"sources->base": ([[[0]] * batch_size], [[[0]] * batch_size])}
    local, intervenable = both(models, "gpt2-pyvene", with_partition, use_fast=False)
    intervenable.set_device("cpu")
    _, with_partition_our_output = intervenable(base, [source], locs,
                                                subspaces=[[[0]] * batch_size])
    same(with_partition_our_output,
         local(base, [source], locs, subspaces=[[[0]] * batch_size])[1])

    local_fast, fast = both(models, "gpt2-pyvene", without_partition, use_fast=True)
    fast.set_device("cpu")
    if intervention_type in {RotatedSpaceIntervention, LowRankRotatedSpaceIntervention}:
        list(fast.interventions.values())[0].rotate_layer.weight = \
            list(intervenable.interventions.values())[0].rotate_layer.weight
        list(local_fast.interventions.values())[0].rotate_layer.weight = \
            list(intervenable.interventions.values())[0].rotate_layer.weight
    subspaces = [[[i for i in range(6)]] * batch_size]
    _, without_partition_our_output = fast(base, [source], locs, subspaces=subspaces)
    same(without_partition_our_output, local_fast(base, [source], locs, subspaces=subspaces)[1])
    assert_close(with_partition_our_output[0], without_partition_our_output[0],
                 rtol=1e-05, atol=1e-06)


# ---- InterventionWithGPT2TestCase / InterventionWithLlamaTestCase -------------------------

HEAD_STREAMS = ["head_attention_value_output", "head_query_output", "head_key_output",
                "head_value_output"]


@pytest.mark.parametrize("name", ["gpt2-pyvene", "llama-pyvene"])
@pytest.mark.parametrize("stream", HEAD_STREAMS)
@pytest.mark.parametrize("layer", [0, 3])
def test_with_multiple_heads_positions_vanilla_intervention(models, server, name, stream,
                                                            layer):
    """Heads [3, 7] at positions [2, 6] (unit "h.pos"), batch 10, source one token longer."""
    heads, positions, b_s = [3, 7], [2, 6], 10
    base, source = ids(3, b_s, max(positions) + 1), ids(4, b_s, max(positions) + 2)

    def config():
        return IntervenableConfig(
            model_type=type(models[name]),
            representations=[RepresentationConfig(layer, stream, "h.pos", len(positions))],
            intervention_types=VanillaIntervention)

    local, intervenable = both(models, name, config)
    locs = {"sources->base": ([[[heads] * b_s, [positions] * b_s]],
                              [[[heads] * b_s, [positions] * b_s]])}
    _, out_output = intervenable(base, [source], locs)
    _, expected = local(base, [source], locs)
    assert_close(out_output[0], expected[0], rtol=1e-05, atol=1e-06)
    assert not torch.allclose(out_output[0], models[name](**base).logits)


# ---- IntervenableBasicTestCase, with a tokenizer's BatchEncoding ------------------------------

def test_lazy_demo(models, server, tokenizer):
    def config():
        return {"layer": 0, "component": "mlp_output",
                "source_representation": torch.zeros(models["gpt2-demo"].config.n_embd)}

    local, pv_gpt2 = both(models, "gpt2-demo", config)
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    assert isinstance(base, BatchEncoding) and not isinstance(base, dict)
    same(pv_gpt2(base=base, unit_locations={"base": 3}),
         local(base=base, unit_locations={"base": 3}))


def test_less_lazy_demo(models, server, tokenizer):
    def config():
        return pv.IntervenableConfig([{
            "layer": layer, "component": "mlp_output",
            "source_representation": torch.zeros(models["gpt2-demo"].config.n_embd)}
            for layer in range(4)], mode="parallel")

    local, pv_gpt2 = both(models, "gpt2-demo", config)
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    same(pv_gpt2(base=base, unit_locations={"base": 3}),
         local(base=base, unit_locations={"base": 3}))


def test_source_reprs_pass_in_unit_loc_broadcast_demo(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo",
                          lambda: {"layer": 0, "component": "mlp_output"})
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    reprs = torch.zeros(models["gpt2-demo"].config.n_embd)
    same(pv_gpt2(base=base, source_representations=reprs, unit_locations={"base": 3}),
         local(base=base, source_representations=reprs, unit_locations={"base": 3}))


def test_input_corrupt_multi_token(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        {"layer": 0, "component": "mlp_input"}, pv.AdditionIntervention))
    base = tokenizer("The Space Needle is in downtown", return_tensors="pt")
    noise = torch.rand(models["gpt2-demo"].config.n_embd,
                       generator=torch.Generator().manual_seed(5))
    kwargs = dict(unit_locations={"base": [[[0, 1, 2, 3]]]}, source_representations=noise)
    same(pv_gpt2(base=base, **kwargs), local(base=base, **kwargs))


def test_trainable_backward(models, server, tokenizer):
    """loss.backward() through a remote call gives the rotation the local gradient."""
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        {"layer": 2, "component": "block_output", "low_rank_dimension": 1},
        pv.LowRankRotatedSpaceIntervention))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = tokenizer("The capital of Italy is", return_tensors="pt")
    grads = []
    for model in (local, pv_gpt2):
        logits = model(base=base, sources=sources, unit_locations={"sources->base": 3})[-1].logits
        logits.sum().backward()
        grads.append([p.grad.clone() for p in model.get_trainable_parameters()])
    for g, e in zip(grads[1], grads[0]):
        assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_reprs_collection(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        {"layer": 3, "component": "block_output", "intervention_type": pv.CollectIntervention}))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    got = pv_gpt2(base=base, unit_locations={"sources->base": 3})[0][-1]
    same(got, local(base=base, unit_locations={"sources->base": 3})[0][-1])


def test_reprs_collection_after_intervention(models, server, tokenizer):
    def config():
        config = pv.IntervenableConfig({"layer": 1, "component": "block_output",
                                        "intervention_type": pv.VanillaIntervention})
        config.add_intervention({"layer": 3, "component": "block_output",
                                 "intervention_type": pv.CollectIntervention})
        return config

    local, pv_gpt2 = both(models, "gpt2-demo", config)
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")
    kwargs = dict(sources=[source, None], unit_locations={"sources->base": 3})
    same(pv_gpt2(base=base, **kwargs)[0][-1], local(base=base, **kwargs)[0][-1])


def test_reprs_collection_on_one_neuron(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        {"layer": 2, "component": "head_attention_value_output", "unit": "h.pos",
         "intervention_type": pv.CollectIntervention}))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    kwargs = dict(unit_locations={"base": pv.GET_LOC((3, 3))}, subspaces=[0])
    same(pv_gpt2(base=base, **kwargs)[0][-1], local(base=base, **kwargs)[0][-1])


def test_intervention_grouping(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "block_output", "group_key": 0},
         {"layer": 2, "component": "block_output", "group_key": 0}],
        intervention_types=pv.VanillaIntervention))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = [tokenizer("The capital of Italy is", return_tensors="pt")]
    locs = {"sources->base": ([[[3]], [[4]]], [[[3]], [[4]]])}
    same(pv_gpt2(base, sources, locs), local(base, sources, locs))


def test_intervention_skipping(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "block_output"}] * 3,
        intervention_types=pv.VanillaIntervention))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")
    calls = [([None, None, source], ([None, None, [[4]]], [None, None, [[4]]])),
             ([None, source, None], ([None, [[4]], None], [None, [[4]], None])),
             ([source, None, None], ([[[4]], None, None], [[[4]], None, None]))]
    outs = []
    for sources, locs in calls:
        _, out = pv_gpt2(base, sources, {"sources->base": locs})
        same(out, local(base, sources, {"sources->base": locs})[1])
        outs.append(out)
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[1].logits, outs[2].logits)


def test_subspace_intervention(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "block_output",
          "subspace_partition": [[0, 128], [128, 256]]}],
        intervention_types=pv.VanillaIntervention))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")
    same(pv_gpt2(base, [source], {"sources->base": 4}, subspaces=1),
         local(base, [source], {"sources->base": 4}, subspaces=1))


def test_linked_intervention_and_weights_sharing(models, server, tokenizer):
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "block_output",
          "subspace_partition": [[0, 128], [128, 256]], "intervention_link_key": 0}] * 2,
        intervention_types=pv.VanillaIntervention))
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    source = tokenizer("The capital of Italy is", return_tensors="pt")
    calls = [([None, source], ([None, [[4]]], [None, [[4]]]), [None, [[1]]]),
             ([source, None], ([[[4]], None], [[[4]], None]), [[[1]], None]),
             ([source, source], ([[[4]], [[4]]], [[[4]], [[4]]]), [[[0]], [[1]]]),
             ([source, source], ([[[4]], [[4]]], [[[4]], [[4]]]), [[[1]], [[0]]])]
    outs = []
    for sources, locs, subspaces in calls:
        _, out = pv_gpt2(base, sources, {"sources->base": locs}, subspaces=subspaces)
        same(out, local(base, sources, {"sources->base": locs}, subspaces=subspaces)[1])
        outs.append(out)
    assert torch.equal(outs[0].logits, outs[1].logits)
    assert torch.equal(outs[2].logits, outs[3].logits)


def test_multisource_parallel(models, server, tokenizer):
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = [tokenizer("The capital of Italy is", return_tensors="pt"),
               tokenizer("The capital of China is", return_tensors="pt")]
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "mlp_output"}, {"layer": 2, "component": "mlp_output"}],
        mode="parallel"))
    same(pv_gpt2(base, sources, {"sources->base": 4}), local(base, sources, {"sources->base": 4}))
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "block_output",
          "subspace_partition": [[0, 128], [128, 256]]}] * 2,
        intervention_types=pv.VanillaIntervention, mode="parallel"))
    kwargs = dict(subspaces=[[[0]], [[1]]])
    same(pv_gpt2(base, sources, {"sources->base": 4}, **kwargs),
         local(base, sources, {"sources->base": 4}, **kwargs))


def test_multisource_serial(models, server, tokenizer):
    base = tokenizer("The capital of Spain is", return_tensors="pt")
    sources = [tokenizer("The capital of Italy is", return_tensors="pt"),
               tokenizer("The capital of China is", return_tensors="pt")]
    locs = {"source_0->source_1": 3, "source_1->base": 4}
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "mlp_output"}, {"layer": 2, "component": "mlp_output"}],
        mode="serial"))
    same(pv_gpt2(base, sources, locs), local(base, sources, locs))
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": 0, "component": "block_output",
          "subspace_partition": [[0, 128], [128, 256]]},
         {"layer": 2, "component": "block_output",
          "subspace_partition": [[0, 128], [128, 256]]}],
        intervention_types=pv.VanillaIntervention, mode="serial"))
    same(pv_gpt2(base, sources, locs, subspaces=[[[0]], [[1]]]),
         local(base, sources, locs, subspaces=[[[0]], [[1]]]))


# ---- inputs as pyvene takes them -------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("layer", [0, 3])
@pytest.mark.parametrize("same_length", [True, False])
def test_padded_batch_encodings(models, server, tokenizer, padding_side, layer, same_length):
    """A padded batch from the tokenizer as base and source, an eager model, the swap before
    the last layer (the source rows leave the batch there, and the padding mask with them).
    Padded to one length, everything equals local pyvene. Of different lengths, the server
    pads the shorter inputs once more, on the right, and every real position still equals
    local pyvene; positions the mask marks as padding hold values that depend on how much
    padding a row has, locally as well (a fully masked query attends everywhere), and are
    not compared."""
    tok = copy.deepcopy(tokenizer)
    tok.padding_side = padding_side
    pad = dict(padding="max_length", max_length=26) if same_length else dict(padding=True)
    base = tok(["The capital of Spain is", "Hi"], return_tensors="pt", **pad)
    source = tok(["Rome", "The capital of Italy is!"], return_tensors="pt", **pad)
    local, pv_gpt2 = both(models, "gpt2-demo", lambda: pv.IntervenableConfig(
        [{"layer": layer, "component": "block_output"}]))
    kwargs = dict(output_original_output=True)
    got = pv_gpt2(base, [source], {"sources->base": 1}, **kwargs)
    expected = local(base, [source], {"sources->base": 1}, **kwargs)
    if same_length:
        same(got, expected)
        return
    real = base["attention_mask"].bool()
    for g, e in zip(got, expected):
        assert_close(g.logits[real], e.logits[real])


def test_mappings_of_every_kind_and_labels_in_the_base(models, server):
    from collections import OrderedDict, UserDict

    local, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}]))
    base, source = ids(6, 3, 6), ids(7, 3, 6)
    labels = ids(8, 3, 6)["input_ids"]
    for wrap in (dict, OrderedDict, UserDict, BatchEncoding):
        b = wrap({**base, "labels": labels})   # both runs get the base's loss, as locally
        got = remote(b, wrap(source), {"sources->base": 2}, output_original_output=True)
        same(got, local(b, wrap(source), {"sources->base": 2}, output_original_output=True))
        assert got[0].loss is not None and got[1].loss is not None
    # labels=: only the intervened run's loss (pyvene passes them to that forward only)
    got = remote(base, [source], {"sources->base": 2}, labels=labels,
                 output_original_output=True)
    same(got, local(base, [source], {"sources->base": 2}, labels=labels,
                    output_original_output=True))
    assert got[0].loss is None and got[1].loss is not None


def test_inputs_the_server_cannot_take_are_refused_by_name(models, server):
    _, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}]))
    base = ids(9, 2, 5)
    with pytest.raises(hpv.UnsupportedInput, match="token_type_ids"):
        remote({**base, "token_type_ids": torch.zeros(2, 5, dtype=torch.long)}, [base],
               {"sources->base": 1})
    with pytest.raises(hpv.UnsupportedInput, match="mapping"):
        remote(base["input_ids"], [base], {"sources->base": 1})
    with pytest.raises(hpv.UnsupportedInput, match="integer token ids"):
        remote({"input_ids": base["input_ids"].float()}, [base], {"sources->base": 1})
    with pytest.raises(hpv.UnsupportedInput, match="twice"):
        remote({**base, "labels": base["input_ids"]}, [base], {"sources->base": 1},
               labels=base["input_ids"])


# ---- set_device, save / load, the rest of pyvene's surface ---------------------------------

def test_set_device_moves_interventions_and_outputs_follow_the_inputs(models, server):
    _, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output",
          "intervention_type": pv.RotatedSpaceIntervention}]))
    assert remote.get_device() == torch.device("cpu")
    remote.set_device("meta", set_model=True)   # the served model stays where it is
    assert all(p.device.type == "meta" for p in remote.get_trainable_parameters())
    assert remote.get_device() == torch.device("meta")
    _, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output",
          "intervention_type": pv.RotatedSpaceIntervention}]))
    remote.set_device("cpu")
    base = ids(10, 2, 5)
    with torch.no_grad():
        out = remote(base, [ids(11, 2, 5)], {"sources->base": 1})[1]
    assert out.logits.device == base["input_ids"].device


def test_save_and_load(models, server, tmp_path, tokenizer):
    """pyvene's spelling: model.save(dir); IntervenableModel.load(dir, model=...) -- here the
    model is the served model's name. Trained weights, a constant source and linked keys
    come back; the loaded model gives the saved one's outputs."""
    def config():
        return pv.IntervenableConfig([
            {"layer": 1, "component": "block_output", "low_rank_dimension": 2,
             "intervention_type": pv.LowRankRotatedSpaceIntervention},
            {"layer": 2, "component": "mlp_output", "intervention_type": pv.AdditionIntervention,
             "source_representation": torch.full((256,), 0.5)},
            {"layer": 3, "component": "block_output", "intervention_link_key": 7,
             "intervention_type": pv.BoundlessRotatedSpaceIntervention},
            {"layer": 3, "component": "block_output", "intervention_link_key": 7,
             "intervention_type": pv.BoundlessRotatedSpaceIntervention}])

    _, pv_gpt2 = both(models, "gpt2-demo", config)
    with torch.no_grad():
        for p in pv_gpt2.get_trainable_parameters():
            if p.is_floating_point():
                p.add_(0.01 * torch.randn(p.shape,
                                          generator=torch.Generator().manual_seed(12)))
    base = tokenizer(["The capital of Spain is"], return_tensors="pt")
    source = tokenizer(["The capital of Italy is"], return_tensors="pt")
    locs = {"sources->base": 3}
    sources = [source, None, source, source]
    with torch.no_grad():
        before = pv_gpt2(base, sources, locs)[1].logits
    pv_gpt2.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["hookwire_pyvene.json", "interventions.safetensors"]
    pv_gpt2_load = hpv.RemoteIntervenableModel.load(str(tmp_path), "gpt2-demo")
    assert pv_gpt2_load.sorted_keys == pv_gpt2.sorted_keys
    for key, iv in pv_gpt2.interventions.items():
        for (n, a), (_, b) in zip(iv.state_dict().items(),
                                  pv_gpt2_load.interventions[key].state_dict().items()):
            assert torch.equal(a, b), (key, n)
    keys = pv_gpt2_load.sorted_keys
    assert pv_gpt2_load.interventions[keys[2]] is pv_gpt2_load.interventions[keys[3]]
    with torch.no_grad():
        assert torch.equal(pv_gpt2_load(base, sources, locs)[1].logits, before)
    # save_intervention / load_intervention: weights onto an existing model
    fresh = hpv.RemoteIntervenableModel(config(), "gpt2-demo")
    fresh.load_intervention(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(base, sources, locs)[1].logits, before)


def test_path_patching_config_saves_and_loads(models, server, tmp_path):
    """pyvene's test_path_patching: a grouped config saved and loaded."""
    def path_patching_config(layer, last_layer, component="head_attention_value_output",
                             unit="h.pos"):
        intervening = [{"layer": layer, "component": component, "unit": unit, "group_key": 0}]
        restoring = [{"layer": layer, "component": "mlp_output", "group_key": 1}]
        for i in range(layer + 1, last_layer):
            restoring += [{"layer": i, "component": "attention_output", "group_key": 1},
                          {"layer": i, "component": "mlp_output", "group_key": 1}]
        return pv.IntervenableConfig(intervening + restoring)

    pv_gpt2 = hpv.RemoteIntervenableModel(path_patching_config(1, 4), "gpt2-demo")
    pv_gpt2.save(save_directory=str(tmp_path))
    loaded = hpv.RemoteIntervenableModel.load(str(tmp_path), "gpt2-demo")
    assert loaded.sorted_keys == pv_gpt2.sorted_keys
    assert dict(loaded._pv._intervention_group) == dict(pv_gpt2._pv._intervention_group)


def test_load_refuses_what_it_does_not_understand(models, server, tmp_path):
    _, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}]))
    remote.save(str(tmp_path / "ok"))
    config_path = tmp_path / "ok" / "hookwire_pyvene.json"
    saved = json.loads(config_path.read_text())
    key = saved["keys"][0]
    saved["interventions"][key]["type"] = "os.system"   # a name, never imported
    config_path.write_text(json.dumps(saved))
    with pytest.raises(hpv.SavedModelError, match="not one of"):
        hpv.RemoteIntervenableModel.load(str(tmp_path / "ok"), "gpt2-pyvene")
    # pyvene's own folders hold pickles: refused, with the way to bring the weights over
    local = pv.IntervenableModel(pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}]), copy.deepcopy(models["gpt2-pyvene"]))
    local.save(str(tmp_path / "pyvene"))
    with pytest.raises(hpv.SavedModelError, match="unpickle"):
        hpv.RemoteIntervenableModel.load(str(tmp_path / "pyvene"), "gpt2-pyvene")


def test_save_is_ours_not_nnsight_s(models, server, tmp_path):
    """pyvene imports nnsight, which mounts a save() on every object; ours must win."""
    _, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}]))
    assert "save" in dir(object())   # nnsight's mount is really there
    remote.save(str(tmp_path))
    assert (tmp_path / "interventions.safetensors").exists()


def test_what_a_remote_model_lacks_is_named(models, server):
    _, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}]))
    with pytest.raises(hpv.NotSupportedRemotely, match="get_cached_activations"):
        remote.get_cached_activations()
    with pytest.raises(AttributeError):   # still an AttributeError for hasattr() and friends
        remote.train_alignment
    with pytest.raises(HookwireError, match="generate"):
        remote.generate({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    with pytest.raises(HookwireError, match="never trained"):
        remote.enable_model_gradients()
    assert remote.count_parameters() == 0


# ---- hosting the caller's object leaves it as it was -----------------------------------------

def _snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m), m.training) for n, m in model.named_modules()],
            model.config.to_dict(), model.config._attn_implementation,
            [p.requires_grad for p in model.parameters()])


@pytest.mark.parametrize("make", [
    lambda: gpt2_lm(n_embd=32, n_layer=2, n_head=4, vocab_size=300, n_positions=64),
    lambda: llama_lm(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                     max_position_embeddings=64)])
def test_hosting_an_object_leaves_it_exactly_as_it_was(make):
    model = make()       # in training mode, as a freshly built HF model is
    tokens = torch.randint(0, 300, (2, 6), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        logits = model.eval()(input_ids=tokens).logits
    model.train()
    state, modules, config, attn, grads = _snapshot(model)
    srv = hs.start(models={"obj": model}, port=0)
    try:
        remote = hpv.RemoteIntervenableModel(pv.IntervenableConfig(
            [{"layer": 0, "component": "block_output"}]), "obj", url=srv.url)
        with torch.no_grad():
            remote_logits = remote({"input_ids": tokens})[1].logits

        def unchanged():
            now_state, now_modules, now_config, now_attn, now_grads = _snapshot(model)
            assert now_modules == modules and now_config == config and now_attn == attn
            assert now_grads == grads
            assert state.keys() == now_state.keys()
            assert all(torch.equal(state[k], now_state[k]) for k in state)
            with torch.no_grad():
                assert torch.equal(model.eval()(input_ids=tokens).logits, logits)
            model.train()

        unchanged()        # while the server hosts it
        assert_close(remote_logits, logits)
        # and it still works locally under pyvene, next to the server
        local = pv.IntervenableModel(pv.IntervenableConfig(
            [{"layer": 0, "component": "block_output"}]), model)
        assert torch.equal(local({"input_ids": tokens})[1].logits, logits)
    finally:
        hookwire.client.close_connections()
        srv.stop()
    model.train()
    for p, g in zip(model.parameters(), grads):
        p.requires_grad_(g)   # pyvene froze them, as it does locally
    unchanged()            # and after it stopped


# ---- a longer source does not pad the base ---------------------------------------------------

def test_read_length_of_unit_locations():
    from hookwire.pyvene.plan import read_length

    assert read_length("pos", [[3], [5, 1]]) == 6
    assert read_length("h.pos", [[[3, 7]] * 2, [[2, 6]] * 2]) == 7
    assert read_length("h.pos", [[[1]], [[[0, 4]]]]) == 5     # per-head positions, nested
    assert read_length("pos", None) is None                    # every position
    assert read_length("pos", [[-1]]) is None                  # counted from the row's end
    assert read_length("h", [[0, 1]]) is None                  # heads only: every position
    assert read_length("pos", [[torch.tensor(2)]]) is None      # a form we do not read


@pytest.mark.parametrize("mode", ["parallel", "serial"])
def test_a_longer_source_is_cut_to_what_is_read(models, server, monkeypatch, mode):
    """pyvene's head tests give a source one token longer than the base and read positions
    inside the base's length: the source rows are cut there, so the base rows are not padded
    and compute on exactly the shapes they have alone. Reading past the base's length keeps
    the whole source."""
    sent = record_sends(monkeypatch)
    base, source = ids(20, 4, 7), ids(21, 4, 9)
    local, remote = both(models, "gpt2-pyvene", lambda: pv.IntervenableConfig(
        [{"layer": 1, "component": "block_output"}], mode=mode))
    key = "sources->base" if mode == "parallel" else "source_0->base"
    for pos, width in ((3, 7), (8, 9)):
        locs = {key: ([[[pos]] * 4], [[[2]] * 4])}
        same(remote(base, [source], locs), local(base, [source], locs))
        assert sent[-1] == (8, width)
    # the cut source still reads the positions it reads alone
    locs = {key: ([[[3]] * 4], [[[2]] * 4])}
    assert not torch.allclose(remote(base, [source], locs)[1].logits,
                              models["gpt2-pyvene"](**base).logits)


TYPE_KWARGS = {pv.LowRankRotatedSpaceIntervention: {"low_rank_dimension": 3},
               pv.JumpReLUAutoencoderIntervention: {"low_rank_dimension": 5},
               pv.AutoencoderIntervention: {"latent_dim": 6}}


@pytest.mark.parametrize("itype", sorted(hpv.ALLOWED, key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_every_allowed_type_saves_and_loads(models, server, tmp_path, itype):
    def config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                       "intervention_type": itype, **TYPE_KWARGS.get(itype, {})}])

    remote = hpv.RemoteIntervenableModel(config(), "gpt2-pyvene")
    with torch.no_grad():
        for p in remote.get_trainable_parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(14)))
    remote.save(str(tmp_path))
    loaded = hpv.RemoteIntervenableModel.load(str(tmp_path), "gpt2-pyvene")
    (key, iv), = remote.interventions.items()
    got = loaded.interventions[key]
    assert type(got) is itype
    assert iv.state_dict().keys() == got.state_dict().keys()
    for name, value in iv.state_dict().items():
        assert torch.equal(value, got.state_dict()[name]), name
    assert got.is_source_constant == iv.is_source_constant
    assert got.subspace_partition == iv.subspace_partition
