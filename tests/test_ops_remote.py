"""Every op real hook code uses, written the way researchers write it, runs remotely and
gives what local TransformerLens gives.

Each case is a hook body ``case(act, store)``: it computes with the op, keeps what it
computed in ``store`` (a plain dict, as user code does) and may return a new activation.
The same case runs on the local TL bridge the server hosts and through
``run_with_hooks(remote=True)`` against the real server; logits and every stored tensor
must match (``assert_close`` at its default tolerances, dtypes included), and the hook must
have changed the logits or stored something, so a comparison of nothing cannot pass.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import hookwire
from hookwire.errors import TraceError

from conftest import MODEL_NAMES

SITE = "blocks.0.hook_resid_pre"
LATE = "blocks.1.hook_resid_post"


def _heads(act, n=4):
    b, s, d = act.shape
    return act.view(b, s, n, d // n).transpose(1, 2)


# ---- the hook bodies ---------------------------------------------------------------------------

def float_times_arange(act, store):
    return act * torch.arange(act.shape[-1]) / act.shape[-1]


def float_plus_int32_positions(act, store):
    pos = torch.arange(act.shape[1], dtype=torch.int32)[None, :, None]
    store["scaled"] = act + pos
    return act + 0.01 * pos


def float_times_bool_mask(act, store):
    even = torch.arange(act.shape[-1]) % 2 == 0
    return act * even


def int_arith_on_traced_argmax(act, store):
    idx = act.argmax(-1)                       # int64, traced
    store["idx2"] = idx * 2 + torch.arange(act.shape[1])
    store["ratio"] = idx / 3                   # int / int -> float
    store["floor"] = idx // 4
    return act


def linalg_norms(act, store):
    store["norm"] = torch.linalg.norm(act, dim=-1)
    store["l1"] = torch.linalg.vector_norm(act, ord=1, dim=-1)
    store["inf"] = torch.linalg.vector_norm(act, ord=float("inf"), dim=(-2, -1))
    store["fro"] = torch.linalg.matrix_norm(act)
    store["nuc"] = torch.linalg.matrix_norm(act, ord="nuc")
    store["spectral"] = torch.linalg.norm(act[0], 2)
    store["tnorm_nuc"] = torch.norm(act, p="nuc", dim=(1, 2))
    return act / (torch.linalg.norm(act, dim=-1, keepdim=True) + 1e-3)


def new_family(act, store):
    z = act.new_zeros(act.shape)
    o = act.new_ones(act.shape[0], act.shape[1], 1)
    f = act.new_full((act.shape[-1],), 0.5)
    e = act.new_empty(act.shape)
    e.fill_(2.0)
    t = act.new_tensor([1.0, 2.0, 3.0])
    store.update(z=z, o=o, f=f, e=e, t=t, ints=act.new_zeros(3, dtype=torch.int64))
    return act * o + z + f


def index_put_in_place(act, store):
    rows, cols = torch.tensor([0, 1, 1]), torch.tensor([2, 3, 0])
    act.index_put_((rows, cols), torch.zeros(3, act.shape[-1]))
    act.index_put_((torch.tensor([0]),), torch.ones(act.shape[1], act.shape[2]),
                   accumulate=True)


def svd_projection(act, store):
    u, s, vh = torch.linalg.svd(act[0], full_matrices=False)
    store["s"] = s
    top = vh[:4]
    store["svdvals"] = torch.linalg.svdvals(act)
    u2, s2, v2 = torch.svd(act[1])
    store["s_old_api"] = s2
    return act @ top.T @ top  # invariant to the singular vectors' signs


def qr_and_eigh(act, store):
    q, r = torch.linalg.qr(act[0].T)
    store["r_diag_abs"] = r.diagonal().abs()
    store["qqt"] = q @ q.T
    cov = act[0].T @ act[0]
    vals, vecs = torch.linalg.eigh(cov)
    store["eigvals"] = vals
    store["eigvalsh"] = torch.linalg.eigvalsh(cov)
    top = vecs[:, -3:]
    return act @ top @ top.T


def cross_entropy_loss(act, store):
    logits = act[:, :-1].flatten(0, 1)
    target = torch.arange(logits.shape[0]) % act.shape[-1]
    store["ce"] = F.cross_entropy(logits, target)
    store["ce_none"] = F.cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
    store["nll"] = F.nll_loss(logits.log_softmax(-1), target)
    store["mse"] = F.mse_loss(act[0], act[1])
    return act


def order_statistics(act, store):
    store["argsort"] = torch.argsort(act, dim=-1)
    store["argsort_desc"] = act.argsort(dim=1, descending=True)
    values, indices = act.median(dim=-1)
    store.update(median_values=values, median_indices=indices, median=torch.median(act))
    store["q"] = torch.quantile(act[0], 0.9, dim=-1)
    store["qs"] = torch.quantile(act[0], torch.tensor([0.25, 0.75]), dim=0)
    return act


def scans_and_differences(act, store):
    store["cumprod"] = torch.cumprod(1 + act.tanh() * 0.1, dim=1)
    store["diff"] = torch.diff(act, dim=1)
    store["diff2"] = act.diff(n=2, dim=-1, prepend=act[..., :1])
    return act


def pairwise_distances(act, store):
    store["cdist"] = torch.cdist(act, act)
    store["cdist_p1"] = torch.cdist(act[0], act[1], p=1.0)
    return act


def scatter_and_index_add(act, store):
    index = torch.arange(act.shape[-1]).remainder(4).expand(act.shape)
    store["scatter_add"] = torch.zeros(act.shape[0], act.shape[1], 4).scatter_add(-1, index, act)
    out = act.index_add(1, torch.tensor([0, 0, 2]), act[:, :3] * 0.5)
    return out


def bucketize_values(act, store):
    boundaries = torch.linspace(-2, 2, 9)
    store["buckets"] = torch.bucketize(act, boundaries)
    store["right"] = torch.bucketize(act, boundaries, right=True)
    store["searchsorted"] = torch.searchsorted(boundaries, act.contiguous())
    return act


def fft_spectrum(act, store):
    spec = torch.fft.fft(act, dim=1)
    store["amplitude"] = spec.abs()
    store["real"] = spec.real
    store["rfft_power"] = torch.fft.rfft(act).abs() ** 2
    store["round_trip"] = torch.fft.ifft(spec, dim=1).real
    store["irfft"] = torch.fft.irfft(torch.fft.rfft(act), n=act.shape[-1])
    return act + 0.01 * torch.view_as_real(spec)[..., 0]


def dropout_eval(act, store):
    out = F.dropout(act, p=0.5, training=False)
    store["same"] = out
    return out * 2


def attention_with_sdpa(act, store):
    q = k = v = _heads(act)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    store["sdpa"] = out
    mask = torch.ones(act.shape[1], act.shape[1], dtype=torch.bool).tril()
    store["sdpa_mask"] = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    return act + out.transpose(1, 2).reshape(act.shape)


def promotions_with_python_scalars(act, store):
    bf = act.to(torch.bfloat16)
    store["bf16_times_float"] = bf * 2.5
    store["bf16_plus_int"] = bf + 3
    store["half_div"] = act.half() / 7
    store["bool_times_int"] = (act > 0) * 3
    store["bool_plus_float"] = (act > 0) + 0.5
    store["int_times_float"] = act.long() * 0.5
    store["bf16_times_f32"] = bf * act
    store["half_times_bf16"] = act.half() * bf
    store["int32_plus_int64"] = act.int() + torch.arange(act.shape[-1])
    store["zero_dim_f64"] = act * torch.tensor(2.0, dtype=torch.float64)
    store["uint8_plus_int8"] = (act > 0).to(torch.uint8) + torch.ones(act.shape[-1],
                                                                       dtype=torch.int8)
    store["where_scalar"] = torch.where(act > 0, act.half(), 1)
    bf *= 1.5
    store["inplace_bf16"] = bf
    return (bf.float() + act) / 2


CASES = {f.__name__: f for f in (
    float_times_arange, float_plus_int32_positions, float_times_bool_mask,
    int_arith_on_traced_argmax, linalg_norms, new_family, index_put_in_place, svd_projection,
    qr_and_eigh, cross_entropy_loss, order_statistics, scans_and_differences,
    pairwise_distances, scatter_and_index_add, bucketize_values, fft_spectrum, dropout_eval,
    attention_with_sdpa, promotions_with_python_scalars)}


def _make(case):
    store: dict = {}

    def hook(act, hook):
        return case(act, store)
    return hook, store


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def _runs(local_models, name):
    model = local_models[name]
    return model, functools.partial(model.run_with_hooks, remote=True, remote_model=name)


@pytest.mark.parametrize("case", list(CASES))
def test_op_in_a_real_hook_equals_local(case, name, local_models, tokens):
    model, remote = _runs(local_models, name)
    hook_l, store_l = _make(CASES[case])
    expected = model.run_with_hooks(tokens, fwd_hooks=[(SITE, hook_l)])
    hook_r, store_r = _make(CASES[case])
    got = remote(tokens, fwd_hooks=[(SITE, hook_r)])
    assert_close(got, expected)
    assert store_l or not torch.equal(expected, model(tokens)), "the case changed nothing"
    assert list(store_r) == list(store_l)
    for key in store_l:
        assert type(store_r[key]) is torch.Tensor
        assert store_r[key].dtype == store_l[key].dtype, key
        assert_close(store_r[key], store_l[key], msg=lambda m, key=key: f"{key}: {m}")


# ---- randomness: drawn on the client, as a local run draws it ----------------------------------

def noisy_hooks(store):
    def add_noise(act, hook):
        store[hook.name] = torch.randn_like(act)
        return act + 0.1 * store[hook.name]

    def normal_in_place(act, hook):
        noise = torch.empty_like(act).normal_(0.0, 0.5)
        store["rand"] = torch.rand_like(act[..., :3])
        store["randint"] = torch.randint_like(act, 10)
        return act + noise

    def dropout_train(act, hook):
        return F.dropout(act, p=0.25)  # training=True is torch's default

    return [(SITE, add_noise), ("blocks.0.hook_mlp_out", normal_in_place),
            (LATE, dropout_train), ("blocks.1.hook_attn_out", add_noise)]


def test_random_draws_equal_a_local_run_with_the_same_seed(name, local_models, tokens):
    model, remote = _runs(local_models, name)
    store_l: dict = {}
    torch.manual_seed(1234)
    expected = model.run_with_hooks(tokens, fwd_hooks=noisy_hooks(store_l))
    state_l = torch.get_rng_state()
    store_r: dict = {}
    torch.manual_seed(1234)
    got = remote(tokens, fwd_hooks=noisy_hooks(store_r))
    state_r = torch.get_rng_state()
    assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, model(tokens), atol=1e-3)
    assert list(store_r) == list(store_l)
    for key in store_l:
        assert torch.equal(store_r[key], store_l[key]), key
    # The caller's generator moved exactly as a local run moves it.
    assert torch.equal(state_r, state_l)


def test_in_place_random_fills_and_generators(name, local_models, tokens):
    model, remote = _runs(local_models, name)

    def make():
        store: dict = {}
        gen = torch.Generator().manual_seed(7)

        def fill(act, hook):
            act.uniform_(-1, 1, generator=gen)
            store["after"] = act.clone()
            store["bern"] = torch.empty_like(act[..., :4]).bernoulli_(0.3, generator=gen)
        return [(SITE, fill)], store

    hooks_l, store_l = make()
    expected = model.run_with_hooks(tokens, fwd_hooks=hooks_l)
    hooks_r, store_r = make()
    got = remote(tokens, fwd_hooks=hooks_r)
    assert_close(got, expected)
    for key in store_l:
        assert torch.equal(store_r[key], store_l[key]), key


def test_hookwire_randn_like_is_drawn_on_the_server(name, local_models, tokens):
    model, remote = _runs(local_models, name)

    def make():
        store: dict = {}

        def hook(act, hook):
            store["noise"] = hookwire.randn_like(act, seed=5)
            return act + store["noise"]
        return [(SITE, hook)], store

    hooks_l, store_l = make()
    expected = model.run_with_hooks(tokens, fwd_hooks=hooks_l)
    hooks_r, store_r = make()
    got = remote(tokens, fwd_hooks=hooks_r)
    assert_close(got, expected)
    assert torch.equal(store_r["noise"], store_l["noise"])


# ---- what stays refused, refuses with a way out ------------------------------------------------

REFUSED = [
    (lambda act: torch.take(act, torch.tensor([0, 1])), "torch.take", "x.flatten()[index]"),
    (lambda act: torch.linalg.det(act[0, :4, :4]), "torch.linalg.det", "svdvals"),
    (lambda act: torch.bernoulli(act.sigmoid()), "torch.bernoulli", "hookwire.rand_like"),
    (lambda act: F.scaled_dot_product_attention(*(_heads(act),) * 3, dropout_p=0.1),
     "scaled_dot_product_attention", "dropout_p=0.0"),
    (lambda act: act.kthvalue(2, dim=-1), "Tensor.kthvalue", "torch.topk"),
    (lambda act: torch.fft.fftn(act), "torch.fft.fftn", "torch.fft.fft"),
    (lambda act: torch.nn.functional.logsigmoid(act), "torch.nn.functional.log_sigmoid",
     "F.softplus"),
    (lambda act: torch.sinc(act), "torch.sinc", "torch.sin"),
]


@pytest.mark.parametrize("body,named,advice", REFUSED, ids=[r[1] for r in REFUSED])
def test_refused_op_names_itself_and_the_nearest_spelling(body, named, advice, local_models,
                                                          tokens):
    model, remote = _runs(local_models, "tiny-gpt2")

    def hook(act, hook):
        return body(act) * 0 + act

    with pytest.raises(TraceError) as info:
        remote(tokens, fwd_hooks=[(SITE, hook)])
    message = str(info.value)
    assert named in message and advice in message, message
    assert "hook" in message and __file__.rsplit("/", 1)[-1] in message


def test_complex_values_cannot_be_kept_but_their_parts_can(local_models, tokens):
    model, remote = _runs(local_models, "tiny-gpt2")
    store: dict = {}

    def hook(act, hook):
        store["spectrum"] = torch.fft.fft(act)

    with pytest.raises(TraceError, match="view_as_real"):
        remote(tokens, fwd_hooks=[(SITE, hook)])
