"""Regressions from the everyday-spellings differential (tests/test_pyvene_everyday_diff.py).

Each of these calls returned a value remotely where local pyvene 0.1.8 raises, or silently
applies nothing, or was refused only by the server after the request was sent. Now each is
refused before sending with a hookwire error naming the intervention and the way out; every
test runs local pyvene too, to pin down what it does.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

pv = pytest.importorskip("pyvene")

import hookwire  # noqa: E402
import hookwire.client  # noqa: E402
import hookwire.pyvene as hpv  # noqa: E402

from conftest import MODEL_NAMES  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")

from pyvene_inputs import BASE, SRC, SRC2, B, D, ids, record_sends  # noqa: E402


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture
def sends(monkeypatch):
    return record_sends(monkeypatch)


def local_and_remote(hf_models, name, config):
    return (pv.IntervenableModel(config(), copy.deepcopy(hf_models[name])),
            hpv.RemoteIntervenableModel(config(), name))


def test_serial_mode_with_source_representations_is_refused(hf_models, name, sends):
    """pyvene's serial loop skips every group without a source: given only
    source_representations, it applies nothing and returns the base's own output. The
    remote plan applied them (logits off by up to ~0.78 on the tiny models)."""
    def config():
        return pv.IntervenableConfig([{"layer": 0, "component": "block_output"},
                                      {"layer": 1, "component": "block_output"}],
                                     intervention_types=pv.AdditionIntervention, mode="serial")
    local, remote = local_and_remote(hf_models, name, config)
    reps = [torch.ones(D), torch.full((D,), 2.0)]
    locs = {"source_0->source_1": 2, "source_1->base": 3}
    with torch.no_grad():
        _, out = local(BASE, unit_locations=locs, source_representations=reps)
        assert_close(out.logits, hf_models[name](**BASE).logits)   # pyvene: nothing applied
        with pytest.raises(hpv.UnsupportedCall, match="serial mode.*mode='parallel'"):
            remote(BASE, unit_locations=locs, source_representations=reps)
    assert sends == []


def test_collect_in_a_group_given_a_source_is_refused(hf_models, name, sends):
    def config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                       "intervention_type": pv.CollectIntervention}])
    local, remote = local_and_remote(hf_models, name, config)
    with torch.no_grad():
        with pytest.raises(AttributeError):
            local(BASE, [SRC], {"sources->base": 3})
        with pytest.raises(hpv.UnsupportedCall, match=r"CollectIntervention.*None"):
            remote(BASE, [SRC], {"sources->base": 3})
        # the way out the error names: no source for the collecting group
        (_, got), _ = remote(BASE, unit_locations={"base": 3})
        (_, expected), _ = local(BASE, unit_locations={"base": 3})
    assert_close(got, expected)
    assert len(sends) == 1


def test_serial_group_of_several_interventions_is_refused(hf_models, name, sends):
    def config():
        return pv.IntervenableConfig([
            {"layer": 0, "component": "mlp_output", "group_key": 0},
            {"layer": 1, "component": "mlp_output", "group_key": 0},
            {"layer": 1, "component": "block_output", "group_key": 1}], mode="serial")
    local, remote = local_and_remote(hf_models, name, config)
    locs = {"source_0->source_1": 1, "source_1->base": 4}
    with torch.no_grad():
        with pytest.raises(Exception, match="called only once"):
            local(BASE, [SRC, SRC2], locs)
        with pytest.raises(hpv.UnsupportedCall, match="several interventions in one group"):
            remote(BASE, [SRC, SRC2], locs)
    assert sends == []


@pytest.mark.parametrize("locs", [{"base": 3}, {"sources->base": (None, 3)}])
def test_source_without_source_positions_is_refused(hf_models, name, sends, locs):
    def config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output"}])
    local, remote = local_and_remote(hf_models, name, config)
    with torch.no_grad():
        with pytest.raises(TypeError):
            local(BASE, [SRC], locs)
        with pytest.raises(hpv.UnsupportedCall, match="no source positions"):
            remote(BASE, [SRC], locs)
    assert sends == []


def test_skip_on_a_module_called_with_keywords_only_is_refused(hf_models, sends):
    """Llama calls ``self_attn(hidden_states=...)``: pyvene's Skip reads ``args[0]`` and
    fails; the server's input site held the keyword argument, so the remote run returned a
    value. GPT-2 calls its attention positionally: there Skip runs, remote == local."""
    def config():
        return pv.IntervenableConfig([{"layer": 0, "component": "attention_output",
                                       "intervention_type": pv.SkipIntervention}])
    local, remote = local_and_remote(hf_models, "tiny-llama", config)
    with torch.no_grad():
        with pytest.raises(IndexError):
            local(BASE, [BASE])
        with pytest.raises(hpv.UnsupportedCall, match="keyword arguments only"):
            remote(BASE, [BASE])
    assert sends == []
    local, remote = local_and_remote(hf_models, "tiny-gpt2", config)
    with torch.no_grad():
        assert_close(remote(BASE, [BASE])[1].logits, local(BASE, [BASE])[1].logits)


@pytest.mark.parametrize("source,locs,bad", [
    (SRC, {"sources->base": -1}, "-1"),                            # pyvene has no negatives
    (SRC, {"sources->base": ([[[2]] * B], [[[9]] * B])}, "9"),       # past the base's end
    (ids(14, seq=3), {"sources->base": 5}, "5"),                    # past a short source's end
])
def test_positions_out_of_range_are_refused_before_sending(hf_models, name, sends, source,
                                                           locs, bad):
    """torch.gather raises locally; the server refused too, but only after the request was
    sent. The tracer checks a local index's range now, and names the intervention."""
    def config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output"}])
    local, remote = local_and_remote(hf_models, name, config)
    with torch.no_grad():
        with pytest.raises((IndexError, RuntimeError)):
            local(BASE, [source], locs)
        with pytest.raises(hookwire.TraceError,
                           match=rf"pyvene intervention layer_1_comp_block_output.*index {bad}"):
            remote(BASE, [source], locs)
    assert sends == []


@pytest.mark.parametrize("itype", [pv.VanillaIntervention, pv.ZeroIntervention])
def test_use_fast_model_takes_the_first_example_subspace(hf_models, name, itype):
    """``IntervenableModel(..., use_fast=True)``: pyvene applies the first example's subspace
    to the whole batch (its documented fast path). The per-example fix of fixes.py applied
    each example's own subspace instead (logits off by up to ~0.12 in example 1)."""
    def config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                       "intervention_type": itype}])
    local = pv.IntervenableModel(config(), copy.deepcopy(hf_models[name]), use_fast=True)
    remote = hpv.RemoteIntervenableModel(config(), name, use_fast=True)
    subspaces = [[[0, 1], [5, 6]]]
    with torch.no_grad():
        _, expected = local(BASE, [SRC], {"sources->base": 3}, subspaces=subspaces)
        _, got = remote(BASE, [SRC], {"sources->base": 3}, subspaces=subspaces)
        _, first = remote(BASE, [SRC], {"sources->base": 3}, subspaces=[[[0, 1], [0, 1]]])
    assert_close(got.logits, expected.logits)
    assert_close(got.logits, first.logits)


@pytest.mark.parametrize("sources", [None, "source"])
def test_collect_in_serial_mode_is_refused(hf_models, name, sends, sources):
    """In serial mode pyvene skips a group without a source (and then fails reading what
    its Collect collected: KeyError), and a Collect given a source fails as in parallel
    mode. The remote run returned the collected activations."""
    def config():
        return pv.IntervenableConfig([
            {"layer": 0, "component": "block_output", "intervention_type": pv.ZeroIntervention},
            {"layer": 1, "component": "block_output",
             "intervention_type": pv.CollectIntervention}], mode="serial")
    local, remote = local_and_remote(hf_models, name, config)
    locs = {"source_0->source_1": 2, "source_1->base": 2}
    srcs = None if sources is None else [SRC, SRC2]
    with torch.no_grad():
        with pytest.raises((KeyError, AttributeError)):
            local(BASE, srcs, locs)
        with pytest.raises(hpv.UnsupportedCall, match="CollectIntervention.*serial mode"):
            remote(BASE, srcs, locs)
    assert sends == []


@pytest.mark.parametrize("with_rotation", [False, True])
def test_gradient_reaches_a_steering_vector(hf_models, name, with_rotation):
    """Optimising a steering vector: ``source_representations=vec`` with ``vec`` requiring
    grad, then ``loss.backward()``. Locally ``vec.grad`` is dL/dvec. Remotely the vector
    was detached: with no trainable intervention the backward failed (torch: nothing
    requires grad), next to a trainable rotation ``vec.grad`` silently stayed None."""
    def config():
        reps = [{"layer": 0, "component": "mlp_output",
                 "intervention_type": pv.AdditionIntervention}]
        if with_rotation:
            reps.append({"layer": 1, "component": "block_output",
                         "intervention_type": pv.RotatedSpaceIntervention})
        return pv.IntervenableConfig(reps)
    local, remote = local_and_remote(hf_models, name, config)
    for key, iv in local.interventions.items():
        remote.interventions[key].load_state_dict(iv.state_dict())
    grads = []
    for model in (local, remote):
        vec = torch.linspace(-1, 1, D).requires_grad_()
        reps = {model.sorted_keys[0]: vec}
        if with_rotation:
            reps[model.sorted_keys[1]] = torch.zeros(B, 1, D)
        _, out = model(BASE, unit_locations={"base": 3}, source_representations=reps,
                       subspaces=None if not with_rotation else [None, [[0, 1]] * B])
        out.logits[:, -1].logsumexp(-1).sum().backward()
        grads.append(vec.grad)
    assert grads[0] is not None and grads[1] is not None
    assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spell", [
    lambda x, i: torch.gather(x, 1, i), lambda x, i: x.gather(1, index=i),
    lambda x, i: torch.index_select(x, 1, i.flatten()),
    lambda x, i: x.scatter(1, i, 0.0), lambda x, i: x.index_add(-2, i[0, :, 0], x[:, :1])])
def test_tracer_refuses_a_local_index_out_of_range(spell):
    """Any front: an index op on an activation with a local index tensor outside the shape
    is a TraceError while tracing (the server refused it too, but after sending)."""
    from hookwire.trace import Tracer, tracing
    tracer = Tracer()
    with tracing(tracer):
        x = tracer.read_site("s", 0, (2, 5, 3), torch.float32)
        spell(x, torch.zeros(2, 1, 3, dtype=torch.int64))   # in range: traced
        with pytest.raises(hookwire.TraceError, match="out of range"):
            spell(x, torch.full((2, 1, 3), 5, dtype=torch.int64))
        with pytest.raises(hookwire.TraceError, match="out of range"):
            spell(x, torch.full((2, 1, 3), -1, dtype=torch.int64))
