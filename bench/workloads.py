"""The benchmark suite's workloads, each written once per tool, the way a user of that tool
would write it.

A workload is a set of callables, one per column (``plain``, ``tl``, ``pyvene``, ``nnsight``,
``remote``, ``nnsight_remote``), each taking a :class:`Tools` and returning tensors; a column a tool has no natural
way to express is absent. Every callable is one timing *unit*; what a unit is (one call of a
sweep, or the whole experiment) is in ``Workload.unit``. ``plain`` is the floor: the same number
of forward (and backward) passes of the plain HF model, with no hook at all.

The remote callables need nothing but ``Tools.remote`` / ``Tools.remote_pv`` (weightless
stand-ins), so the concurrent-clients processes run them without building a local model.
``nnsight_remote`` is the ``nnsight`` column's own code, unchanged, on a weightless
``hookwire.nnsight.RemoteLanguageModel`` (NNsight code on hookwire).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import nnsight
import torch

import hookwire.nnsight  # noqa: F401  (Tools.nn_remote)

SEQ = 16                 # tokens per prompt (2 shared cores: gpt2-small is ~0.2 s a forward)
ANSWER, WRONG = 5, 7     # token ids compared at the last position (valid in both vocabularies)
SWEEP_POSITIONS = (SEQ // 2 - 1, SEQ // 2, SEQ - 1)   # patched positions: the corrupted one,
                                                      # the one before it, the last


@dataclass
class Inputs:
    """Deterministic prompts: ``corrupt`` differs from ``clean`` at position SEQ // 2."""
    clean: torch.Tensor
    corrupt: torch.Tensor
    n_layers: int
    n_heads: int
    d_model: int

    @property
    def layer(self) -> int:       # the intervened layer of single-site workloads
        return self.n_layers // 2

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads


def make_inputs(n_layers: int, n_heads: int, d_model: int, batch: int, seed: int = 0) -> Inputs:
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 256, (batch, SEQ), generator=gen)
    corrupt = clean.clone()
    corrupt[:, SEQ // 2] = (corrupt[:, SEQ // 2] + 1) % 256
    return Inputs(clean, corrupt, n_layers, n_heads, d_model)


@dataclass
class Tools:
    """The objects a unit runs on; a field is None where that column is not run."""
    inputs: Inputs
    hf: object = None             # plain HF model (the plain column)
    bridge: object = None         # local TL 4 TransformerBridge, same weights
    pv_hf: object = None          # HF model that local pyvene wraps (pyvene rewires it)
    nn: object = None             # nnsight.NNsight over another HF copy
    nn_remote: object = None      # hookwire.nnsight.RemoteLanguageModel (no weights)
    remote: object = None         # hookwire.transformerlens.RemoteModel
    remote_pv: Callable | None = None   # config -> hookwire.pyvene.RemoteIntervenableModel
    state: dict = field(default_factory=dict)   # per-workload setup (clean caches, models)


def logit_diff(logits):
    """Per-row logit difference at the last position: the metric of every patching workload."""
    return logits[:, -1, ANSWER] - logits[:, -1, WRONG]


def _plain_forwards(n: int, backward: bool = False):
    def run(t: Tools):
        out = None
        for _ in range(n):
            with torch.set_grad_enabled(backward):
                out = logit_diff(t.hf(input_ids=t.inputs.clean).logits)
                if backward:
                    out.sum().backward()
        return None
    return run


# ---- 1a. cache one site ------------------------------------------------------------------------

def _site(t):
    return f"blocks.{t.inputs.layer}.hook_resid_post"


def cache_one_tl(t: Tools, model=None, **kw):
    model = model if model is not None else t.bridge
    logits, cache = model.run_with_cache(t.inputs.clean, names_filter=_site(t), **kw)
    return logits, cache[_site(t)]


def cache_one_remote(t: Tools):
    return cache_one_tl(t, t.remote, progress=False)


def cache_one_nnsight(t: Tools, nn=None):
    nn = nn if nn is not None else t.nn
    with nn.trace(t.inputs.clean):
        act = nn.transformer.h[t.inputs.layer].output.save()
        logits = nn.output.logits.save()
    return logits, act


def cache_one_pyvene(t: Tools):
    import pyvene as pv
    if "pv_collect" not in t.state:
        config = pv.IntervenableConfig([{"layer": t.inputs.layer, "component": "block_output",
                                         "intervention_type": pv.CollectIntervention,
                                         "max_number_of_units": SEQ}])
        t.state["pv_collect"] = pv.IntervenableModel(config, t.pv_hf)
    (_, collected), _ = t.state["pv_collect"]({"input_ids": t.inputs.clean},
                                              unit_locations={"base": list(range(SEQ))})
    return None, collected[0]   # pyvene's Collect returns no logits


# ---- 1b. cache every residual stream ------------------------------------------------------------

def _is_resid_post(name: str) -> bool:
    return name.endswith("hook_resid_post")


def cache_all_tl(t: Tools, model=None, **kw):
    model = model if model is not None else t.bridge
    logits, cache = model.run_with_cache(t.inputs.clean, names_filter=_is_resid_post, **kw)
    return logits, torch.stack([cache[f"blocks.{i}.hook_resid_post"]
                                for i in range(t.inputs.n_layers)])


def cache_all_remote(t: Tools):
    return cache_all_tl(t, t.remote, progress=False)


def cache_all_nnsight(t: Tools, nn=None):
    nn = nn if nn is not None else t.nn
    with nn.trace(t.inputs.clean):
        acts = nnsight.save([block.output for block in nn.transformer.h])
        logits = nn.output.logits.save()
    return logits, torch.stack(acts)


# ---- 2. head ablation: one call per head of one layer; the unit is one call --------------------

def _zero_head(z, hook, head):
    z[:, :, head, :] = 0.0


def _next(t: Tools, n: int) -> int:
    """Cycle through a sweep's calls across repeats (the unit is one call of the sweep): the
    runner sets ``state["round"]``, the same for every column of a round."""
    return t.state.get("round", 0) % n


def _head(t):
    return _next(t, t.inputs.n_heads)


def head_ablation_tl(t: Tools, head=None):
    head = _head(t) if head is None else head
    hook = (f"blocks.{t.inputs.layer}.attn.hook_z", functools.partial(_zero_head, head=head))
    return logit_diff(t.bridge.run_with_hooks(t.inputs.clean, fwd_hooks=[hook]))


def head_ablation_remote(t: Tools, head=None):
    head = _head(t) if head is None else head
    hook = (f"blocks.{t.inputs.layer}.attn.hook_z", functools.partial(_zero_head, head=head))
    # metric=: the logit difference is computed on the server, only it comes back
    return t.remote.run_with_hooks(t.inputs.clean, fwd_hooks=[hook], metric=logit_diff,
                                   progress=False)


def head_ablation_nnsight(t: Tools, head=None, nn=None):
    head = _head(t) if head is None else head
    nn = nn if nn is not None else t.nn
    dh = t.inputs.d_head
    with nn.trace(t.inputs.clean):
        # GPT-2's c_proj input is the heads' outputs side by side (TL's hook_z, flattened)
        nn.transformer.h[t.inputs.layer].attn.c_proj.input[:, :, head * dh:(head + 1) * dh] = 0
        diff = logit_diff(nn.output.logits).save()
    return diff


# ---- 3. activation patching sweep: resid_pre x every layer x SWEEP_POSITIONS --------------------
# The clean cache is taken once in setup (not timed); the unit is one patched forward, cycling
# through the (layer, position) grid.

def _grid(t):
    k = _next(t, t.inputs.n_layers * len(SWEEP_POSITIONS))
    return divmod(k, len(SWEEP_POSITIONS))[0], SWEEP_POSITIONS[k % len(SWEEP_POSITIONS)]


def _patch(resid, hook, pos, clean_resid):
    resid[:, pos, :] = clean_resid[:, pos, :]


def _is_resid_pre(name: str) -> bool:
    return name.endswith("hook_resid_pre")


def patching_setup_tl(t: Tools, remote: bool):
    model = t.remote if remote else t.bridge
    kw = {"progress": False} if remote else {}
    _, cache = model.run_with_cache(t.inputs.clean, names_filter=_is_resid_pre, **kw)
    t.state["clean_remote" if remote else "clean_tl"] = cache


def patching_tl(t: Tools, remote=False, layer_pos=None):
    layer, pos = _grid(t) if layer_pos is None else layer_pos
    model = t.remote if remote else t.bridge
    cache = t.state["clean_remote" if remote else "clean_tl"]
    name = f"blocks.{layer}.hook_resid_pre"
    hook = (name, functools.partial(_patch, pos=pos, clean_resid=cache[name]))
    if remote:
        return model.run_with_hooks(t.inputs.corrupt, fwd_hooks=[hook], metric=logit_diff,
                                    progress=False)
    return logit_diff(model.run_with_hooks(t.inputs.corrupt, fwd_hooks=[hook]))


def patching_remote(t: Tools, layer_pos=None):
    return patching_tl(t, remote=True, layer_pos=layer_pos)


def patching_setup_nnsight(t: Tools, nn=None):
    key = "clean_nn" if nn is None else "clean_nn_remote"
    nn = nn if nn is not None else t.nn
    with nn.trace(t.inputs.clean):
        acts = nnsight.save([block.input for block in nn.transformer.h])
    t.state[key] = acts


def patching_nnsight(t: Tools, layer_pos=None, nn=None):
    layer, pos = _grid(t) if layer_pos is None else layer_pos
    clean = t.state["clean_nn" if nn is None else "clean_nn_remote"][layer]
    nn = nn if nn is not None else t.nn
    with nn.trace(t.inputs.corrupt):
        nn.transformer.h[layer].input[:, pos, :] = clean[:, pos, :]
        diff = logit_diff(nn.output.logits).save()
    return diff


def patching_pyvene(t: Tools, layer_pos=None):
    """pyvene's own way: a VanillaIntervention of block_input, source = the clean prompt
    (pyvene runs the source forward on every call: it has no cache to reuse)."""
    import pyvene as pv
    layer, pos = _grid(t) if layer_pos is None else layer_pos
    models = t.state.setdefault("pv_patch", {})
    if layer not in models:
        config = pv.IntervenableConfig([{"layer": layer, "component": "block_input",
                                         "intervention_type": pv.VanillaIntervention}])
        models[layer] = pv.IntervenableModel(config, t.pv_hf)
    _, cf = models[layer]({"input_ids": t.inputs.corrupt}, [{"input_ids": t.inputs.clean}],
                          {"sources->base": pos})
    return logit_diff(cf.logits)


# ---- 4. attribution patching: clean and corrupt forward + backward, resid_pre and hook_z --------

def _wanted(name: str) -> bool:
    return name.endswith("hook_resid_pre") or name.endswith("attn.hook_z")


def _mean_diff(logits):
    return logit_diff(logits).mean()


def _fwd_bwd_tl(model, tokens, remote: bool):
    cache, grads = {}, {}

    def keep(act, hook):
        cache[hook.name] = act.detach()

    def keep_grad(grad, hook):
        grads[hook.name] = grad.detach()

    model.reset_hooks()
    model.add_hook(_wanted, keep, "fwd")
    model.add_hook(_wanted, keep_grad, "bwd")
    try:
        if remote:
            model(tokens, metric=_mean_diff, progress=False)
        else:
            with torch.enable_grad():
                _mean_diff(model(tokens)).backward()
    finally:
        model.reset_hooks()
    return cache, grads


def _attribute(clean, corrupt, grads, n_layers, resid_key, z_key):
    resid, heads = [], []
    for layer in range(n_layers):
        r, z = resid_key(layer), z_key(layer)
        resid.append(((clean[r] - corrupt[r]) * grads[r]).sum(-1))               # [batch, pos]
        heads.append(((clean[z] - corrupt[z]) * grads[z]).sum((-1, -3)))         # [batch, head]
    return torch.stack(resid), torch.stack(heads)


def attribution_tl(t: Tools, remote=False):
    model = t.remote if remote else t.bridge
    clean, _ = _fwd_bwd_tl(model, t.inputs.clean, remote)
    corrupt, grads = _fwd_bwd_tl(model, t.inputs.corrupt, remote)
    hooks = model.hook_dict   # TL 4 stores under canonical names; the aliases map to them
    return _attribute(clean, corrupt, grads, t.inputs.n_layers,
                      lambda i: hooks[f"blocks.{i}.hook_resid_pre"].name,
                      lambda i: hooks[f"blocks.{i}.attn.hook_z"].name)


def attribution_remote(t: Tools):
    return attribution_tl(t, remote=True)


def _fwd_bwd_nnsight(t: Tools, tokens, nn=None):
    n, nh = t.inputs.n_layers, t.inputs.n_heads
    nn = nn if nn is not None else t.nn
    with nn.trace(tokens):
        blocks = nn.transformer.h
        resid, z = [], []
        for i in range(n):   # in the order the forward reaches them
            resid.append(blocks[i].input)
            z.append(blocks[i].attn.c_proj.input)
        acts = nnsight.save(resid + z)
        with _mean_diff(nn.output.logits).backward():
            grads = nnsight.save([None] * (2 * n))
            for i in reversed(range(n)):   # gradients arrive last layer first
                grads[n + i] = z[i].grad
                grads[i] = resid[i].grad
    shape = lambda x: x.unflatten(-1, (nh, -1))   # noqa: E731  [b, s, d] -> TL's [b, s, h, dh]
    cache = {f"r{i}": acts[i] for i in range(n)} | {f"z{i}": shape(acts[n + i]) for i in range(n)}
    grad = {f"r{i}": grads[i] for i in range(n)} | {f"z{i}": shape(grads[n + i]) for i in range(n)}
    return cache, grad


def attribution_nnsight(t: Tools, nn=None):
    clean, _ = _fwd_bwd_nnsight(t, t.inputs.clean, nn)
    corrupt, grads = _fwd_bwd_nnsight(t, t.inputs.corrupt, nn)
    return _attribute(clean, corrupt, grads, t.inputs.n_layers, lambda i: f"r{i}",
                      lambda i: f"z{i}")


# ---- 5a. pyvene vanilla interchange: block_output of the middle layer, position SEQ // 2 --------

def _pv_config(t: Tools, kind: str):
    import pyvene as pv
    itype = pv.VanillaIntervention if kind == "vanilla" else pv.RotatedSpaceIntervention
    return pv.IntervenableConfig([{"layer": t.inputs.layer, "component": "block_output",
                                   "intervention_type": itype}])


def _pv_model(t: Tools, kind: str, remote: bool):
    import pyvene as pv
    key = f"pv_{kind}_{'remote' if remote else 'local'}"
    if key not in t.state:
        torch.manual_seed(1)   # the rotation's initial weights: the same on both sides
        config = _pv_config(t, kind)
        t.state[key] = t.remote_pv(config) if remote else pv.IntervenableModel(config, t.pv_hf)
    return t.state[key]


def interchange_pyvene(t: Tools, kind="vanilla", remote=False):
    model = _pv_model(t, kind, remote)
    _, cf = model({"input_ids": t.inputs.corrupt}, [{"input_ids": t.inputs.clean}],
                  {"sources->base": SEQ // 2})
    return cf.logits


def interchange_remote(t: Tools):
    return interchange_pyvene(t, "vanilla", remote=True)


def interchange_tl(t: Tools):
    name = f"blocks.{t.inputs.layer}.hook_resid_post"
    _, cache = t.bridge.run_with_cache(t.inputs.clean, names_filter=name)
    hook = (name, functools.partial(_patch, pos=SEQ // 2, clean_resid=cache[name]))
    return t.bridge.run_with_hooks(t.inputs.corrupt, fwd_hooks=[hook])


def interchange_nnsight(t: Tools, nn=None):
    nn = nn if nn is not None else t.nn
    block = nn.transformer.h[t.inputs.layer]
    with nn.trace(t.inputs.clean):
        source = block.output.save()
    with nn.trace(t.inputs.corrupt):
        block.output[:, SEQ // 2, :] = source[:, SEQ // 2, :]
        logits = nn.output.logits.save()
    return logits


def _on_hookwire(fn):
    """The nnsight column's code as it is, on the weightless remote model."""
    def run(t: Tools):
        return fn(t, nn=t.nn_remote)
    run.__name__ = f"{fn.__name__}_on_hookwire"
    return run


def rotated_pyvene(t: Tools):
    return interchange_pyvene(t, "rotated", remote=False)


def rotated_remote(t: Tools):
    return interchange_pyvene(t, "rotated", remote=True)


def rotated_setup(t: Tools):
    """The remote rotation gets the local one's weights, as a user loads trained weights."""
    if t.pv_hf is not None and t.remote_pv is not None:
        local, remote = _pv_model(t, "rotated", False), _pv_model(t, "rotated", True)
        for key, iv in local.interventions.items():
            remote.interventions[key].load_state_dict(iv.state_dict())


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str                 # what one timed call is
    calls: Callable           # Inputs -> number of units in the whole experiment
    columns: dict             # column -> callable(Tools)
    setup: Callable | None = None           # Tools -> None (untimed), before the first unit
    grad: bool = False                      # the units differentiate
    compare_to: str = "tl"                  # the column every other is checked against
    ratio_to: str = "tl"                    # the local column the remote time is divided by


WORKLOADS = [
    Workload("cache_one", "cache one site (resid_post of the middle layer) + logits",
             "one call", lambda i: 1,
             {"plain": _plain_forwards(1), "tl": cache_one_tl, "pyvene": cache_one_pyvene,
              "nnsight": cache_one_nnsight, "remote": cache_one_remote,
              "nnsight_remote": _on_hookwire(cache_one_nnsight)}),
    Workload("cache_all", "cache every resid_post + logits", "one call", lambda i: 1,
             {"plain": _plain_forwards(1), "tl": cache_all_tl, "nnsight": cache_all_nnsight,
              "remote": cache_all_remote, "nnsight_remote": _on_hookwire(cache_all_nnsight)}),
    Workload("head_ablation", "zero-ablate each head of the middle layer, logit diff",
             "one head (one call)", lambda i: i.n_heads,
             {"plain": _plain_forwards(1), "tl": head_ablation_tl,
              "nnsight": head_ablation_nnsight, "remote": head_ablation_remote,
              "nnsight_remote": _on_hookwire(head_ablation_nnsight)}),
    Workload("patching", "resid_pre patching, every layer x positions "
             f"{list(SWEEP_POSITIONS)}, logit diff", "one (layer, position) patch",
             lambda i: i.n_layers * len(SWEEP_POSITIONS),
             {"plain": _plain_forwards(1), "tl": patching_tl, "pyvene": patching_pyvene,
              "nnsight": patching_nnsight, "remote": patching_remote,
              "nnsight_remote": _on_hookwire(patching_nnsight)},
             setup=lambda t: (t.bridge is not None and patching_setup_tl(t, False),
                              t.remote is not None and patching_setup_tl(t, True),
                              t.nn is not None and patching_setup_nnsight(t),
                              t.nn_remote is not None and patching_setup_nnsight(t, t.nn_remote))),
    Workload("attribution", "attribution patching: clean + corrupt forward and backward, "
             "resid_pre and hook_z of every layer", "whole experiment", lambda i: 1,
             {"plain": _plain_forwards(2, backward=True), "tl": attribution_tl,
              "nnsight": attribution_nnsight, "remote": attribution_remote,
              "nnsight_remote": _on_hookwire(attribution_nnsight)}, grad=True),
    Workload("interchange", "pyvene vanilla interchange, block_output of the middle layer",
             "one call", lambda i: 1,
             {"plain": _plain_forwards(2), "tl": interchange_tl, "pyvene": interchange_pyvene,
              "nnsight": interchange_nnsight, "remote": interchange_remote,
              "nnsight_remote": _on_hookwire(interchange_nnsight)},
             compare_to="pyvene", ratio_to="pyvene"),
    Workload("rotated", "pyvene RotatedSpaceIntervention forward, block_output, middle layer",
             "one call", lambda i: 1,
             {"plain": _plain_forwards(2), "pyvene": rotated_pyvene, "remote": rotated_remote},
             setup=rotated_setup, compare_to="pyvene", ratio_to="pyvene"),
]
BY_NAME = {w.name: w for w in WORKLOADS}
