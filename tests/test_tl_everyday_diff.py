"""Differential test: everyday TL hook spellings, run locally by TL and remotely by hookwire.

Each case builds its hooks fresh (``make(model)`` -> Spec) for each run. The local TL run and
the remote run must give the same logits and the same Python-side state (what the hooks wrote
into dicts/lists), or the remote call must raise a hookwire error (before sending) where local
TL does not -- a raise is acceptable, a different value is a finding. Written as a hunt for
silent mismatches (seventeenth session; every finding since fixed or refused); kept as a
regression net over both fronts (the stand-in and ``remote=True`` on a local bridge) and both
built-in models. With ``$HOOKWIRE_DIFF_OUT`` set, every outcome is appended to that file as
one JSON line, so a run can be summarized.
"""
from __future__ import annotations

import functools
import json
import math
import os
import re

import einops  # a TransformerLens dependency: always there with the [tl] extra
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import MODEL_NAMES
from hookwire.errors import HookwireError

pytestmark = pytest.mark.filterwarnings("ignore")

OUT = os.environ.get("HOOKWIRE_DIFF_OUT")
R0, R1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
P0, P1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"
ADVICE = re.compile(r"instead|use |after the run|return |hook a |rerun|keep |pass |build |"
                    r"compute|save", re.I)


class Spec:
    def __init__(self, hooks=(), state=None, run=None, names=None):
        self.hooks = list(hooks)
        self.state = state if state is not None else {}
        self.run = run  # run(model, tokens, kw) -> output; default run_with_hooks
        self.names = names  # hook function names an error should mention


CASES: dict = {}


def case(fn):
    CASES[fn.__name__.removeprefix("c_")] = fn
    return fn


def hooks_on(site, fn, **state):
    return Spec([(site, fn)], state)


# ---- 1. in-place vs out-of-place edits ------------------------------------------------------

@case
def c_setitem_pos(m):
    def hook_setitem_pos(x, hook):
        x[:, 3] = 0.5
    return hooks_on(R1, hook_setitem_pos)


@case
def c_setitem_last_pos(m):
    def hook_last(x, hook):
        x[:, -1] = x[:, -2]
    return hooks_on(R1, hook_last)


@case
def c_ellipsis_idx_imul(m):
    idx = [1, 5, 7]

    def hook_ell_imul(x, hook):
        x[..., idx] *= 0
    return hooks_on(R1, hook_ell_imul)


@case
def c_ellipsis_tensor_idx_iadd(m):
    idx = torch.tensor([2, 3, 2])  # duplicate index: read-modify-write happens once

    def hook_dup_iadd(x, hook):
        x[..., idx] += 1.0
    return hooks_on(R1, hook_dup_iadd)


@case
def c_mul_(m):
    def hook_mul_(x, hook):
        x.mul_(torch.linspace(0.5, 1.5, x.shape[-1]))
    return hooks_on(R1, hook_mul_)


@case
def c_copy_(m):
    src = torch.arange(64, dtype=torch.float32) / 100

    def hook_copy_(x, hook):
        x[:, 2].copy_(src)
    return hooks_on(R1, hook_copy_)


@case
def c_copy_broadcast_self(m):
    def hook_copy_bcast(x, hook):
        x.copy_(x[:, :1])
    return hooks_on(R1, hook_copy_bcast)


@case
def c_copy_different_dtype(m):
    def hook_copy_f64(x, hook):
        x[:, 1].copy_(torch.full((x.shape[0], x.shape[-1]), 1 / 3, dtype=torch.float64))
    return hooks_on(R1, hook_copy_f64)


@case
def c_where_scalar(m):
    def hook_where(x, hook):
        return torch.where(x > 0, x, 0.0)
    return hooks_on(R1, hook_where)


@case
def c_where_inplace_assign(m):
    def hook_where_ip(x, hook):
        x[:] = torch.where(x.abs() > 0.1, x * 2, x)
    return hooks_on(R1, hook_where_ip)


@case
def c_bool_mask_local(m):
    mask = torch.zeros(64, dtype=torch.bool)
    mask[::3] = True

    def hook_mask_local(x, hook):
        x[:, :, mask] = 0
    return hooks_on(R1, hook_mask_local)


@case
def c_bool_mask_traced_setitem(m):
    def hook_mask_traced(x, hook):
        x[x > 0.05] = 0.05
    return hooks_on(R1, hook_mask_traced)


@case
def c_bool_mask_traced_imul(m):
    def hook_mask_traced_imul(x, hook):
        x[x < 0] *= 0.5
    return hooks_on(R1, hook_mask_traced_imul)


@case
def c_bool_mask_2d_rows(m):
    rows = torch.tensor([[True, False] * 6, [False, True] * 6])

    def hook_mask_rows(x, hook):
        x[rows] = x[rows] * 3
    return hooks_on(R1, hook_mask_rows)


@case
def c_index_add_(m):
    def hook_index_add(x, hook):
        x.index_add_(1, torch.tensor([0, 0, 5]), torch.ones(x.shape[0], 3, x.shape[-1]))
    return hooks_on(R1, hook_index_add)


@case
def c_index_add_traced_src(m):
    def hook_index_add_t(x, hook):
        x.index_add_(1, torch.tensor([4, 4]), x[:, :2], alpha=0.5)
    return hooks_on(R1, hook_index_add_t)


@case
def c_scatter_(m):
    def hook_scatter(x, hook):
        idx = x.argmax(-1, keepdim=True)
        x.scatter_(-1, idx, 0.0)
    return hooks_on(R1, hook_scatter)


@case
def c_scatter_add_dup(m):
    def hook_scatter_add(x, hook):
        idx = torch.zeros(x.shape[0], x.shape[1], 3, dtype=torch.long)
        x.scatter_add_(-1, idx, torch.ones(x.shape[0], x.shape[1], 3))
    return hooks_on(R1, hook_scatter_add)


@case
def c_index_fill_(m):
    def hook_index_fill(x, hook):
        x.index_fill_(-1, torch.tensor([0, 63]), -1.0)
    return hooks_on(R1, hook_index_fill)


@case
def c_masked_fill_(m):
    def hook_masked_fill(x, hook):
        x.masked_fill_(x.abs() < 0.02, 0.0)
    return hooks_on(R1, hook_masked_fill)


@case
def c_zero_slice(m):
    def hook_zero(x, hook):
        x[:, 1:4].zero_()
    return hooks_on(R1, hook_zero)


@case
def c_fill_(m):
    def hook_fill(x, hook):
        x[0, :, ::2].fill_(0.25)
    return hooks_on(R1, hook_fill)


@case
def c_iadd_operator(m):
    def hook_iadd(x, hook):
        x += 0.1
    return hooks_on(R1, hook_iadd)


@case
def c_iadd_then_return(m):
    def hook_iadd_ret(x, hook):
        x += 0.1
        return x
    return hooks_on(R1, hook_iadd_ret)


@case
def c_rebind_no_return(m):
    """x = x * 2 without return: local TL keeps the original activation."""
    def hook_rebind(x, hook):
        x = x * 2  # noqa: F841
    return hooks_on(R1, hook_rebind)


@case
def c_inplace_on_rebound(m):
    """A new tensor edited in place and not returned: no effect locally."""
    def hook_inplace_copy(x, hook):
        y = x.clone()
        y[:, 1] = 100.0
    return hooks_on(R1, hook_inplace_copy)


@case
def c_inplace_then_return_other(m):
    """In-place edit of the activation, then return a different tensor: returned wins."""
    def hook_ip_then_other(x, hook):
        x[:, 1] = 100.0
        return x * 0.5
    return hooks_on(R1, hook_ip_then_other)


@case
def c_return_clone_edit(m):
    def hook_clone_edit(x, hook):
        y = x.clone()
        y[:, 2] = 0
        return y
    return hooks_on(R1, hook_clone_edit)


@case
def c_return_view(m):
    def hook_return_view(x, hook):
        x[:, 0, 0] = 1.0
        return x.view(x.shape)
    return hooks_on(R1, hook_return_view)


@case
def c_return_double_transpose(m):
    def hook_return_tt(x, hook):
        return (x.transpose(0, 1) * 2).transpose(0, 1)
    return hooks_on(R1, hook_return_tt)


@case
def c_return_local_constant(m):
    def hook_return_const(x, hook):
        return torch.zeros(x.shape) + 0.01
    return hooks_on(R1, hook_return_const)


@case
def c_return_input_unchanged(m):
    def hook_return_same(x, hook):
        return x
    return hooks_on(R1, hook_return_same)


@case
def c_relu_inplace(m):
    def hook_relu_(x, hook):
        x.relu_()
    return hooks_on(R1, hook_relu_)


@case
def c_F_relu_inplace_kw(m):
    def hook_F_relu_ip(x, hook):
        F.relu(x, inplace=True)
    return hooks_on(R1, hook_F_relu_ip)


@case
def c_clamp_min_(m):
    def hook_clamp_min(x, hook):
        x.clamp_min_(-0.01)
    return hooks_on(R1, hook_clamp_min)


@case
def c_addcmul_(m):
    def hook_addcmul(x, hook):
        x.addcmul_(x, x, value=0.5)
    return hooks_on(R1, hook_addcmul)


@case
def c_lerp_(m):
    def hook_lerp(x, hook):
        x.lerp_(torch.zeros_like(x), 0.3)
    return hooks_on(R1, hook_lerp)


@case
def c_shift_overlap(m):
    """Overlapping self-assignment: torch refuses it locally (memory overlap)."""
    def hook_shift(x, hook):
        x[:, 1:] = x[:, :-1]
    return hooks_on(R1, hook_shift)


@case
def c_shift_overlap_clone(m):
    def hook_shift_clone(x, hook):
        x[:, 1:] = x[:, :-1].clone()
    return hooks_on(R1, hook_shift_clone)


@case
def c_swap_positions_fancy(m):
    def hook_swap(x, hook):
        x[:, [1, 2]] = x[:, [2, 1]]
    return hooks_on(R1, hook_swap)


@case
def c_swap_positions_tuple(m):
    """Python tuple swap with views: a, b = b, a -- aliasing makes both equal locally."""
    def hook_swap_views(x, hook):
        x[:, 1], x[:, 2] = x[:, 2], x[:, 1]
    return hooks_on(R1, hook_swap_views)


@case
def c_view_alias_edit_via_unbind(m):
    def hook_unbind(x, hook):
        first, second = x.unbind(0)
        first[1] = 0.0
        second.mul_(2)
    return hooks_on(R1, hook_unbind)


@case
def c_edit_via_chunk(m):
    def hook_chunk(x, hook):
        a, b = x.chunk(2, dim=-1)
        a.zero_()
        b += 1
    return hooks_on(R1, hook_chunk)


@case
def c_edit_via_split_sizes(m):
    def hook_split(x, hook):
        a, b, c = x.split([10, 20, 34], dim=-1)
        b.mul_(0)
    return hooks_on(R1, hook_split)


@case
def c_edit_via_tensor_split(m):
    def hook_tensor_split(x, hook):
        a, b = torch.tensor_split(x, 2, dim=-1)
        b.mul_(0)
    return hooks_on(R1, hook_tensor_split)


@case
def c_edit_via_diagonal(m):
    def hook_diagonal(x, hook):
        d = x[:, :8, :8].diagonal(dim1=1, dim2=2)
        d.fill_(3.0)
    return hooks_on(R1, hook_diagonal)


@case
def c_edit_via_narrow(m):
    def hook_narrow(x, hook):
        x.narrow(1, 2, 3).mul_(-1)
    return hooks_on(R1, hook_narrow)


@case
def c_edit_via_select(m):
    def hook_select(x, hook):
        x.select(-1, 5).fill_(7.0)
    return hooks_on(R1, hook_select)


@case
def c_edit_via_unsqueeze_squeeze(m):
    def hook_unsq(x, hook):
        x.unsqueeze(0).squeeze(0)[:, 1] = 2.0
    return hooks_on(R1, hook_unsq)


@case
def c_edit_via_movedim(m):
    def hook_movedim(x, hook):
        x.movedim(-1, 0)[3] = 0.0
    return hooks_on(R1, hook_movedim)


@case
def c_edit_via_detach(m):
    def hook_detach_edit(x, hook):
        x.detach()[:, 1] = 9.0
    return hooks_on(R1, hook_detach_edit)


@case
def c_edit_via_data(m):
    def hook_data_edit(x, hook):
        x.data[:, 1] = 9.0
    return hooks_on(R1, hook_data_edit)


@case
def c_edit_via_reshape(m):
    def hook_reshape_edit(x, hook):
        x.reshape(x.shape[0] * x.shape[1], -1)[0] = 1.0
    return hooks_on(R1, hook_reshape_edit)


@case
def c_edit_via_flatten_view(m):
    def hook_flatten(x, hook):
        x.flatten()[:10] = 0.0
    return hooks_on(R1, hook_flatten)


@case
def c_edit_via_as_strided(m):
    def hook_as_strided(x, hook):
        x.as_strided((2, 4), (x.stride(0), 1)).zero_()
    return hooks_on(R1, hook_as_strided)


@case
def c_edit_view_via_view_dtype_same(m):
    def hook_view_dtype(x, hook):
        x.view(torch.float32)[:, 1] = 0.0
    return hooks_on(R1, hook_view_dtype)


@case
def c_edit_base_then_read_expand(m):
    def make_state():
        return {}
    st = make_state()

    def hook_expand_alias(x, hook):
        e = x[:, :1].expand(-1, 4, -1)
        x[:, 0] = 5.0
        st["expanded"] = e  # a view: sees the edit
    return hooks_on(R1, hook_expand_alias, st=st)


@case
def c_edit_base_then_read_diagonal(m):
    st = {}

    def hook_diag_alias(x, hook):
        d = x.diagonal(dim1=1, dim2=2)
        x[:, 0, 0] = 5.0
        st["diag"] = d
    return hooks_on(R1, hook_diag_alias, st=st)


@case
def c_edit_base_then_read_unfold(m):
    st = {}

    def hook_unfold_alias(x, hook):
        u = x.unfold(1, 3, 2)
        x[:, 0] = 5.0
        st["unfold"] = u
    return hooks_on(R1, hook_unfold_alias, st=st)


@case
def c_edit_base_then_read_T(m):
    st = {}

    def hook_T_alias(x, hook):
        t = x[0].T
        x[0, 0] = 5.0
        st["t"] = t
    return hooks_on(R1, hook_T_alias, st=st)


@case
def c_edit_base_then_read_split(m):
    st = {}

    def hook_split_alias(x, hook):
        parts = x.split(16, dim=-1)
        x[..., 0] = 5.0
        st["p0"] = parts[0]
        st["p1"] = parts[1]
    return hooks_on(R1, hook_split_alias, st=st)


@case
def c_edit_base_then_read_broadcast_to(m):
    st = {}

    def hook_bcast_alias(x, hook):
        b = x[0].broadcast_to((3,) + tuple(x.shape[1:]))
        x[0, 0] = 5.0
        st["b"] = b
    return hooks_on(R1, hook_bcast_alias, st=st)


@case
def c_edit_base_then_read_real_view(m):
    st = {}

    def hook_view_as_alias(x, hook):
        v = x.view_as(x)
        x.mul_(2)
        st["v"] = v
    return hooks_on(R1, hook_view_as_alias, st=st)


# ---- 2. closures ----------------------------------------------------------------------------

@case
def c_closure_list_floats(m):
    scales = [0.5, 2.0]

    def hook_list_scale(x, hook):
        return x * scales[hook.layer()]
    return Spec([(lambda n: n.endswith("hook_resid_pre"), hook_list_scale)])


@case
def c_closure_dict(m):
    coeffs = {"blocks.0.hook_out": 1.5, "blocks.1.hook_out": -0.5}  # TL 4's canonical names

    def hook_dict_coeff(x, hook):
        x *= coeffs[hook.name]
    return Spec([(lambda n: n in coeffs, hook_dict_coeff)])


@case
def c_closure_int_pos(m):
    pos = 4

    def hook_int_pos(x, hook):
        x[:, pos, :] = x[:, pos, :] * 3
    return hooks_on(R1, hook_int_pos)


@case
def c_closure_numpy_array(m):
    vec = np.linspace(-1, 1, 64).astype(np.float32)

    def hook_np_add(x, hook):
        return x + torch.from_numpy(vec)
    return hooks_on(R1, hook_np_add)


@case
def c_closure_numpy_direct(m):
    vec = np.linspace(-1, 1, 64).astype(np.float32)

    def hook_np_direct(x, hook):
        return x + vec
    return hooks_on(R1, hook_np_direct)


@case
def c_closure_numpy_f64_direct(m):
    vec = np.linspace(-1, 1, 64)

    def hook_np_f64(x, hook):
        x += vec
    return hooks_on(R1, hook_np_f64)


@case
def c_closure_numpy_index(m):
    idx = np.array([1, 3, 5])

    def hook_np_index(x, hook):
        x[:, idx] = 0
    return hooks_on(R1, hook_np_index)


@case
def c_closure_numpy_scalar(m):
    s = np.float64(0.3)

    def hook_np_scalar(x, hook):
        return x * s
    return hooks_on(R1, hook_np_scalar)


@case
def c_closure_numpy_int_scalar_index(m):
    p = np.int64(2)

    def hook_np_int_index(x, hook):
        x[:, p] = 0
    return hooks_on(R1, hook_np_int_index)


@case
def c_closure_tensor_mutated_after_trace(m):
    """A captured local tensor mutated after the hook ran (during the forward)."""
    vec = torch.zeros(64)
    calls = []

    def hook_vec_first(x, hook):
        calls.append(1)
        return x + vec

    def hook_vec_bump(x, hook):
        vec.add_(1.0)  # local tensor edited in place while the forward runs
    return Spec([(R0, hook_vec_first), (R1, hook_vec_bump)], {"calls": calls})


@case
def c_closure_tensor_mutated_between_layers(m):
    """Layer 0 uses vec, then a later hook edits vec in place, then layer 1 uses it."""
    vec = torch.zeros(64)

    def hook_use_vec(x, hook):
        return x + vec

    def hook_bump_vec(x, hook):
        vec.fill_(1.0)
    return Spec([(R0, hook_use_vec), ("blocks.0.hook_resid_mid", hook_bump_vec),
                 (R1, hook_use_vec)])


@case
def c_partial_kw(m):
    def scale_pos(x, hook, pos, factor):
        x[:, pos] *= factor
    return Spec([(R1, functools.partial(scale_pos, pos=2, factor=-1.0)),
                 (R0, functools.partial(scale_pos, pos=-1, factor=0.0))])


@case
def c_partial_positional(m):
    def add_vec(vec, x, hook):
        return x + vec
    return hooks_on(R1, functools.partial(add_vec, torch.ones(64) * 0.2))


@case
def c_callable_object(m):
    class Steer:
        def __init__(self, alpha):
            self.alpha = alpha
            self.seen = []

        def __call__(self, x, hook):
            self.seen.append(hook.name)
            return x + self.alpha

    s = Steer(0.3)
    return Spec([(R1, s)], {"seen": s.seen})


@case
def c_bound_method(m):
    class Ablator:
        def __init__(self):
            self.store = {}

        def ablate(self, x, hook):
            self.store[hook.name] = x.mean()
            x[:, :, 0] = 0

    a = Ablator()
    return Spec([(R1, a.ablate)], {"store": a.store})


@case
def c_lambda_hook(m):
    return Spec([(R1, lambda x, hook: x.mul(0.9))])


@case
def c_lambda_hook_setitem_fn(m):
    return Spec([(R1, lambda x, hook: x.__setitem__((slice(None), 0), 0.0))])


# ---- 3. caching into outer containers --------------------------------------------------------

@case
def c_cache_no_clone_then_later_inplace_same_hook(m):
    cache = {}

    def hook_cache_noclone(x, hook):
        cache["raw"] = x
        cache["clone"] = x.clone()
        x[:, 1] = 0
    return hooks_on(R1, hook_cache_noclone, cache=cache)


@case
def c_cache_no_clone_other_hook_edits(m):
    """Hook A caches the activation (no clone); hook B on the same site edits it in place."""
    cache = {}

    def hook_a_cache(x, hook):
        cache["a"] = x
        cache["a_detach"] = x.detach()

    def hook_b_edit(x, hook):
        x[:, 2] = -1.0
    return Spec([(R1, hook_a_cache), (R1, hook_b_edit)], {"cache": cache})


@case
def c_cache_then_replace(m):
    cache = {}

    def hook_a_cache2(x, hook):
        cache["a"] = x

    def hook_b_replace(x, hook):
        return x * 2

    def hook_c_see(x, hook):
        cache["c"] = x
        x[:, 0] = 0  # edits the replacement, not what A kept
    return Spec([(R1, hook_a_cache2), (R1, hook_b_replace), (R1, hook_c_see)],
                {"cache": cache})


@case
def c_cache_resid_post_then_edit_next_resid_pre(m):
    """blocks.0.hook_resid_post and blocks.1.hook_resid_pre are the same tensor locally."""
    cache = {}

    def hook_keep(x, hook):
        cache[hook.name] = x

    def hook_edit_next(x, hook):
        x[:, 1] = 0.0
    return Spec([(P0, hook_keep), (R1, hook_edit_next)], {"cache": cache})


@case
def c_cache_resid_pre_then_edit_prev_post(m):
    """The other direction: the edit at resid_post(0) is visible at resid_pre(1) anyway."""
    cache = {}

    def hook_edit_post(x, hook):
        x[:, 1] = 0.0

    def hook_keep_pre(x, hook):
        cache[hook.name] = x
    return Spec([(P0, hook_edit_post), (R1, hook_keep_pre)], {"cache": cache})


@case
def c_cache_q_then_edit_k(m):
    """hook_q/hook_k/hook_v are views of one projection on some architectures."""
    cache = {}

    def hook_keep_q(x, hook):
        cache["q"] = x

    def hook_edit_k(x, hook):
        x[:, :, 0] = 0.0
    return Spec([("blocks.0.attn.hook_q", hook_keep_q), ("blocks.0.attn.hook_k", hook_edit_k)],
                {"cache": cache})


@case
def c_cache_embed_then_edit_resid(m):
    cache = {}

    def hook_keep_embed(x, hook):
        cache["embed"] = x

    def hook_edit_resid0(x, hook):
        x.mul_(0.5)
    return Spec([("hook_embed", hook_keep_embed), (R0, hook_edit_resid0)], {"cache": cache})


@case
def c_cache_attn_out_then_edit_mid(m):
    cache = {}

    def hook_keep_attn_out(x, hook):
        cache["attn_out"] = x

    def hook_edit_mid(x, hook):
        x.mul_(0.5)
    return Spec([("blocks.0.hook_attn_out", hook_keep_attn_out),
                 ("blocks.0.hook_resid_mid", hook_edit_mid)], {"cache": cache})


@case
def c_cache_mlp_out_then_edit_post(m):
    cache = {}

    def hook_keep_mlp_out(x, hook):
        cache["mlp_out"] = x

    def hook_edit_post0(x, hook):
        x.mul_(0.5)
    return Spec([("blocks.0.hook_mlp_out", hook_keep_mlp_out), (P0, hook_edit_post0)],
                {"cache": cache})


@case
def c_cache_ln_final_then_nothing(m):
    cache = {}

    def hook_keep_lnf(x, hook):
        cache["lnf"] = x.detach().cpu()
    return hooks_on("ln_final.hook_normalized", hook_keep_lnf, cache=cache)


@case
def c_cache_list_append_every_layer(m):
    acts = []

    def hook_append(x, hook):
        acts.append((hook.name, hook.layer(), x[:, -1].clone()))
    return Spec([(lambda n: n.endswith("hook_resid_post") or n.endswith("hook_resid_pre"),
                  hook_append)], {"acts": acts})


@case
def c_cache_counter_int(m):
    st = {"n": 0}

    def hook_count(x, hook):
        st["n"] += 1
        return x * (1 + 0.1 * st["n"])
    return Spec([(lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_mid"),
                  hook_count)], {"st": st})


@case
def c_cache_stats_reductions(m):
    st = {}

    def hook_stats(x, hook):
        st[hook.name] = {"mean": x.mean(), "std": x.std(), "var": x.var(dim=-1),
                         "norm": x.norm(dim=-1), "max": x.amax(dim=(0, 1)),
                         "median": x.median(dim=-1).values, "cumsum": x.cumsum(1)[:, -1],
                         "sorted_idx": x[0, 0].argsort()}
    return Spec([(lambda n: n.endswith("hook_resid_post"), hook_stats)], {"st": st})


@case
def c_cache_tuple_of_topk(m):
    st = {}

    def hook_topk(x, hook):
        st["topk"] = torch.topk(x, 5, dim=-1)
        st["max_tuple"] = x.max(-1)
    return Spec([(P1, hook_topk)], {"st": st})


@case
def c_hook_ctx(m):
    def hook_ctx_store(x, hook):
        hook.ctx["mean"] = x.mean(0)
        return x - hook.ctx["mean"]
    return hooks_on(R1, hook_ctx_store)


# ---- 4. hook.name / hook.layer, names_filter, many layers, order -----------------------------

@case
def c_name_branch(m):
    def hook_name_branch(x, hook):
        if "resid_pre" in hook.name:
            return x * 0.5
        if hook.layer() == 1:
            x[:, :, :4] = 0
    return Spec([(lambda n: n.startswith("blocks.1.hook_resid"), hook_name_branch)])


@case
def c_name_parse_layer(m):
    def hook_parse(x, hook):
        layer = int(hook.name.split(".")[1])
        return x * (layer + 1) * 0.5
    return Spec([(lambda n: re.fullmatch(r"blocks\.\d+\.hook_resid_pre", n) is not None,
                  hook_parse)])


@case
def c_names_filter_any_attn(m):
    st = {}

    def hook_keep_any(x, hook):
        st[hook.name] = x.sum(-1)
    return Spec([(lambda n: ".attn." in n, hook_keep_any)], {"st": st})


@case
def c_same_fn_all_layers_mlp_post(m):
    def hook_mlp_zero_half(x, hook):
        x[..., : x.shape[-1] // 2] = 0
    return Spec([(f"blocks.{i}.mlp.hook_post", hook_mlp_zero_half) for i in range(2)])


@case
def c_order_hooks_reversed_registration(m):
    log = []

    def hook_log(x, hook):
        log.append(hook.name)
        return x + len(log) * 0.01
    sites = ["blocks.1.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.0.hook_resid_mid",
             "hook_embed"]
    return Spec([(s, hook_log) for s in sites], {"log": log})


@case
def c_order_two_hooks_one_site(m):
    def hook_first_scale(x, hook):
        return x * 3

    def hook_second_add(x, hook):
        x += 1
    return Spec([(R1, hook_first_scale), (R1, hook_second_add)])


@case
def c_order_value_passed_between_hooks(m):
    box = {}

    def hook_take(x, hook):
        box["v"] = x[:, -1].clone()

    def hook_put(x, hook):
        x[:, -1] = box["v"]
    return Spec([(R0, hook_take), (P1, hook_put)], {"box": box})


@case
def c_order_later_hook_uses_earlier_proxy_mutated(m):
    """Hook 1 stores the activation (no clone); the model then keeps computing; hook 2 later
    uses the stored one."""
    box = {}

    def hook_keep_raw(x, hook):
        box["v"] = x

    def hook_use_raw(x, hook):
        return x + box["v"]
    return Spec([(R0, hook_keep_raw), (P1, hook_use_raw)])


# ---- 5. einops / einsum ---------------------------------------------------------------------

@case
def c_einops_rearrange_edit(m):
    def hook_rearr(z, hook):
        r = einops.rearrange(z, "b p h d -> b h p d")
        r[:, 1] = 0.0
    return hooks_on("blocks.0.attn.hook_z", hook_rearr)


@case
def c_einops_rearrange_return(m):
    def hook_rearr_ret(z, hook):
        flat = einops.rearrange(z, "b p h d -> b p (h d)")
        flat = flat * torch.linspace(0, 1, flat.shape[-1])
        return einops.rearrange(flat, "b p (h d) -> b p h d", h=z.shape[2])
    return hooks_on("blocks.0.attn.hook_z", hook_rearr_ret)


@case
def c_einops_reduce_repeat(m):
    def hook_reduce(x, hook):
        mean = einops.reduce(x, "b p d -> b d", "mean")
        return x - einops.repeat(mean, "b d -> b p d", p=x.shape[1])
    return hooks_on(R1, hook_reduce)


@case
def c_einops_einsum(m):
    direction = torch.randn(64, generator=torch.Generator().manual_seed(3))

    def hook_einops_einsum(x, hook):
        c = einops.einsum(x, direction, "b p d, d -> b p")
        return x - c[..., None] * direction
    return hooks_on(R1, hook_einops_einsum)


@case
def c_torch_einsum_heads(m):
    def hook_einsum_heads(z, hook):
        w = torch.tensor([1.0, 0.0, 2.0, 0.5])
        return torch.einsum("bphd,h->bphd", z, w)
    return hooks_on("blocks.1.attn.hook_z", hook_einsum_heads)


@case
def c_einsum_with_weight(m):
    def hook_einsum_WO(z, hook):
        out = torch.einsum("bphd,hdm->bpm", z, m.blocks[0].attn.W_O)
        hook.ctx.clear()
        st["out"] = out
    st = {}
    return hooks_on("blocks.0.attn.hook_z", hook_einsum_WO, st=st)


# ---- 6. functional ops ----------------------------------------------------------------------

@case
def c_F_softmax(m):
    def hook_F_softmax(x, hook):
        return F.softmax(x, dim=-1) * x.shape[-1]
    return hooks_on(R1, hook_F_softmax)


@case
def c_F_layer_norm(m):
    def hook_F_ln(x, hook):
        return F.layer_norm(x, (x.shape[-1],))
    return hooks_on(R1, hook_F_ln)


@case
def c_F_layer_norm_weight(m):
    w = torch.linspace(0.5, 1.5, 64)

    def hook_F_ln_w(x, hook):
        return F.layer_norm(x, x.shape[-1:], weight=w, bias=None, eps=1e-6)
    return hooks_on(R1, hook_F_ln_w)


@case
def c_F_normalize(m):
    def hook_F_normalize(x, hook):
        return F.normalize(x, dim=-1) * x.norm(dim=-1, keepdim=True)
    return hooks_on(R1, hook_F_normalize)


@case
def c_F_cosine_similarity(m):
    st = {}
    d = torch.randn(64, generator=torch.Generator().manual_seed(1))

    def hook_cos(x, hook):
        st["cos"] = F.cosine_similarity(x, d, dim=-1)
    return hooks_on(R1, hook_cos, st=st)


@case
def c_F_gelu_silu(m):
    def hook_gelu(x, hook):
        return F.gelu(x) + F.silu(x) - F.relu(x)
    return hooks_on(R1, hook_gelu)


@case
def c_F_pad(m):
    def hook_pad(x, hook):
        return F.pad(x[:, 1:], (0, 0, 1, 0))
    return hooks_on(R1, hook_pad)


@case
def c_F_dropout_eval(m):
    def hook_dropout_eval(x, hook):
        return F.dropout(x, p=0.5, training=False)
    return hooks_on(R1, hook_dropout_eval)


@case
def c_log_softmax_logits_hook(m):
    st = {}

    def hook_lsm(x, hook):
        st["lsm"] = x.log_softmax(-1)
    return hooks_on("ln_final.hook_normalized", hook_lsm, st=st)


# ---- 7. dtype casts / constants on another dtype --------------------------------------------

@case
def c_half_roundtrip(m):
    def hook_half(x, hook):
        return x.half().float()
    return hooks_on(R1, hook_half)


@case
def c_bf16_roundtrip(m):
    def hook_bf16(x, hook):
        return x.to(torch.bfloat16).to(torch.float32)
    return hooks_on(R1, hook_bf16)


@case
def c_bf16_arith(m):
    def hook_bf16_arith(x, hook):
        y = x.to(torch.bfloat16)
        y = y * 3 + 1
        return y.float()
    return hooks_on(R1, hook_bf16_arith)


@case
def c_half_softmax(m):
    def hook_half_softmax(x, hook):
        return (x.half().softmax(-1) * 64).float()
    return hooks_on(R1, hook_half_softmax)


@case
def c_double_compute(m):
    def hook_double(x, hook):
        return (x.double() ** 2).sqrt().float() * x.sign()
    return hooks_on(R1, hook_double)


@case
def c_setitem_from_half(m):
    def hook_setitem_half(x, hook):
        x[:, 1] = x[:, 2].half()
    return hooks_on(R1, hook_setitem_half)


@case
def c_iadd_f64_tensor(m):
    def hook_iadd_f64(x, hook):
        x += torch.full((64,), 1 / 3, dtype=torch.float64)
    return hooks_on(R1, hook_iadd_f64)


@case
def c_add_f64_zero_dim(m):
    def hook_add_f64_0d(x, hook):
        return x + torch.tensor(1 / 3, dtype=torch.float64)
    return hooks_on(R1, hook_add_f64_0d)


@case
def c_mul_int_tensor(m):
    def hook_mul_int(x, hook):
        return x * torch.arange(64)
    return hooks_on(R1, hook_mul_int)


@case
def c_mul_bool_tensor(m):
    keep = torch.arange(64) % 2 == 0

    def hook_mul_bool(x, hook):
        return x * keep
    return hooks_on(R1, hook_mul_bool)


@case
def c_return_f64(m):
    def hook_return_f64(x, hook):
        return x.double()
    return hooks_on(R1, hook_return_f64)


@case
def c_return_half(m):
    def hook_return_half(x, hook):
        return x.half()
    return hooks_on(R1, hook_return_half)


@case
def c_return_f64_from_mul(m):
    def hook_return_f64_mul(x, hook):
        return x * torch.ones(64, dtype=torch.float64)
    return hooks_on(R1, hook_return_f64_mul)


@case
def c_save_half(m):
    st = {}

    def hook_save_half(x, hook):
        st["h"] = x.half()
        st["bf"] = x.bfloat16()
        st["i"] = (x * 100).long()
        st["b"] = x > 0
    return hooks_on(R1, hook_save_half, st=st)


@case
def c_to_kwargs(m):
    def hook_to_kw(x, hook):
        return x.to(dtype=torch.float16).to(device=x.device, dtype=torch.float32)
    return hooks_on(R1, hook_to_kw)


@case
def c_type_cast(m):
    def hook_type(x, hook):
        return x.type(torch.float16).type(torch.float32)
    return hooks_on(R1, hook_type)


@case
def c_to_other_tensor(m):
    ref = torch.zeros(1, dtype=torch.float16)

    def hook_to_tensor(x, hook):
        return x.to(ref).float()
    return hooks_on(R1, hook_to_tensor)


@case
def c_inplace_int_div(m):
    def hook_div_int(x, hook):
        x /= 3
        x //= 0.01
    return hooks_on(R1, hook_div_int)


@case
def c_inf_nan_constants(m):
    def hook_inf(x, hook):
        y = torch.where(x > 0.2, float("inf"), x)
        y = torch.where(x < -0.2, float("nan"), y)
        return torch.nan_to_num(y, nan=0.0, posinf=1.0)
    return hooks_on(R1, hook_inf)


# ---- 8. reading values / control flow --------------------------------------------------------

@case
def c_item_scale(m):
    def hook_item(x, hook):
        return x / x.abs().max().item()
    return hooks_on(R1, hook_item)


@case
def c_if_tensor(m):
    def hook_if(x, hook):
        if x.mean() > 0:
            return x * 2
    return hooks_on(R1, hook_if)


@case
def c_python_max_of_tensor(m):
    def hook_py_max(x, hook):
        return x * max(1.0, x.norm())
    return hooks_on(R1, hook_py_max)


@case
def c_python_round_tensor(m):
    def hook_round(x, hook):
        return x * round(x.std(), 2)
    return hooks_on(R1, hook_round)


@case
def c_math_on_tensor(m):
    def hook_math(x, hook):
        return x * math.exp(x.mean())
    return hooks_on(R1, hook_math)


@case
def c_len_and_shape_flow(m):
    def hook_len(x, hook):
        for i in range(len(x)):
            x[i, : x.shape[1] // 2] *= 0.5
    return hooks_on(R1, hook_len)


@case
def c_iterate_tensor(m):
    def hook_iter(x, hook):
        for row in x:
            row[0] = 0.0
    return hooks_on(R1, hook_iter)


@case
def c_enumerate_rows_edit(m):
    def hook_enum(x, hook):
        for i, row in enumerate(x):
            row.mul_(i + 1)
    return hooks_on(R1, hook_enum)


@case
def c_tensor_bool_any_guard(m):
    def hook_any(x, hook):
        if torch.isnan(x).any():
            return torch.zeros_like(x)
    return hooks_on(R1, hook_any)


@case
def c_numpy_of_activation(m):
    st = {}

    def hook_np_of_act(x, hook):
        st["a"] = x.detach().cpu().numpy()
    return hooks_on(R1, hook_np_of_act, st=st)


@case
def c_torch_equal(m):
    st = {}

    def hook_equal(x, hook):
        st["eq"] = torch.equal(x, x)
    return hooks_on(R1, hook_equal, st=st)


@case
def c_allclose(m):
    st = {}

    def hook_allclose(x, hook):
        st["close"] = torch.allclose(x, x * 1.0)
    return hooks_on(R1, hook_allclose, st=st)


# ---- 9. random ops --------------------------------------------------------------------------

@case
def c_randn_like(m):
    def hook_randn(x, hook):
        return x + 0.1 * torch.randn_like(x)
    return hooks_on(R1, hook_randn)


@case
def c_randn_shape(m):
    def hook_randn_shape(x, hook):
        return x + 0.1 * torch.randn(x.shape)
    return hooks_on(R1, hook_randn_shape)


@case
def c_rand_generator(m):
    g = torch.Generator().manual_seed(7)

    def hook_rand_gen(x, hook):
        return x + torch.rand(x.shape, generator=g)
    return hooks_on(R1, hook_rand_gen)


@case
def c_normal_inplace(m):
    def hook_normal_(x, hook):
        x[:, 1].normal_(0, 0.5)
    return hooks_on(R1, hook_normal_)


@case
def c_dropout_train(m):
    def hook_dropout(x, hook):
        return F.dropout(x, p=0.3, training=True)
    return hooks_on(R1, hook_dropout)


@case
def c_randperm_shuffle(m):
    def hook_randperm(x, hook):
        return x[:, :, torch.randperm(x.shape[-1])]
    return hooks_on(R1, hook_randperm)


@case
def c_bernoulli_values(m):
    def hook_bern(x, hook):
        return x * torch.bernoulli(torch.sigmoid(x))
    return hooks_on(R1, hook_bern)


@case
def c_randn_every_layer_rng_state(m):
    """Several draws across layers: the numbers and the RNG state afterwards must match."""
    st = {}

    def hook_noise(x, hook):
        return x + 0.05 * torch.randn_like(x)

    def run(model, tokens, kw):
        out = model.run_with_hooks(tokens, fwd_hooks=[
            (lambda n: n.endswith("hook_resid_pre") or n.endswith("hook_resid_mid"),
             hook_noise)], **kw)
        st["after"] = torch.rand(3)
        return out
    return Spec(state=st, run=run, names=["hook_noise"])


# ---- 10. slicing --------------------------------------------------------------------------

@case
def c_negative_index_last(m):
    st = {}

    def hook_last_tok(x, hook):
        st["last"] = x[:, -1]
        x[:, -1] *= 2
    return hooks_on(R1, hook_last_tok, st=st)


@case
def c_negative_slice(m):
    def hook_neg_slice(x, hook):
        x[:, -3:-1, -5:] = 0
    return hooks_on(R1, hook_neg_slice)


@case
def c_step_slice(m):
    def hook_step(x, hook):
        x[:, ::2, 1::3] = 0
    return hooks_on(R1, hook_step)


@case
def c_negative_step(m):
    def hook_neg_step(x, hook):
        return x[:, ::-1]
    return hooks_on(R1, hook_neg_step)


@case
def c_flip(m):
    def hook_flip(x, hook):
        return x.flip(1)
    return hooks_on(R1, hook_flip)


@case
def c_reverse_index_list(m):
    def hook_rev_list(x, hook):
        return x[:, list(range(x.shape[1] - 1, -1, -1))]
    return hooks_on(R1, hook_rev_list)


@case
def c_none_index(m):
    def hook_none_idx(x, hook):
        return (x[:, None] * 2)[:, 0]
    return hooks_on(R1, hook_none_idx)


@case
def c_slice_tensor_bound(m):
    n = torch.tensor(4)

    def hook_tensor_bound(x, hook):
        x[:, :n] = 0
    return hooks_on(R1, hook_tensor_bound)


@case
def c_traced_index_tensor(m):
    def hook_traced_idx(x, hook):
        idx = x[0, 0].abs().argmax()
        x[..., idx] = 0
    return hooks_on(R1, hook_traced_idx)


@case
def c_gather(m):
    def hook_gather(x, hook):
        idx = x.argsort(-1)[..., :4]
        return x.scatter(-1, idx, torch.gather(x, -1, idx) * 10)
    return hooks_on(R1, hook_gather)


@case
def c_roll(m):
    def hook_roll(x, hook):
        return torch.roll(x, shifts=1, dims=1)
    return hooks_on(R1, hook_roll)


@case
def c_out_of_range_pos(m):
    def hook_oob(x, hook):
        x[:, 50] = 0
    return hooks_on(R1, hook_oob)


# ---- 11. attention sites: per-head edits ------------------------------------------------------

@case
def c_pattern_zero_head_renorm(m):
    def hook_pattern_renorm(p, hook):
        p[:, 1] = 0
        p[:, 2, :, 0] = 0
        p /= p.sum(-1, keepdim=True) + 1e-9
    return hooks_on("blocks.0.attn.hook_pattern", hook_pattern_renorm)


@case
def c_pattern_return_uniform(m):
    def hook_pattern_uniform(p, hook):
        causal = torch.tril(torch.ones(p.shape[-2], p.shape[-1]))
        return (causal / causal.sum(-1, keepdim=True)).expand_as(p).clone()
    return hooks_on("blocks.1.attn.hook_pattern", hook_pattern_uniform)


@case
def c_pattern_return_expand_no_clone(m):
    def hook_pattern_expand(p, hook):
        causal = torch.tril(torch.ones(p.shape[-2], p.shape[-1]))
        return (causal / causal.sum(-1, keepdim=True)).expand_as(p)
    return hooks_on("blocks.1.attn.hook_pattern", hook_pattern_expand)


@case
def c_scores_mask_neg_inf(m):
    def hook_scores_mask(s, hook):
        s[:, 0, :, 1] = float("-inf")
    return hooks_on("blocks.0.attn.hook_attn_scores", hook_scores_mask)


@case
def c_scores_masked_fill(m):
    def hook_scores_fill(s, hook):
        mask = torch.zeros(s.shape[-2], s.shape[-1], dtype=torch.bool)
        mask[:, 0] = True
        return s.masked_fill(mask, -1e4)
    return hooks_on("blocks.1.attn.hook_attn_scores", hook_scores_fill)


@case
def c_scores_scale_head(m):
    def hook_scores_temp(s, hook):
        s[:, 3] /= 0.5
    return hooks_on("blocks.0.attn.hook_attn_scores", hook_scores_temp)


@case
def c_z_head_mean_ablate(m):
    def hook_z_mean(z, hook):
        z[:, :, 2] = z[:, :, 2].mean(dim=(0, 1), keepdim=True)
    return hooks_on("blocks.0.attn.hook_z", hook_z_mean)


@case
def c_z_heads_list_mul(m):
    def hook_z_heads(z, hook):
        z[:, :, [0, 3]] *= 0.0
    return hooks_on("blocks.1.attn.hook_z", hook_z_heads)


@case
def c_q_per_head_scale(m):
    def hook_q_scale(q, hook):
        q[:, :, 1] *= 2.0
    return hooks_on("blocks.0.attn.hook_q", hook_q_scale)


@case
def c_k_per_head_zero(m):
    def hook_k_zero(k, hook):
        k[:, :, 0] = 0.0
    return hooks_on("blocks.0.attn.hook_k", hook_k_zero)


@case
def c_v_return(m):
    def hook_v_ret(v, hook):
        return v * torch.arange(v.shape[2]).view(1, 1, -1, 1)
    return hooks_on("blocks.1.attn.hook_v", hook_v_ret)


@case
def c_q_and_k_same_fn(m):
    def hook_qk(t, hook):
        t[..., 0] = 0
    return Spec([("blocks.0.attn.hook_q", hook_qk), ("blocks.0.attn.hook_k", hook_qk),
                 ("blocks.0.attn.hook_v", hook_qk)])


@case
def c_pattern_store_and_edit_two_hooks(m):
    st = {}

    def hook_pat_keep(p, hook):
        st["before"] = p

    def hook_pat_edit(p, hook):
        p[:, 0] = p[:, 1]
    return Spec([("blocks.1.attn.hook_pattern", hook_pat_keep),
                 ("blocks.1.attn.hook_pattern", hook_pat_edit)], {"st": st})


@case
def c_rot_q_edit(m):
    def hook_rot_q(q, hook):
        q[:, :, 0, :2] = 0
    return hooks_on("blocks.0.attn.hook_rot_q", hook_rot_q)


@case
def c_z_from_cache_patch_heads(m):
    """Patch head 1's z from a clean run: a cached *real* tensor used in a hook."""
    clean = {}

    def run(model, tokens, kw):
        def hook_cache_z(z, hook):
            clean[hook.name] = z.clone()
        model.run_with_hooks(tokens.flip(0), fwd_hooks=[("blocks.0.attn.hook_z", hook_cache_z)],
                             **kw)

        def hook_patch_z(z, hook):
            z[:, :, 1] = clean[hook.name][:, :, 1]
        return model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", hook_patch_z)],
                                    **kw)
    return Spec(state={"clean": clean}, run=run, names=["hook_cache_z", "hook_patch_z"])


# ---- 12. run_with_cache + hooks --------------------------------------------------------------

@case
def c_cache_with_hooks_context(m):
    def hook_ctx_ablate(x, hook):
        x[:, 1] = 0

    def run(model, tokens, kw):
        with model.hooks(fwd_hooks=[(R1, hook_ctx_ablate)]):
            logits, cache = model.run_with_cache(tokens, **kw)
        return logits, {k: cache[k] for k in (R1, P1, "blocks.1.attn.hook_pattern")}
    return Spec(run=run, names=["hook_ctx_ablate"])


@case
def c_cache_with_hooks_context_aliasing(m):
    """The cache hook keeps x.detach() (an alias); a later hook edits the next site in place
    (resid_post(0) is the same tensor as resid_pre(1) locally)."""
    def hook_edit_pre1(x, hook):
        x.mul_(0)

    def run(model, tokens, kw):
        with model.hooks(fwd_hooks=[(R1, hook_edit_pre1)]):
            logits, cache = model.run_with_cache(tokens, **kw)
        return logits, {k: cache[k] for k in (P0, R1, P1)}
    return Spec(run=run, names=["hook_edit_pre1"])


@case
def c_cache_names_filter_lambda_with_hooks(m):
    def hook_scale_mlp(x, hook):
        return x * 0.0

    def run(model, tokens, kw):
        with model.hooks(fwd_hooks=[(lambda n: n.endswith("mlp.hook_post"), hook_scale_mlp)]):
            logits, cache = model.run_with_cache(
                tokens, names_filter=lambda n: "mlp" in n or n.endswith("resid_post"), **kw)
        return logits, dict(cache.items())
    return Spec(run=run, names=["hook_scale_mlp"])


@case
def c_cache_then_hooks_using_cache(m):
    """The common patching loop: cache a run, then patch positions from that cache."""
    def run(model, tokens, kw):
        _, cache = model.run_with_cache(tokens.flip(0), **kw)
        outs = []
        for pos in (1, 5):
            def hook_patch_resid(x, hook, pos=pos):
                x[:, pos] = cache[hook.name][:, pos]
            outs.append(model.run_with_hooks(tokens, fwd_hooks=[(R1, hook_patch_resid)], **kw))
        return outs
    return Spec(run=run, names=["hook_patch_resid"])


@case
def c_add_hook_then_run_with_cache(m):
    def hook_perm_add(x, hook):
        x[:, :, 0] = 1.0

    def run(model, tokens, kw):
        model.add_hook(R1, hook_perm_add)
        try:
            logits, cache = model.run_with_cache(tokens, names_filter=[R1, P1], **kw)
        finally:
            model.reset_hooks()
        return logits, dict(cache.items())
    return Spec(run=run, names=["hook_perm_add"])


@case
def c_run_with_cache_edit_in_cache_hook_site_after(m):
    """A user hook registered *after* the cache hook (add_hook inside) edits in place: the
    cached alias sees it locally."""
    def hook_after_cache(x, hook):
        x[:, 2] = 3.0

    def run(model, tokens, kw):
        out = {}
        logits, cache = model.run_with_cache(tokens, names_filter=[R1], **kw)
        out["plain"] = cache[R1]
        with model.hooks(fwd_hooks=[(R1, hook_after_cache)]):
            logits2, cache2 = model.run_with_cache(tokens, names_filter=[R1, P0], **kw)
        out["edited"] = cache2[R1]
        out["p0"] = cache2[P0]
        return logits, logits2, out
    return Spec(run=run, names=["hook_after_cache"])


# ---- 13. weights inside hooks ---------------------------------------------------------------

@case
def c_weight_unembed_projection(m):
    st = {}

    def hook_logit_lens(x, hook):
        st[hook.name] = x @ m.W_U
    return Spec([(lambda n: n.endswith("hook_resid_post"), hook_logit_lens)], {"st": st})


@case
def c_weight_steer_with_embed_row(m):
    def hook_steer_embed(x, hook):
        return x + 0.5 * m.W_E[65]
    return hooks_on(R1, hook_steer_embed)


# ---- the test -------------------------------------------------------------------------------

@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture(params=["stand_in", "bridge_true"])
def front(request):
    return request.param


def _record(**row):
    if not OUT:
        return
    with open(OUT, "a") as f:
        f.write(json.dumps(row) + "\n")


def _run(spec, model, tokens, kw):
    if spec.run is not None:
        return spec.run(model, tokens, kw)
    return model.run_with_hooks(tokens, fwd_hooks=spec.hooks, **kw)


def _compare(a, b, path="out"):
    """Yields (path, problem) for every difference; tensors compared tightly."""
    if isinstance(b, torch.Tensor):
        if not isinstance(a, torch.Tensor):
            yield path, f"type {type(a).__name__} vs tensor"
            return
        if type(a) is not torch.Tensor and type(b) is torch.Tensor:
            yield path, f"remote value is a {type(a).__name__}, not a tensor (never rebound)"
            return
        if a.shape != b.shape or a.dtype != b.dtype:
            yield path, f"shape/dtype {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
            return
        try:
            torch.testing.assert_close(a, b, equal_nan=True)
        except AssertionError:
            fa, fb = a.double(), b.double()
            diff = (fa - fb).abs().nan_to_num(nan=float("inf"))
            yield path, f"max abs diff {diff.max().item():.4g} (ref max {fb.abs().max().item():.3g})"
        return
    if isinstance(b, np.ndarray):
        if not isinstance(a, np.ndarray) or not np.allclose(a, b):
            yield path, "ndarray differs"
        return
    if isinstance(b, dict):
        if list(a.keys()) != list(b.keys()):
            yield path, f"keys {list(a.keys())} vs {list(b.keys())}"
            return
        for k in b:
            yield from _compare(a[k], b[k], f"{path}[{k!r}]")
        return
    if isinstance(b, (list, tuple)):
        if len(a) != len(b):
            yield path, f"len {len(a)} vs {len(b)}"
            return
        for i, (x, y) in enumerate(zip(a, b)):
            yield from _compare(x, y, f"{path}[{i}]")
        return
    if hasattr(b, "_asdict"):
        yield from _compare(tuple(a), tuple(b), path)
        return
    if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isclose(a, b)):
        yield path, f"{a!r} vs {b!r}"


def _hook_names(spec):
    if spec.names:
        return spec.names
    out = []
    for _, fn in spec.hooks:
        f = fn.func if isinstance(fn, functools.partial) else fn
        out.append(getattr(f, "__name__", None) or type(f).__name__)
    return out


@pytest.mark.parametrize("case_id", list(CASES))
def test_remote_equals_local_or_raises(case_id, name, front, local_models, remote_models,
                                       tokens):
    local_model = local_models[name]
    if front == "stand_in":
        remote_model, kw = remote_models[name], {}
    else:
        remote_model, kw = local_model, {"remote": True, "remote_model": name}
    row = dict(case=case_id, model=name, front=front)

    if case_id == "edit_base_then_read_split":
        torch.set_grad_enabled(False)  # locally, split views edited via their base refuse reads
    spec_l = CASES[case_id](local_model)
    torch.manual_seed(1234)
    try:
        out_l = _run(spec_l, local_model, tokens, {})
        local_exc = None
    except Exception as exc:  # noqa: BLE001
        local_exc = exc
    finally:
        local_model.reset_hooks(including_permanent=True)
        torch.set_grad_enabled(True)

    spec_r = CASES[case_id](remote_model)
    torch.manual_seed(1234)
    try:
        out_r = _run(spec_r, remote_model, tokens, kw)
        remote_exc = None
    except Exception as exc:  # noqa: BLE001
        remote_exc = exc
    finally:
        remote_model.reset_hooks(including_permanent=True)

    if remote_exc is not None:
        msg = str(remote_exc)
        names = _hook_names(spec_r)
        row.update(remote_error=type(remote_exc).__name__, message=msg[:600],
                   names_hook=any(n in msg for n in names),
                   says_what_to_do=bool(ADVICE.search(msg)),
                   hookwire_error=isinstance(remote_exc, HookwireError))
        if local_exc is not None:
            row.update(outcome="both_raise", local_error=f"{type(local_exc).__name__}: "
                       f"{str(local_exc)[:200]}")
        else:
            row.update(outcome="raise")
        _record(**row)
        assert local_exc is not None or isinstance(remote_exc, HookwireError), \
            f"the remote run raised {remote_exc!r} where local TL did not: not a hookwire error"
        return
    if local_exc is not None:
        row.update(outcome="LOCAL_RAISES_REMOTE_RETURNS",
                   local_error=f"{type(local_exc).__name__}: {str(local_exc)[:300]}")
        _record(**row)
        pytest.fail(f"local raised {local_exc!r} but the remote run returned a value")
    with torch.no_grad():  # (local views of split pieces refuse reads under autograd)
        problems = list(_compare((out_r, spec_r.state), (out_l, spec_l.state)))
    if problems:
        row.update(outcome="MISMATCH", problems=[f"{p}: {d}" for p, d in problems[:8]])
        _record(**row)
        pytest.fail("silent mismatch: " + "; ".join(f"{p}: {d}" for p, d in problems[:8]))
    row.update(outcome="equal")
    _record(**row)
