"""Differential test: everyday HF torch-hook spellings, remote (hookwire.hf) vs local.

Every case builds the same hooks twice (fresh closures and stores) and runs them
* locally: registered with plain ``register_forward_hook`` / ``register_forward_pre_hook`` on
  a plain HF model whose tensors are the served model's own, one ``model(input_ids)``;
* remotely: ``hhf.RemoteModel(name).run_with_hooks(ids, hooks)``.
The promise: logits and everything the hooks stored are equal (assert_close, 1e-5), or the
remote call raises a HookwireError before sending. Anything else is a failure:
"SILENT MISMATCH" (remote result differs from local) or "NON-HOOKWIRE RAISE". Written as a
hunt (seventeenth session; its findings since fixed or refused), kept as a regression net.
Outcomes are also appended to $HOOKWIRE_DIFF_OUT (JSON lines), for counting.
"""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import hookwire.hf as hhf
from hookwire.errors import HookwireError
from hookwire.server.hf_modules import plain_hf_model
from test_hf_remote import torch_hooks_run

PROMPT = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
VEC = torch.randn(64, generator=torch.Generator().manual_seed(9))
FAMILIES = ("tiny-gpt2", "tiny-llama")
LOG = os.environ.get("HOOKWIRE_DIFF_OUT")

P = {
    "tiny-gpt2": dict(
        emb="transformer.wte", pos="transformer.wpe", drop="transformer.drop",
        block0="transformer.h.0", block1="transformer.h.1", ln1="transformer.h.0.ln_1",
        ln1_1="transformer.h.1.ln_1",
        attn="transformer.h.0.attn", attn1="transformer.h.1.attn",
        qkv="transformer.h.0.attn.c_attn", o="transformer.h.0.attn.c_proj",
        ln2="transformer.h.0.ln_2", mlp="transformer.h.1.mlp", mlp0="transformer.h.0.mlp",
        up="transformer.h.1.mlp.c_fc", act="transformer.h.1.mlp.act",
        down="transformer.h.1.mlp.c_proj", ln_f="transformer.ln_f", lm_head="lm_head",
        blocks=["transformer.h.0", "transformer.h.1"]),
    "tiny-llama": dict(
        emb="model.embed_tokens", pos=None, drop=None,
        block0="model.layers.0", block1="model.layers.1",
        ln1="model.layers.0.input_layernorm", ln1_1="model.layers.1.input_layernorm",
        attn="model.layers.0.self_attn", attn1="model.layers.1.self_attn",
        qkv="model.layers.0.self_attn.q_proj", o="model.layers.0.self_attn.o_proj",
        ln2="model.layers.0.post_attention_layernorm", mlp="model.layers.1.mlp",
        mlp0="model.layers.0.mlp", up="model.layers.1.mlp.up_proj",
        act="model.layers.1.mlp.act_fn", down="model.layers.1.mlp.down_proj",
        ln_f="model.norm", lm_head="lm_head",
        blocks=["model.layers.0", "model.layers.1"]),
}


@pytest.fixture(scope="module")
def plain(hosted, server):
    return {name: plain_hf_model(h.bridge) for name, h in hosted.items()}


@pytest.fixture(scope="module")
def remote(server):
    return {name: hhf.RemoteModel(name) for name in FAMILIES}


# ---- the harness -----------------------------------------------------------------------

def max_diff(a, b):
    try:
        return float((a.double() - b.double()).abs().max())
    except Exception:
        return float("nan")


def compare(got, exp, where, diffs):
    """Append (where, description) for every difference between two stores."""
    if isinstance(exp, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            diffs.append((where, f"type {type(got).__name__} vs Tensor"))
        elif got.shape != exp.shape or got.dtype != exp.dtype:
            diffs.append((where, f"shape/dtype {tuple(got.shape)} {got.dtype} vs "
                                 f"{tuple(exp.shape)} {exp.dtype}"))
        elif got.device.type != exp.device.type:
            diffs.append((where, f"device {got.device} vs {exp.device}"))
        else:
            try:
                assert_close(got, exp, rtol=1e-5, atol=1e-5)
            except AssertionError:
                diffs.append((where, f"max diff {max_diff(got, exp):.3g}"))
    elif isinstance(exp, dict):
        if not isinstance(got, dict) or set(got) != set(exp):
            diffs.append((where, f"keys {sorted(map(str, got)) if isinstance(got, dict) else got!r}"
                                 f" vs {sorted(map(str, exp))}"))
            return
        for k in exp:
            compare(got[k], exp[k], f"{where}[{k!r}]", diffs)
    elif isinstance(exp, (list, tuple)):
        if type(got) is not type(exp) or len(got) != len(exp):
            diffs.append((where, f"{type(got).__name__} of {len(got) if hasattr(got, '__len__') else '?'}"
                                 f" vs {type(exp).__name__} of {len(exp)}"))
            return
        for k, (g, e) in enumerate(zip(got, exp)):
            compare(g, e, f"{where}[{k}]", diffs)
    elif exp is None or isinstance(exp, (int, float, str, bool, torch.Size, torch.dtype)):
        if got != exp:
            diffs.append((where, f"{got!r} vs {exp!r}"))
    else:  # a server-side object (a cache): a placeholder remotely
        if not isinstance(got, hhf.ServerObject) and type(got) is not type(exp):
            diffs.append((where, f"{type(got).__name__} vs {type(exp).__name__}"))


def record(case, name, outcome, detail=""):
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"case": case, "model": name, "outcome": outcome,
                                "detail": detail[:400]}) + "\n")


def differential(case, name, build, plain, remote, ids=PROMPT, hook_names=()):
    """build(paths, store) -> hooks dict. Remote must equal local, or raise HookwireError."""
    paths = P[name]
    local_store: dict = {}
    try:
        hooks = build(paths, local_store)
    except KeyError:
        pytest.skip("no such module in this family")
    torch.manual_seed(0)
    try:
        expected = torch_hooks_run(plain[name], hooks, ids)
        local_error = None
    except Exception as e:  # noqa: BLE001
        local_error = e
    remote_store: dict = {}
    torch.manual_seed(0)
    try:
        got = remote[name].run_with_hooks(ids, build(paths, remote_store)).logits
    except HookwireError as e:
        msg = str(e)
        names = [k for k in hooks] + list(hook_names)
        named = any(k.split(":")[0] in msg for k in names) or ".py" in msg or any(
            getattr(f, "__name__", "~~") in msg for v in hooks.values()
            for f in (v if isinstance(v, list) else [v]))
        record(case, name, "raised", f"{type(e).__name__}: {msg}" + ("" if named else
                                                                      " [HOOK NOT NAMED]"))
        return
    except Exception as e:  # noqa: BLE001
        if local_error is not None and type(local_error) is type(e):
            record(case, name, "equal", f"both raise {type(e).__name__}")  # the user's bug
            return
        record(case, name, "non_hookwire_raise", f"{type(e).__name__}: {e}")
        pytest.fail(f"NON-HOOKWIRE RAISE {type(e).__name__}: {e}")
    if local_error is not None:
        record(case, name, "MISMATCH", f"local raised {local_error!r}, remote returned")
        pytest.fail(f"SILENT MISMATCH: local raised {local_error!r}, remote returned a result")
    diffs = []
    compare(got, expected, "logits", diffs)
    compare(remote_store, local_store, "store", diffs)
    if diffs:
        record(case, name, "MISMATCH", "; ".join(f"{w}: {d}" for w, d in diffs))
        pytest.fail("SILENT MISMATCH: " + "; ".join(f"{w}: {d}" for w, d in diffs))
    record(case, name, "equal")


# ---- the cases: (id, build(paths, store) -> hooks) ---------------------------------------

def _h(path_key, fn, kind=""):
    def build(p, s):
        if p[path_key] is None:
            raise KeyError(path_key)
        return {p[path_key] + kind: functools.partial(fn, s)}
    return build


def _c(spec):
    """Closures instead of functools.partial: [(path key, kind, fn(s, m, a[, o]))]."""
    def build(p, s):
        out = {}
        for key, kind, fn in spec:
            def hook(*args, fn=fn):
                return fn(s, *args)
            out.setdefault(p[key] + kind, []).append(hook)
        return out
    return build


def ret_scaled(s, m, a, o):
    return o * 0.5


def inplace_mul(s, m, a, o):
    o.mul_(0.5)


def inplace_setitem(s, m, a, o):
    o[:, -1] = 0.0


def inplace_and_return(s, m, a, o):
    o.add_(1.0)
    return o


def none_store(s, m, a, o):
    s["out"] = o


def augassign(s, m, a, o):
    o += VEC


def view_inplace(s, m, a, o):
    o.view(o.shape[0], o.shape[1], 4, -1)[:, :, 0] = 0.0


def detach_inplace(s, m, a, o):
    o.detach().zero_()


def data_inplace(s, m, a, o):
    o.data.mul_(0.0)


def relu_inplace(s, m, a, o):
    F.relu(o, inplace=True)


def clamp_inplace(s, m, a, o):
    o.clamp_(-0.05, 0.05)


def masked_fill_inplace(s, m, a, o):
    o.masked_fill_(o > 0, 0.0)


def bool_index_assign(s, m, a, o):
    o[o > 0] = 0.0


def copy_inplace(s, m, a, o):
    o.copy_(torch.ones_like(o))


def row_copy(s, m, a, o):
    o[0] = o[1]


def narrow_inplace(s, m, a, o):
    o.narrow(1, 0, 2).zero_()


def slice_imul(s, m, a, o):
    o[..., :8] *= 2.0


def transpose_view_inplace(s, m, a, o):
    o.transpose(1, 2)[:, 0] = 0.0


def reshape_view_inplace(s, m, a, o):
    o.reshape(-1, o.shape[-1])[0] = 0.0


def chunk_inplace(s, m, a, o):
    o.chunk(2, dim=-1)[0].zero_()


def unbind_inplace(s, m, a, o):
    o.unbind(0)[0].zero_()


def select_inplace(s, m, a, o):
    o.select(1, 3).fill_(1.0)


def index_tensor_assign(s, m, a, o):
    o[:, torch.tensor([1, 3])] = 0.0


def index_fill_inplace(s, m, a, o):
    o.index_fill_(1, torch.tensor([0, 2]), 0.5)


def return_zeros(s, m, a, o):
    return torch.zeros_like(o)


def return_clone_edit(s, m, a, o):
    x = o.clone()
    x[:, 2:] += VEC
    return x


def return_float64(s, m, a, o):
    return o.double()


def return_wrong_shape(s, m, a, o):
    return o[:, :3]


def return_steer(s, m, a, o, scale=1.0):
    return o + scale * VEC


def mean_ablate(s, m, a, o):
    return o.mean(dim=1, keepdim=True).expand_as(o)


def where_ablate(s, m, a, o):
    return torch.where(o > 0, o, torch.zeros_like(o))


def normalize_project(s, m, a, o):
    d = F.normalize(VEC, dim=0)
    return o - (o @ d)[..., None] * d


def position_mask(s, m, a, o):
    keep = (torch.arange(o.shape[1]) < 3)[None, :, None]
    return o * keep


def randn_noise(s, m, a, o):
    return o + 0.1 * torch.randn_like(o)


def store_shape_device(s, m, a, o):
    s["shape"] = tuple(o.shape)
    s["dtype"] = o.dtype
    s["device"] = str(o.device)
    s["requires_grad"] = o.requires_grad


def store_no_clone_then_edit(s, m, a, o):
    s["raw"] = o
    s["det"] = o.detach()
    s["cl"] = o.clone()
    s["row"] = o[0]
    o.mul_(2.0)


def store_list_append(s, m, a, o):
    s.setdefault("acts", []).append(o.detach().clone())


def store_args(s, m, a, o):
    s["args"] = a
    s["out"] = o


def module_weight_use(s, m, a, o):
    s["wshape"] = tuple(m.weight.shape)
    return o


def module_weight_matmul(s, m, a):  # a pre-hook on lm_head: a logit lens by hand
    s["lens"] = a[0] @ m.weight.T


def module_weight_scale(s, m, a, o):  # a hook that reads the module's own weight
    return o * m.weight


def module_attr(s, m, a, o):
    s["training"] = m.training
    s["cls"] = type(m).__name__


# pre-hooks
def pre_return_tuple(s, m, a):
    return (a[0] * 2.0,) + a[1:]


def pre_return_tensor(s, m, a):
    return a[0] * 2.0


def pre_inplace(s, m, a):
    a[0].mul_(2.0)


def pre_inplace_slice(s, m, a):
    a[0][:, -1] = 0.0


def pre_store(s, m, a):
    s["args"] = a


def pre_store_then_edit(s, m, a):
    s["raw"] = a[0]
    a[0].add_(1.0)


# forward hooks that edit their *args* in place (the module's input, after it ran)
def post_args_inplace(s, m, a, o):
    a[0].mul_(0.0)


def post_args_setitem(s, m, a, o):
    a[0][:, -1] = 5.0


# tuple outputs (attention)
def tup_return_new(s, m, a, o):
    return (o[0] * 2.0,) + tuple(o[1:])


def tup_inplace0(s, m, a, o):
    o[0].mul_(2.0)


def tup_inplace0_setitem(s, m, a, o):
    o[0][:, :, :4] = 0.0


def tup_return_list(s, m, a, o):
    return [o[0] + VEC, *o[1:]]


def tup_return_same(s, m, a, o):
    o[0].add_(VEC)
    return o


def tup_return_tensor(s, m, a, o):
    return o[0] * 2.0


def tup_store(s, m, a, o):
    s["attn"] = o
    s["len"] = len(o)


def tup_unpack(s, m, a, o):
    h, *rest = o
    return (h + VEC, *rest)


def block_either(s, m, a, o):
    h = o[0] if isinstance(o, tuple) else o
    h[:, :, :2] = 0.0


def block_return_either(s, m, a, o):
    if isinstance(o, tuple):
        return (o[0] + VEC,) + o[1:]
    return o + VEC


class Steer:
    def __init__(self, s, scale):
        self.s, self.scale = s, scale
        self.calls = 0

    def __call__(self, m, a, o):
        self.calls += 1
        self.s["calls"] = self.calls
        return o + self.scale * VEC


CASES = {
    # forward hooks on the MLP: return / in place / None
    "mlp_return_scaled": _h("mlp", ret_scaled),
    "mlp_inplace_mul": _h("mlp", inplace_mul),
    "mlp_inplace_setitem": _h("mlp", inplace_setitem),
    "mlp_inplace_and_return": _h("mlp", inplace_and_return),
    "mlp_none_store": _h("mlp", none_store),
    "mlp_augassign": _h("mlp", augassign),
    "mlp_view_inplace": _h("mlp", view_inplace),
    "mlp_detach_inplace": _h("mlp", detach_inplace),
    "mlp_data_inplace": _h("mlp", data_inplace),
    "mlp_relu_inplace": _h("mlp", relu_inplace),
    "mlp_clamp_inplace": _h("mlp", clamp_inplace),
    "mlp_masked_fill_inplace": _h("mlp", masked_fill_inplace),
    "mlp_bool_index_assign": _h("mlp", bool_index_assign),
    "mlp_copy_inplace": _h("mlp", copy_inplace),
    "mlp_row_copy": _h("mlp", row_copy),
    "mlp_narrow_inplace": _h("mlp", narrow_inplace),
    "mlp_slice_imul": _h("mlp", slice_imul),
    "mlp_transpose_view_inplace": _h("mlp", transpose_view_inplace),
    "mlp_reshape_view_inplace": _h("mlp", reshape_view_inplace),
    "mlp_chunk_inplace": _h("mlp", chunk_inplace),
    "mlp_unbind_inplace": _h("mlp", unbind_inplace),
    "mlp_select_inplace": _h("mlp", select_inplace),
    "mlp_index_tensor_assign": _h("mlp", index_tensor_assign),
    "mlp_index_fill_inplace": _h("mlp", index_fill_inplace),
    "mlp_return_zeros": _h("mlp", return_zeros),
    "mlp_return_clone_edit": _h("mlp", return_clone_edit),
    "mlp_return_float64": _h("mlp", return_float64),
    "mlp_return_wrong_shape": _h("mlp", return_wrong_shape),
    "mlp_mean_ablate": _h("mlp", mean_ablate),
    "mlp_where": _h("mlp", where_ablate),
    "mlp_project_out": _h("mlp", normalize_project),
    "mlp_position_mask": _h("mlp", position_mask),
    "mlp_randn_noise": _h("mlp", randn_noise),
    "mlp_store_meta": _h("mlp", store_shape_device),
    "mlp_store_no_clone_then_edit": _h("mlp", store_no_clone_then_edit),
    "mlp_store_args": _h("mlp", store_args),
    "mlp_module_attr": _h("mlp", module_attr),
    # other modules
    "ln_f_return_scaled": _h("ln_f", ret_scaled),
    "ln_f_inplace": _h("ln_f", inplace_setitem),
    "ln_f_module_weight_scale": _h("ln_f", module_weight_scale),
    "emb_return_steer": _h("emb", return_steer),
    "emb_inplace": _h("emb", inplace_mul),
    "emb_store_no_clone_then_edit": _h("emb", store_no_clone_then_edit),
    "pos_inplace": _h("pos", inplace_setitem),
    "drop_inplace": _h("drop", inplace_mul),
    "lm_head_return": _h("lm_head", ret_scaled),
    "lm_head_inplace": _h("lm_head", inplace_setitem),
    "lm_head_store_args": _h("lm_head", store_args),
    "lm_head_weight_shape": _h("lm_head", module_weight_use),
    "lm_head_pre_weight_matmul": _h("lm_head", module_weight_matmul, ":input"),
    "leaf_qkv_return": _h("qkv", ret_scaled),
    "leaf_qkv_inplace": _h("qkv", inplace_setitem),
    "leaf_o_inplace": _h("o", view_inplace),
    "leaf_down_return_steer": _h("down", return_steer),
    "leaf_up_inplace": _h("up", slice_imul),
    "act_inplace": _h("act", clamp_inplace),
    "act_return": _h("act", ret_scaled),
    "ln1_return": _h("ln1", ret_scaled),
    "ln2_inplace": _h("ln2", inplace_mul),
    "block_inplace_either": _h("block0", block_either),
    "block_return_either": _h("block0", block_return_either),
    "block_store_args": _h("block0", store_args),
    "block_store_no_clone_then_edit": _h("block0", store_no_clone_then_edit),
    # tuple outputs: attention
    "attn_return_new_tuple": _h("attn", tup_return_new),
    "attn_inplace0": _h("attn", tup_inplace0),
    "attn_inplace0_setitem": _h("attn", tup_inplace0_setitem),
    "attn_return_list": _h("attn", tup_return_list),
    "attn_return_same_tuple": _h("attn", tup_return_same),
    "attn_return_tensor": _h("attn", tup_return_tensor),
    "attn_store": _h("attn", tup_store),
    "attn_unpack_star": _h("attn", tup_unpack),
    # pre-hooks
    "pre_mlp_return_tuple": _h("mlp", pre_return_tuple, ":input"),
    "pre_mlp_return_tensor": _h("mlp", pre_return_tensor, ":input"),
    "pre_mlp_inplace": _h("mlp", pre_inplace, ":input"),
    "pre_down_inplace_slice": _h("down", pre_inplace_slice, ":input"),
    "pre_block_return_tuple": _h("block1", pre_return_tuple, ":input"),
    "pre_block_inplace": _h("block1", pre_inplace, ":input"),
    "pre_block_store": _h("block1", pre_store, ":input"),
    "pre_lm_head_inplace": _h("lm_head", pre_inplace_slice, ":input"),
    "pre_ln1_inplace_aliases_residual": _h("ln1", pre_inplace, ":input"),
    "pre_ln1_return_tuple": _h("ln1", pre_return_tuple, ":input"),
    "pre_ln_f_store_then_edit": _h("ln_f", pre_store_then_edit, ":input"),
    "pre_attn_store": _h("attn", pre_store, ":input"),
    # forward hooks that edit the module's args after it ran
    "post_ln1_args_inplace": _h("ln1", post_args_inplace),
    "post_ln1_args_setitem": _h("ln1", post_args_setitem),
    "post_mlp_args_inplace": _h("mlp", post_args_inplace),
    "post_block_args_inplace": _h("block1", post_args_setitem),
    # several hooks, closures, partials, callables
    "same_hook_all_blocks": lambda p, s: {b: functools.partial(return_steer, s, scale=0.5)
                                          for b in p["blocks"]},
    "callable_instance_all_blocks": lambda p, s: (lambda st: {b: st for b in p["blocks"]})(
        Steer(s, 0.3)),
    "two_hooks_same_module": lambda p, s: {p["mlp"]: [functools.partial(ret_scaled, s),
                                                     functools.partial(inplace_setitem, s)]},
    "store_then_later_hook_edits": lambda p, s: {p["mlp"]: [functools.partial(none_store, s),
                                                           functools.partial(inplace_mul, s)]},
    "lambda_hook": lambda p, s: {p["mlp"]: lambda m, a, o: o * 0.0},
    "store_list_every_block": lambda p, s: {b: functools.partial(store_list_append, s)
                                            for b in p["blocks"]},
    "ln_f_store_raw_then_lm_head_pre_inplace": lambda p, s: {
        p["ln_f"]: functools.partial(none_store, s),
        p["lm_head"] + ":input": functools.partial(pre_inplace_slice, s)},
    "block0_store_raw_then_block1_pre_inplace": lambda p, s: {
        p["block0"]: functools.partial(none_store, s),
        p["block1"] + ":input": functools.partial(pre_inplace, s)},
    "pre_ln1_1_inplace_aliases_block0_out": lambda p, s: {
        p["block0"]: functools.partial(none_store, s),
        p["ln1_1"] + ":input": functools.partial(pre_inplace, s)},
    "mlp0_and_attn1_and_ln_f": lambda p, s: {
        p["mlp0"]: functools.partial(return_steer, s),
        p["attn1"]: functools.partial(tup_inplace0, s),
        p["ln_f"]: functools.partial(none_store, s)},
    "key_output_suffix": _h("mlp", ret_scaled, ":output"),
}


def store_cpu(s, m, a, o):
    s["cpu"] = o.detach().cpu()
    s["float"] = o.float()
    s["to"] = o.to("cpu")


def store_numpy(s, m, a, o):
    s["np"] = o.detach().cpu().numpy()


def store_tolist(s, m, a, o):
    s["list"] = o[0, 0, :3].tolist()


def rebind_no_return(s, m, a, o):
    o = o * 2.0  # noqa: F841  (a classic bug: no effect locally either)


def rotary_inplace(s, m, a, o):
    o[1].mul_(0.5)


def rotary_return(s, m, a, o):
    cos, sin = o
    return (cos, sin * 0.5)


def store_raw(s, m, a, o):
    s.setdefault("raw", []).append(o)


def store_raw_detach(s, m, a, o):
    s.setdefault("det", []).append(o.detach())


def pre_store_raw(s, m, a):
    s.setdefault("pre_raw", []).append(a[0])


EXTRA = {
    "mlp_store_cpu": _h("mlp", store_cpu),
    "mlp_store_numpy": _h("mlp", store_numpy),
    "mlp_store_tolist": _h("mlp", store_tolist),
    "mlp_rebind_no_return": _h("mlp", rebind_no_return),
    "rotary_inplace_sin": lambda p, s: {"model.rotary_emb": functools.partial(rotary_inplace, s)}
    if "model.layers.0" in p["blocks"] else (_ for _ in ()).throw(KeyError("rotary")),
    "rotary_return_at0": lambda p, s: {"model.rotary_emb@0": functools.partial(rotary_return, s)}
    if "model.layers.0" in p["blocks"] else (_ for _ in ()).throw(KeyError("rotary")),
    "post_ln2_args_inplace": _h("ln2", post_args_setitem),
    "post_attn_args_inplace": _h("attn", post_args_setitem),
    "post_block0_args_inplace": _h("block0", post_args_setitem),
    "post_lm_head_args_inplace": _h("lm_head", post_args_setitem),
    # the aliasing cases again, with closures (not functools.partial)
    "closure_store_then_later_hook_edits": _c([("mlp", "", none_store), ("mlp", "", inplace_mul)]),
    "closure_store_detach_then_later_hook_edits": _c([("mlp", "", store_raw_detach),
                                                      ("mlp", "", inplace_mul)]),
    "closure_store_list_every_block": _c([("block0", "", store_list_append),
                                          ("block1", "", store_list_append)]),
    "closure_ln_f_raw_then_lm_head_pre_inplace": _c([("ln_f", "", store_raw),
                                                     ("lm_head", ":input", pre_inplace_slice)]),
    "closure_block0_raw_then_block1_pre_inplace": _c([("block0", "", store_raw),
                                                      ("block1", ":input", pre_inplace)]),
    "closure_block0_raw_then_ln1_1_pre_inplace": _c([("block0", "", store_raw),
                                                     ("ln1_1", ":input", pre_inplace)]),
    "closure_block0_raw_then_block1_post_args_inplace": _c([
        ("block0", "", store_raw), ("block1", "", post_args_setitem)]),
    "closure_down_raw_then_mlp_inplace": _c([("down", "", store_raw), ("mlp", "", inplace_mul)]),
    "closure_down_detach_then_mlp_inplace": _c([("down", "", store_raw_detach),
                                                ("mlp", "", inplace_setitem)]),
    "closure_mlp_raw_then_block_inplace": _c([("mlp", "", store_raw),
                                              ("block1", "", block_either)]),
    "closure_pre_ln_f_raw_then_ln_f_post_args_edit": _c([("ln_f", ":input", pre_store_raw),
                                                         ("ln_f", "", post_args_setitem)]),
    "closure_block1_raw_then_ln_f_pre_inplace": _c([("block1", "", store_raw),
                                                    ("ln_f", ":input", pre_inplace)]),
    "closure_attn_raw_then_o_proj_edit": _c([("o", "", store_raw), ("attn", "", tup_inplace0)]),
}
CASES.update(EXTRA)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_spelling(case, name, plain, remote):
    differential(case, name, CASES[case], plain, remote)


# ---- other inputs -------------------------------------------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 4)])
def test_other_shapes(shape, name, plain, remote):
    ids = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
    differential(f"shape_{shape}", name, CASES["mlp0_and_attn1_and_ln_f"], plain, remote, ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_int32_ids(name, plain, remote):
    differential("int32_ids", name, CASES["mlp_inplace_setitem"], plain, remote,
                 PROMPT.to(torch.int32))


# ---- torch-API spellings the hooks dict cannot express -------------------------------------

@pytest.mark.parametrize("name", FAMILIES)
def test_hook_registered_on_stand_in_module(name, plain, remote):
    """A researcher registers a torch hook on the stand-in's module (get_submodule is part of
    the 'torch-like surface') and then runs: locally it bites; remotely?"""
    path = P[name]["mlp"]
    handle = remote[name].get_submodule(path).register_forward_hook(
        lambda m, a, o: o * 0.0)
    try:
        try:
            got = remote[name].run_with_hooks(PROMPT).logits
        except HookwireError as e:
            record("register_on_stand_in", name, "raised", str(e))
            return
    finally:
        handle.remove()
    expected = torch_hooks_run(plain[name], {path: lambda m, a, o: o * 0.0}, PROMPT)
    diffs = []
    compare(got, expected, "logits", diffs)
    if diffs:
        record("register_on_stand_in", name, "MISMATCH", str(diffs))
        pytest.fail(f"SILENT MISMATCH: {diffs}")
    record("register_on_stand_in", name, "equal")


@pytest.mark.parametrize("name", FAMILIES)
def test_pre_hook_with_kwargs_signature(name, plain, remote):
    """A with_kwargs=True pre-hook, fn(module, args, kwargs) -> (args, kwargs)."""
    path = P[name]["block1"]

    def pre(m, args, kwargs):
        return (args[0] * 2.0,) + args[1:], kwargs
    h = plain[name].get_submodule(path).register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad():
            expected = plain[name](input_ids=PROMPT, use_cache=False).logits
    finally:
        h.remove()
    try:
        got = remote[name].run_with_hooks(PROMPT, {f"{path}:input": pre}).logits
    except HookwireError as e:
        record("pre_with_kwargs", name, "raised", str(e))
        return
    except Exception as e:  # noqa: BLE001
        record("pre_with_kwargs", name, "non_hookwire_raise", f"{type(e).__name__}: {e}")
        pytest.fail(f"NON-HOOKWIRE RAISE {type(e).__name__}: {e}")
    diffs = []
    compare(got, expected, "logits", diffs)
    if diffs:
        record("pre_with_kwargs", name, "MISMATCH", str(diffs))
        pytest.fail(f"SILENT MISMATCH: {diffs}")
    record("pre_with_kwargs", name, "equal")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kw", ["attention_mask", "output_hidden_states",
                                "output_attentions"])
def test_model_call_kwargs(kw, name, plain, remote):
    """model(ids, attention_mask=..., output_hidden_states=True, ...) spellings."""
    mask = torch.ones_like(PROMPT)
    mask[0, :2] = 0  # a left-padded row
    value = mask if kw == "attention_mask" else True
    try:
        got = remote[name].run_with_hooks(PROMPT, {}, **{kw: value})
    except HookwireError as e:
        record(f"call_{kw}", name, "raised", str(e))
        return
    except TypeError as e:
        # A keyword run_with_hooks does not take: Python's own error, naming it (as
        # LocalModel raises); never dropped silently.
        assert kw != "attention_mask" and kw in str(e), e
        record(f"call_{kw}", name, "raised", str(e))
        return
    except Exception as e:  # noqa: BLE001
        record(f"call_{kw}", name, "non_hookwire_raise", f"{type(e).__name__}: {e}")
        pytest.fail(f"NON-HOOKWIRE RAISE {type(e).__name__}: {e}")
    with torch.no_grad():
        expected = plain[name](input_ids=PROMPT, use_cache=False, **{kw: value})
    assert kw == "attention_mask"  # the only one run_with_hooks takes
    diffs = []
    compare(got.logits, expected.logits, "logits", diffs)
    for field in ("hidden_states", "attentions"):
        if getattr(expected, field, None) is not None:
            compare(getattr(got, field, None), getattr(expected, field), field, diffs)
    if diffs:
        record(f"call_{kw}", name, "MISMATCH", str(diffs))
        pytest.fail(f"SILENT MISMATCH: {diffs}")
    record(f"call_{kw}", name, "equal")


@pytest.mark.parametrize("name", FAMILIES)
def test_local_model_ignores_kwargs(name, plain):
    """hhf.LocalModel (the comparison twin) with attention_mask: does it apply it?"""
    mask = torch.ones_like(PROMPT)
    mask[0, :2] = 0
    got = hhf.LocalModel(plain[name]).run_with_hooks(PROMPT, {}, attention_mask=mask).logits
    with torch.no_grad():
        expected = plain[name](input_ids=PROMPT, attention_mask=mask, use_cache=False).logits
    diffs = []
    compare(got, expected, "logits", diffs)
    if diffs:
        record("local_model_attention_mask", name, "MISMATCH", str(diffs))
        pytest.fail(f"SILENT MISMATCH (LocalModel drops attention_mask): {diffs}")
    record("local_model_attention_mask", name, "equal")


# ---- generation with steering hooks --------------------------------------------------------

def hf_generate(model, ids, hooks: dict, n):
    handles = []
    for key, fn in hooks.items():
        path, _, kind = key.partition(":")
        mod = model.get_submodule(path)
        handles.append(mod.register_forward_pre_hook(fn) if kind == "input"
                       else mod.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None,
                                  pad_token_id=0, max_new_tokens=n, do_sample=False)
    finally:
        for h in handles:
            h.remove()


def gen_steer_return(p, s):
    def f(m, a, o):
        s.setdefault("shapes", []).append(tuple(o.shape))
        return o + 2.0 * VEC
    return {p["mlp0"]: f}


def gen_steer_last_inplace(p, s):
    def f(m, a, o):
        o[:, -1] += 3.0 * VEC
    return {p["block0"]: f}


def gen_pre_block(p, s):
    def f(m, a):
        return (a[0] + 3.0 * VEC,) + a[1:]
    return {p["block1"] + ":input": f}


def gen_attn_tuple(p, s):
    def f(m, a, o):
        s.setdefault("lens", []).append(len(o))
        return (o[0] * 3.0,) + tuple(o[1:])
    return {p["attn1"]: f}


def gen_store_args(p, s):
    def f(m, a, o):
        s.setdefault("nargs", []).append(len(a))
    return {p["block0"]: f}


GEN = {"steer_return": gen_steer_return, "steer_last_inplace": gen_steer_last_inplace,
       "pre_block": gen_pre_block, "attn_tuple": gen_attn_tuple, "store_args": gen_store_args}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("case", list(GEN))
def test_generate_steering(case, name, plain, remote):
    ls, rs = {}, {}
    expected = hf_generate(plain[name], PROMPT, GEN[case](P[name], ls), 5)
    try:
        got = remote[name].generate(PROMPT, 5, GEN[case](P[name], rs), eos_token_id=None,
                                    pad_token_id=0)
    except HookwireError as e:
        record(f"gen_{case}", name, "raised", str(e))
        return
    except Exception as e:  # noqa: BLE001
        record(f"gen_{case}", name, "non_hookwire_raise", f"{type(e).__name__}: {e}")
        pytest.fail(f"NON-HOOKWIRE RAISE {type(e).__name__}: {e}")
    diffs = []
    if not torch.equal(got.sequences, expected):
        diffs.append(("sequences", f"{got.sequences.tolist()} vs {expected.tolist()}"))
    compare(rs, ls, "store", diffs)
    if diffs:
        record(f"gen_{case}", name, "MISMATCH", str(diffs))
        pytest.fail(f"SILENT MISMATCH: {diffs}")
    record(f"gen_{case}", name, "equal")


# ---- a few pyvene configs on a block output ------------------------------------------------

def _pv_configs():
    pv = pytest.importorskip("pyvene")
    return {
        "vanilla_block_output": lambda: pv.IntervenableConfig(
            [{"layer": 1, "component": "block_output",
              "intervention_type": pv.VanillaIntervention}]),
        "rotated_block_output": lambda: pv.IntervenableConfig(
            [{"layer": 0, "component": "block_output", "low_rank_dimension": 4,
              "intervention_type": pv.LowRankRotatedSpaceIntervention}]),
        "addition_mlp_output": lambda: pv.IntervenableConfig(
            [{"layer": 1, "component": "mlp_output",
              "intervention_type": pv.AdditionIntervention}]),
        "collect_attention_output": lambda: pv.IntervenableConfig(
            [{"layer": 0, "component": "attention_output",
              "intervention_type": pv.CollectIntervention}]),
    }


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("config", ["vanilla_block_output", "rotated_block_output",
                                    "addition_mlp_output"])
def test_pyvene_config(config, name, hf_models, server):
    import copy

    pv = pytest.importorskip("pyvene")
    import hookwire.pyvene as hpv
    make = _pv_configs()[config]
    base = {"input_ids": PROMPT}
    source = {"input_ids": torch.randint(0, 256, PROMPT.shape,
                                         generator=torch.Generator().manual_seed(3))}
    torch.manual_seed(0)
    local = pv.IntervenableModel(make(), copy.deepcopy(hf_models[name]))
    remote_model = hpv.RemoteIntervenableModel(make(), name)
    for key, iv in local.interventions.items():
        remote_model.interventions[key].load_state_dict(iv.state_dict())
    if config == "addition_mlp_output":
        kw = dict(unit_locations={"base": 3}, source_representations=VEC)
        call = lambda m: m(base, **kw)  # noqa: E731
    else:
        call = lambda m: m(base, [source], {"sources->base": 3})  # noqa: E731
    with torch.no_grad():
        expected = call(local)
    try:
        with torch.no_grad():
            got = call(remote_model)
    except HookwireError as e:
        record(f"pyvene_{config}", name, "raised", str(e))
        return
    diffs = []
    exp_out, got_out = expected[1], got[1]
    if config == "collect_attention_output":
        compare(list(got[0][1][0]) if got[0][1] is not None else None,
                list(expected[0][1][0]) if expected[0][1] is not None else None,
                "collected", diffs)
    else:
        compare(got_out.logits, exp_out.logits, "logits", diffs)
    if diffs:
        record(f"pyvene_{config}", name, "MISMATCH", str(diffs))
        pytest.fail(f"SILENT MISMATCH: {diffs}")
    record(f"pyvene_{config}", name, "equal")
