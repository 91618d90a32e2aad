"""Training pyvene interventions against a remote model (distributed alignment search).

The same optimizer loop runs on local pyvene (a copy of the served weights) and on
``RemoteIntervenableModel``: after each step the loss, every trainable parameter's gradient
and, at the end, the parameters themselves must agree. SGD, not Adam: Adam divides by the
running gradient norm, so where a gradient is ~0 float rounding alone decides the step.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

pv = pytest.importorskip("pyvene")

import hookwire.pyvene as hpv  # noqa: E402
from hookwire.errors import HookwireError  # noqa: E402

from conftest import MODEL_NAMES  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")

B, S, POS = 3, 6, 3
_g = torch.Generator().manual_seed(11)
BASE = {"input_ids": torch.randint(0, 256, (B, S), generator=_g)}
SRC = {"input_ids": torch.randint(0, 256, (B, S), generator=_g)}
LABELS = torch.randint(0, 256, (B,), generator=_g)


def config(itype, layer=0, component="block_output", **extra):
    return pv.IntervenableConfig([dict(layer=layer, component=component,
                                       intervention_type=itype, **extra)])


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def pair(hf_models, name, make_config, prepare=None):
    # Interventions draw their initial weights from torch's global generator: seeded here, so
    # a test's training does not depend on which tests ran before it in this process.
    torch.manual_seed(0)
    local = pv.IntervenableModel(make_config(), copy.deepcopy(hf_models[name]))
    remote = hpv.RemoteIntervenableModel(make_config(), name)
    if prepare is not None:
        prepare(local)
    for key, iv in local.interventions.items():
        remote.interventions[key].load_state_dict(iv.state_dict())
    return local, remote


def last_token_loss(model, **call):
    _, cf = model(BASE, [SRC], {"sources->base": POS}, **call)
    return F.cross_entropy(cf.logits[:, POS], LABELS)


def train(model, steps, loss_fn, lr=1.0):
    opt = torch.optim.SGD(model.get_trainable_parameters(), lr=lr)
    trail = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        trail.append((loss.detach(), [None if p.grad is None else p.grad.clone()
                                      for p in model.get_trainable_parameters()]))
        opt.step()
    return trail


def assert_same_training(local, remote, loss_fn, steps=3, lr=1.0):
    want = train(local, steps, loss_fn, lr)
    got = train(remote, steps, loss_fn, lr)
    for step, ((gl, gg), (wl, wg)) in enumerate(zip(got, want)):
        assert_close(gl, wl, msg=lambda m: f"loss at step {step}: {m}")
        for k, (g, w) in enumerate(zip(gg, wg)):
            if w is None:  # a frozen parameter (pyvene's intervention_population)
                assert g is None, f"grad {k} at step {step}"
                continue
            assert_close(g, w, msg=lambda m: f"grad {k} at step {step}: {m}")
    assert any(float(g.abs().max()) > 0 for g in want[0][1] if g is not None), \
        "nothing to learn: bad setup"
    assert float(want[-1][0]) < float(want[0][0]), "the loss must go down"
    for p, q in zip(local.get_trainable_parameters(), remote.get_trainable_parameters()):
        assert_close(q, p)


def test_das_rotated_space_trains_like_local(hf_models, name):
    """The issue's case: a RotatedSpaceIntervention on a 4-dim subspace."""
    local, remote = pair(hf_models, name, lambda: config(pv.RotatedSpaceIntervention))

    def loss(model):
        return last_token_loss(model, subspaces=[[[0, 1, 2, 3]] * B])
    assert_same_training(local, remote, loss)


@pytest.mark.parametrize("itype,extra", [
    (pv.LowRankRotatedSpaceIntervention, {"low_rank_dimension": 2}),
    (pv.BoundlessRotatedSpaceIntervention, {}),
    (pv.SigmoidMaskRotatedSpaceIntervention, {}),
    (pv.SigmoidMaskIntervention, {}),
])
def test_trainable_types_train_like_local(hf_models, name, itype, extra):
    def prepare(local):
        torch.manual_seed(5)
        for iv in local.interventions.values():
            if hasattr(iv, "mask"):
                iv.mask.data = torch.randn_like(iv.mask)
                iv.temperature.data = torch.tensor(0.5)
            if hasattr(iv, "masks"):
                iv.masks.data = torch.randn_like(iv.masks)
            if hasattr(iv, "intervention_boundaries"):
                iv.intervention_boundaries.data = torch.tensor([0.3])
                iv.temperature.data = torch.tensor(5.0)
    local, remote = pair(hf_models, name, lambda: config(itype, **extra), prepare)
    assert_same_training(local, remote, last_token_loss, lr=0.5)


def test_loss_over_every_position_and_both_outputs(hf_models, name):
    """dL/dlogits with no zero positions (nothing cropped), and a loss that also reads the
    original output pyvene returns next to the intervened one."""
    local, remote = pair(hf_models, name, lambda: config(pv.LowRankRotatedSpaceIntervention,
                                                         layer=1, low_rank_dimension=3))

    def loss(model):
        base, cf = model(BASE, [SRC], {"sources->base": POS}, output_original_output=True)
        return (cf.logits.log_softmax(-1)[..., 7].mean()
                - 0.5 * (cf.logits - base.logits).pow(2).mean())
    assert_same_training(local, remote, loss, steps=2, lr=2.0)


def test_models_own_loss_through_labels(hf_models, name):
    local, remote = pair(hf_models, name, lambda: config(pv.LowRankRotatedSpaceIntervention,
                                                         low_rank_dimension=2))

    def loss(model):
        _, cf = model(BASE, [SRC], {"sources->base": POS}, labels=BASE["input_ids"])
        return cf.loss
    assert_same_training(local, remote, loss, steps=2, lr=5.0)


def test_no_grad_and_frozen_parameters_run_plain_inference(hf_models, name):
    local, remote = pair(hf_models, name, lambda: config(pv.LowRankRotatedSpaceIntervention,
                                                         low_rank_dimension=2))
    with torch.no_grad():
        _, want = local(BASE, [SRC], {"sources->base": POS})
        _, got = remote(BASE, [SRC], {"sources->base": POS})
    assert got.logits.grad_fn is None
    assert_close(got.logits, want.logits)
    for p in remote.get_trainable_parameters():
        p.requires_grad_(False)
    _, frozen = remote(BASE, [SRC], {"sources->base": POS})
    assert frozen.logits.grad_fn is None
    assert_close(frozen.logits, want.logits)


def test_backward_of_an_unrelated_output_gives_zero_gradients(hf_models, name):
    """Positions before the swap do not depend on the rotation: the remote gradient is zero,
    exactly as the local one."""
    local, remote = pair(hf_models, name, lambda: config(pv.LowRankRotatedSpaceIntervention,
                                                         low_rank_dimension=2))
    for model in (local, remote):
        _, cf = model(BASE, [SRC], {"sources->base": POS})
        cf.logits[:, :POS].sum().backward()
    for p, q in zip(local.get_trainable_parameters(), remote.get_trainable_parameters()):
        assert_close(q.grad, p.grad)
        assert float(q.grad.abs().max()) == 0.0


def test_const_grad_is_validated(server, hosted):
    """A hand-written graph asking for the gradient of a non-float constant, or without a
    value to differentiate, is refused before it runs, and the connection keeps serving."""
    import hookwire.client
    conn = hookwire.client.get_connection(server.url, None)
    ids = torch.zeros(1, 4, dtype=torch.int64)
    base = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "ids"},
            "constants": ["k"], "sites": [{"name": "blocks.0.hook_resid_post"}],
            "forward": {"return_type": None}}
    no_backward = dict(base, nodes=[{"id": 0, "op": "const.grad", "args": [{"const": "k"}]}],
                       saves={"g": 0})
    with pytest.raises(HookwireError, match="grad_without_backward|names no value"):
        conn.run(no_backward, {"ids": ids, "k": torch.ones(3)})
    int_const = dict(base, nodes=[
        {"id": 0, "op": "site.read", "args": [0]},
        {"id": 1, "op": "sum", "args": [{"ref": 0}]},
        {"id": 2, "op": "const.grad", "args": [{"const": "k"}]}], saves={"g": 2}, backward=1)
    with pytest.raises(HookwireError, match="floating-point"):
        conn.run(int_const, {"ids": ids, "k": torch.ones(3, dtype=torch.int64)})
    ok = dict(base, nodes=[
        {"id": 0, "op": "site.read", "args": [0]},
        {"id": 1, "op": "mul", "args": [{"ref": 0}, {"const": "k"}]},
        {"id": 2, "op": "sum", "args": [{"ref": 1}]},
        {"id": 3, "op": "const.grad", "args": [{"const": "k"}]}], saves={"g": 3}, backward=2)
    k = torch.linspace(0.5, 1.5, 64)
    got = conn.run(ok, {"ids": ids, "k": k}).values["g"]
    # d/dk sum(resid * k) = resid summed over batch and positions
    with torch.no_grad():
        _, cache = hosted["tiny-gpt2"].bridge.run_with_cache(ids)
    assert_close(got, cache["blocks.0.hook_resid_post"].sum((0, 1)))
