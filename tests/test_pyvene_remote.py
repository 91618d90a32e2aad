"""Remote pyvene (``hookwire.pyvene.RemoteIntervenableModel``) must give what local pyvene gives.

Every case runs the same config and call twice: locally with ``pv.IntervenableModel`` on a
deep copy of a plain HF model with the hosted model's weights (pyvene strips hooks and flips
gradient flags on the model it wraps, so it never touches an object the server holds), and
remotely against the real server of ``conftest``. Intervention parameters (rotations, masks,
autoencoder weights) are copied from the local interventions to the remote ones, as a user
would load trained weights. Outputs are compared with ``assert_close`` (float32 defaults).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

pv = pytest.importorskip("pyvene")

import hookwire.client  # noqa: E402
import hookwire.pyvene as hpv  # noqa: E402

from conftest import MODEL_NAMES  # noqa: E402

# pyvene's SigmoidMaskIntervention copies its temperature with torch.tensor(tensor).
pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")

B, S = 2, 7


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def ids(seed, batch=B, seq=S):
    return {"input_ids": torch.randint(0, 256, (batch, seq),
                                       generator=torch.Generator().manual_seed(seed))}


BASE, SRC, SRC2 = ids(1), ids(2), ids(3)


def run_both(hf_models, name, config_fn, call, prepare=None):
    """Build the config twice (fresh intervention objects each), run locally and remotely,
    and compare everything pyvene returns."""
    local = pv.IntervenableModel(config_fn(), copy.deepcopy(hf_models[name]))
    remote = hpv.RemoteIntervenableModel(config_fn(), name)
    if prepare is not None:  # seeded: the same weights and settings on both sides
        prepare(local)
        prepare(remote)
    for key, iv in local.interventions.items():
        remote.interventions[key].load_state_dict(iv.state_dict())
    expected = call(local)
    got = call(remote)
    assert_same(got, expected)
    if not isinstance(got, (tuple, list)) or not isinstance(got[0], tuple):  # not a Collect
        cf = got.intervened_outputs if hasattr(got, "intervened_outputs") else got[1]
        if not any(isinstance(iv, pv.CollectIntervention) for iv in local.interventions.values()):
            with torch.no_grad():
                plain = hf_models[name](**BASE).logits
            assert not torch.allclose(cf.logits, plain), "the intervention changed nothing"
    return got, expected


def assert_same(got, expected, where="output"):
    if expected is None:
        assert got is None, where
        return
    if isinstance(expected, torch.Tensor):
        assert type(got) is torch.Tensor, f"{where}: {type(got)}"
        assert_close(got, expected, msg=lambda m: f"{where}: {m}")
        return
    if isinstance(expected, (tuple, list)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for k, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{where}[{k}]")
        return
    # HF / pyvene ModelOutput: same class, same logits (and fields pyvene fills)
    assert type(got) is type(expected), f"{where}: {type(got)} vs {type(expected)}"
    for field in ("logits", "original_outputs", "intervened_outputs", "collected_activations"):
        if hasattr(expected, field):
            assert_same(getattr(got, field), getattr(expected, field), f"{where}.{field}")


def cfg(component="block_output", layer=1, itype=pv.VanillaIntervention, unit="pos", **extra):
    return lambda: pv.IntervenableConfig([dict(layer=layer, component=component, unit=unit,
                                               intervention_type=itype, **extra)])


def interchange(model, loc=3):
    return model(BASE, [SRC], {"sources->base": loc})


# ---- baseline ------------------------------------------------------------------------------

def test_intervention_changes_logits_and_matches(hf_models, name):
    got, _ = run_both(hf_models, name, cfg(), interchange)
    plain = hf_models[name](**BASE).logits
    assert got[0] is None
    assert not torch.allclose(got[1].logits, plain), "the interchange must change the output"
    assert_close(got[1].logits[:, :3], plain[:, :3])  # positions before the swap: untouched


COMPONENTS = ["block_input", "block_output", "mlp_activation", "mlp_output", "mlp_input",
              "attention_output", "attention_input", "attention_value_output",
              "query_output", "key_output", "value_output"]


@pytest.mark.parametrize("component", COMPONENTS)
def test_vanilla_on_component(hf_models, name, component):
    run_both(hf_models, name, cfg(component, layer=0), interchange)


HEAD_COMPONENTS = ["head_attention_value_output", "head_query_output", "head_key_output",
                   "head_value_output"]


@pytest.mark.parametrize("component", HEAD_COMPONENTS)
def test_vanilla_on_heads(hf_models, name, component):
    # unit "h.pos": (heads, positions) per intervention; tiny-llama has 2 kv heads (GQA).
    locs = [[[1]] * B, [[2, 4]] * B]

    def call(model):
        return model(BASE, [SRC], {"sources->base": ([locs], [locs])})
    run_both(hf_models, name, cfg(component, layer=1, unit="h.pos"), call)


# ---- intervention types --------------------------------------------------------------------

@pytest.mark.parametrize("itype", [pv.ZeroIntervention, pv.AdditionIntervention,
                                   pv.SubtractionIntervention, pv.VanillaIntervention])
def test_basic_types(hf_models, name, itype):
    run_both(hf_models, name, cfg(itype=itype), interchange)


def test_collect_returns_activations(hf_models, name):
    def call(model):
        return model(BASE, unit_locations={"base": [1, 3]})
    got, _ = run_both(hf_models, name, cfg("mlp_output", itype=pv.CollectIntervention,
                                           max_number_of_units=2), call)
    (base_out, collected), cf = got
    assert base_out is None and len(collected) == 1 and collected[0].shape[0] == B


def test_skip(hf_models, name):
    # pyvene's Skip reads the module *input* of the "source" run; the usual call passes the
    # base as the source, which replaces the block's output by its input.
    def call(model):
        return model(BASE, [BASE], {"sources->base": 2})
    run_both(hf_models, name, cfg("block_output", itype=pv.SkipIntervention), call)


def test_noise(hf_models, name):
    # pyvene draws its noise once, at construction, from numpy's RandomState(1) with shape
    # (1, 4, d): the buffer travels as a constant, so remote and local add the same noise.
    # (Its shape is why pyvene's Noise takes exactly four positions.)
    def call(model):
        return model(BASE, unit_locations={"base": [0, 1, 2, 3]})
    run_both(hf_models, name, cfg("block_input", layer=0, itype=pv.NoiseIntervention), call)


@pytest.mark.parametrize("itype,extra", [
    (pv.RotatedSpaceIntervention, {}),
    (pv.LowRankRotatedSpaceIntervention, {"low_rank_dimension": 4}),
    (pv.BoundlessRotatedSpaceIntervention, {}),
    (pv.SigmoidMaskRotatedSpaceIntervention, {}),
    (pv.SigmoidMaskIntervention, {}),
])
def test_trainable_types(hf_models, name, itype, extra):
    def prepare(local):
        torch.manual_seed(5)
        for iv in local.interventions.values():
            if hasattr(iv, "mask"):
                iv.mask.data = torch.randn_like(iv.mask)
                iv.temperature.data = torch.tensor(0.5)
            if hasattr(iv, "masks"):
                iv.masks.data = torch.randn_like(iv.masks) * 50
            if hasattr(iv, "intervention_boundaries"):
                iv.intervention_boundaries.data = torch.tensor([0.3])
    run_both(hf_models, name, cfg(itype=itype, **extra), interchange, prepare)


def test_rotated_space_with_subspaces(hf_models, name):
    def call(model):
        return model(BASE, [SRC], {"sources->base": 3}, subspaces=[[[0, 1, 2, 5]] * B])
    run_both(hf_models, name, cfg(itype=pv.RotatedSpaceIntervention), call)


def test_subspace_partition(hf_models, name):
    def call(model):
        return model(BASE, [SRC], {"sources->base": 3}, subspaces=[[[1]] * B])
    run_both(hf_models, name, cfg(itype=pv.VanillaIntervention,
                                  subspace_partition=[[0, 10], [10, 64]]), call)


@pytest.mark.parametrize("itype", [pv.VanillaIntervention, pv.AdditionIntervention,
                                   pv.SubtractionIntervention, pv.ZeroIntervention,
                                   pv.JumpReLUAutoencoderIntervention])
def test_per_example_subspaces_are_not_merged(hf_models, name, itype):
    """pyvene 0.1.8 merges equal-length, different per-example subspaces of localist
    interventions across the batch (hookwire/pyvene/fixes.py). Remote does each example's own
    subspace; the reference is local pyvene run on each example alone (nothing to merge)."""
    subs = [[0, 1, 2], [5, 6, 9]]
    make = cfg(itype=itype, **({"low_rank_dimension": 12}
                                if itype is pv.JumpReLUAutoencoderIntervention else {}))

    def weights(model):  # a JumpReLU SAE with given (seeded) weights; no-op for the others
        torch.manual_seed(8)
        for iv in model.interventions.values():
            for p in iv.parameters():
                p.data = torch.randn_like(p) * 0.3
            if hasattr(iv, "threshold"):
                iv.threshold.data = torch.rand_like(iv.threshold) * 0.1
    remote = hpv.RemoteIntervenableModel(make(), name)
    weights(remote)
    _, got = remote(BASE, [SRC], {"sources->base": 3}, subspaces=[subs])
    rows = []
    for i in range(B):
        def one(d):
            return {"input_ids": d["input_ids"][i:i + 1]}
        local = pv.IntervenableModel(make(), copy.deepcopy(hf_models[name]))
        weights(local)
        _, out = local(one(BASE), [one(SRC)], {"sources->base": 3}, subspaces=[[subs[i]]])
        rows.append(out.logits)
    assert_close(got.logits, torch.cat(rows))
    merged = pv.IntervenableModel(make(), copy.deepcopy(hf_models[name]))
    weights(merged)
    _, bad = merged(BASE, [SRC], {"sources->base": 3}, subspaces=[subs])
    assert not torch.allclose(bad.logits, got.logits)  # the difference is pyvene's bug


def test_autoencoder_with_given_weights(hf_models, name):
    def prepare(local):
        torch.manual_seed(7)
        for iv in local.interventions.values():
            for p in iv.parameters():
                p.data = torch.randn_like(p) * 0.2
            iv.set_interchange_dim(torch.tensor([0, 3, 5]))

    def call(model):
        for iv in model.interventions.values():
            iv.set_interchange_dim(torch.tensor([0, 3, 5]))
        return interchange(model)
    run_both(hf_models, name, cfg(itype=pv.AutoencoderIntervention, latent_dim=16), call,
             prepare)


def test_jumprelu_autoencoder_with_given_weights(hf_models, name):
    def prepare(local):
        torch.manual_seed(8)
        for iv in local.interventions.values():
            for p in iv.parameters():
                p.data = torch.randn_like(p) * 0.3
            iv.threshold.data = torch.rand_like(iv.threshold) * 0.1

    def call(model):
        return model(BASE, [SRC], {"sources->base": 3}, subspaces=[[[0, 2, 7]] * B])
    run_both(hf_models, name, cfg(itype=pv.JumpReLUAutoencoderIntervention,
                                  low_rank_dimension=12), call, prepare)


# ---- configs and call shapes ---------------------------------------------------------------

def two_reps(first=None, second=None, **config):
    def make():
        return pv.IntervenableConfig([
            dict(layer=0, component="block_output", **(first or {})),
            dict(layer=1, component="mlp_output", **(second or {}))],
            intervention_types=pv.VanillaIntervention, **config)
    return make


def test_multiple_representations_one_source(hf_models, name):
    run_both(hf_models, name, two_reps(), lambda m: m(BASE, [SRC], {"sources->base": 4}))


def test_multiple_sources(hf_models, name):
    run_both(hf_models, name, two_reps(),
             lambda m: m(BASE, [SRC, SRC2], {"sources->base": 2}))


def test_group_key(hf_models, name):
    config = two_reps({"group_key": 0}, {"group_key": 0})
    run_both(hf_models, name, config, lambda m: m(BASE, [SRC], {"sources->base": 5}))


def test_intervention_link_key(hf_models, name):
    config = lambda: pv.IntervenableConfig([  # noqa: E731
        dict(layer=1, component="block_output", intervention_link_key=0),
        dict(layer=1, component="block_output", intervention_link_key=0)],
        intervention_types=pv.VanillaIntervention)
    run_both(hf_models, name, config,
             lambda m: m(BASE, [SRC, SRC2], {"sources->base": ([[[1]] * B, [[2]] * B],
                                                                [[[3]] * B, [[3]] * B])}))


@pytest.mark.parametrize("later_first", [False, True])
def test_serial_mode(hf_models, name, later_first):
    # Serial chains source_0 -> source_1 -> base inside one forward, whichever of the two
    # sites fires first.
    config = two_reps(mode="serial") if not later_first else (lambda: pv.IntervenableConfig(
        [dict(layer=1, component="block_output"), dict(layer=0, component="mlp_output")],
        intervention_types=pv.VanillaIntervention, mode="serial"))

    def call(model):
        return model(BASE, [SRC, SRC2], {"source_0->source_1": 2, "source_1->base": 4})
    run_both(hf_models, name, config, call)


def test_per_example_positions(hf_models, name):
    def call(model):
        return model(BASE, [SRC], {"sources->base": ([[[1, 2], [0, 5]]], [[[3, 4], [6, 1]]])})
    run_both(hf_models, name, cfg(max_number_of_units=2), call)


def test_per_example_positions_after_a_broadcast_call(hf_models, name):
    # pyvene keeps use_fast on after a broadcast call (fixes.py); remote decides per call, so
    # its second call equals a fresh local model's.
    remote = hpv.RemoteIntervenableModel(cfg()(), name)
    remote(BASE, [SRC], {"sources->base": 3})
    locs = {"sources->base": ([[[1], [5]]], [[[4], [2]]])}
    _, got = remote(BASE, [SRC], locs)
    _, expected = pv.IntervenableModel(cfg()(), copy.deepcopy(hf_models[name]))(BASE, [SRC],
                                                                               locs)
    assert_close(got.logits, expected.logits)


def test_source_base_position_pair(hf_models, name):
    run_both(hf_models, name, cfg(), lambda m: m(BASE, [SRC], {"sources->base": (1, 5)}))


@pytest.mark.parametrize("src_len", [4, 11])
def test_source_of_other_length(hf_models, name, src_len):
    source = ids(4, seq=src_len)
    run_both(hf_models, name, cfg(),
             lambda m: m(BASE, [source], {"sources->base": (src_len - 1, 2)}))


def test_padded_inputs_with_attention_mask(hf_models, name):
    # Left-padded rows, as a tokenizer pads a batch for a causal LM; the mask travels.
    mask = torch.ones(B, S, dtype=torch.int64)
    mask[0, :2] = 0
    base = {"input_ids": BASE["input_ids"], "attention_mask": mask}
    source = {"input_ids": SRC["input_ids"], "attention_mask": mask.flip(0)}
    run_both(hf_models, name, cfg(), lambda m: m(base, [source], {"sources->base": 4}))


def test_source_representations_without_source_pass(hf_models, name):
    rep = torch.randn(B, 1, 64, generator=torch.Generator().manual_seed(9))

    def call(model):
        return model(BASE, unit_locations={"base": 3}, source_representations=rep)
    run_both(hf_models, name, cfg(), call)


def test_output_original_output_and_return_dict(hf_models, name):
    def call(model):
        return model(BASE, [SRC], {"sources->base": 3}, output_original_output=True,
                     return_dict=True)
    got, _ = run_both(hf_models, name, cfg(), call)
    assert_close(got.original_outputs.logits, hf_models[name](**BASE).logits)


def test_labels_give_the_loss(hf_models, name):
    def call(model):
        return model(BASE, [SRC], {"sources->base": 3}, labels=BASE["input_ids"])
    got, expected = run_both(hf_models, name, cfg(), call)
    assert_close(got[1].loss, expected[1].loss)


def test_collect_with_return_dict(hf_models, name):
    def call(model):
        return model(BASE, unit_locations={"base": 2}, return_dict=True)
    run_both(hf_models, name, cfg(itype=pv.CollectIntervention), call)


# ---- one forward -----------------------------------------------------------------------------

def test_source_and_base_share_one_forward(hf_models, name, monkeypatch):
    """One request whose input holds base and source rows: pyvene's two forwards become one."""
    requests = []
    real_run = hookwire.client.Connection.run

    def counting_run(self, graph, tensors, **kwargs):
        requests.append(tensors["input_ids"].shape)
        return real_run(self, graph, tensors, **kwargs)
    monkeypatch.setattr(hookwire.client.Connection, "run", counting_run)
    run_both(hf_models, name, cfg(), interchange)
    run_both(hf_models, name, cfg(), lambda m: m(BASE, [SRC], {"sources->base": 3},
                                                 output_original_output=True))
    # the second call adds an untouched copy of the base: still one request
    # two groups given one source share its rows
    run_both(hf_models, name, two_reps(), lambda m: m(BASE, [SRC], {"sources->base": 4}))
    assert requests == [torch.Size([2 * B, S]), torch.Size([3 * B, S]),
                        torch.Size([2 * B, S])]


# ---- errors ------------------------------------------------------------------------------------

class MyIntervention(pv.VanillaIntervention):
    def forward(self, base, source, subspaces=None, **kwargs):
        return base * 2


def test_custom_intervention_class_is_refused(server):
    config = pv.IntervenableConfig([dict(layer=0, component="block_output",
                                         intervention=MyIntervention())])
    with pytest.raises(hpv.UnsupportedIntervention, match="MyIntervention.*cannot run remotely"):
        hpv.RemoteIntervenableModel(config, "tiny-gpt2")


def test_lambda_intervention_is_refused(server):
    config = pv.IntervenableConfig([dict(layer=0, component="block_output",
                                         intervention=lambda b, s: b + s)])
    with pytest.raises(hpv.UnsupportedIntervention, match="a Python function"):
        hpv.RemoteIntervenableModel(config, "tiny-gpt2")


def test_unsupported_error_is_a_trace_error(server):
    assert issubclass(hpv.UnsupportedIntervention, hookwire.TraceError)


def test_bad_component_name(server):
    config = pv.IntervenableConfig([dict(layer=0, component="block_outptu")])
    with pytest.raises(hpv.UnknownComponent, match="block_outptu"):
        hpv.RemoteIntervenableModel(config, "tiny-gpt2")


def test_component_that_never_fires(server):
    # A layer the model does not have: refused by name, not silently ignored.
    config = pv.IntervenableConfig([dict(layer=9, component="block_output")])
    with pytest.raises(hpv.UnknownComponent, match="block_output"):
        hpv.RemoteIntervenableModel(config, "tiny-gpt2")


@pytest.mark.parametrize("itype", [pv.VanillaIntervention, pv.ZeroIntervention])
def test_attention_weight_on_gpt2(hf_models, itype):
    """pyvene's ``attention_weight`` (the input of GPT-2's ``attn.attn_dropout``) never fires
    locally on transformers 5: dropout is functional now, so pyvene silently does nothing.
    The server routes the probabilities through that module (server/attention_sites.py).
    Reference: local pyvene on a copy whose attention takes GPT-2's own eager path that still
    calls ``attn_dropout`` (``reorder_and_upcast_attn``)."""
    plain = hf_models["tiny-gpt2"]
    reference = copy.deepcopy(plain)
    reference.set_attn_implementation("eager")
    for block in reference.transformer.h:
        block.attn.reorder_and_upcast_attn = True
    make = cfg("attention_weight", layer=0, itype=itype)

    def call(model):
        return model(BASE, [SRC], {"sources->base": 1})
    with torch.no_grad():
        _, want = call(pv.IntervenableModel(make(), reference))
        _, got = call(hpv.RemoteIntervenableModel(make(), "tiny-gpt2"))
        _, local_default = call(pv.IntervenableModel(make(), copy.deepcopy(plain)))
        logits = plain(**BASE).logits
    assert_close(got.logits, want.logits)
    assert not torch.allclose(got.logits, logits), "the intervention must change the output"
    assert_close(local_default.logits, logits)  # pyvene's own no-op, documented


def test_intervention_swapped_in_later_is_refused_before_sending(server):
    model = hpv.RemoteIntervenableModel(cfg()(), "tiny-gpt2")
    key = model.sorted_keys[0]
    model.interventions[key] = MyIntervention(embed_dim=64)
    with pytest.raises(hpv.UnsupportedIntervention, match="MyIntervention"):
        model(BASE, [SRC], {"sources->base": 3})


def test_source_batch_must_match_base(server):
    model = hpv.RemoteIntervenableModel(cfg()(), "tiny-gpt2")
    with pytest.raises(hookwire.HookwireError, match="batch size"):
        model(BASE, [ids(5, batch=3)], {"sources->base": 3})


def test_layout_pads_right_and_masks_only_when_asked():
    from hookwire.pyvene.plan import Layout
    layout = Layout()
    base = layout.add(torch.ones(2, 5, dtype=torch.int64))
    src = layout.add(torch.full((2, 3), 7))
    assert (base.start, base.stop, src.start, src.stop, layout.seq_len) == (0, 2, 2, 4, 5)
    ids = layout.input_ids(pad_id=0)
    assert ids.shape == (4, 5) and ids[2:, 3:].eq(0).all() and ids[2:, :3].eq(7).all()
    assert layout.attention_mask() is None  # causal: right padding is never seen
    layout.add(torch.ones(1, 4, dtype=torch.int64), torch.tensor([[0, 1, 1, 1]]))
    mask = layout.attention_mask()
    assert mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0], [1, 1, 1, 0, 0],
                             [0, 1, 1, 1, 0]]
