"""The family matrix: every architecture hookwire serves (``hookwire.families``, driven by
TransformerLens 4's own table), as a tiny random checkpoint built here (``family_configs``),
on every front that applies, each equal to the local library on the same weights:

- TransformerLens ``run_with_hooks`` and ``run_with_cache`` (every hook point) through the
  weightless ``RemoteModel`` and through a local bridge with ``remote=True``, against
  TransformerLens itself on a bridge of its own over the same weights;
- ``hookwire.hf`` module hooks and a cache of every module, against plain torch hooks;
- generation with a steering hook at every step, against HF's own ``generate``;
- pyvene interchange, where pyvene has a mapping for the model class, against pyvene.

One server per family, shared by its fronts (module-scoped, parametrized fixture). A front
that cannot serve a family refuses it with the reason, before anything is sent, and the
refusal is asserted instead: TL hook points of families whose TransformerLens bridge does not
run on this transformers (``TL_REFUSED``: if TransformerLens fixes one, its test fails and it
moves to the served list), generation of families without a KV cache.

On a GPU machine ``scripts/gpu_check.sh`` runs the same matrix with the models on the GPU
(``HOOKWIRE_TEST_DEVICE=cuda:0``; the local references there too), in another dtype
(``HOOKWIRE_TEST_DTYPE=bfloat16``), or split over two devices
(``HOOKWIRE_TEST_DEVICE_MAP=split``: layers over cuda:0 and cuda:1, or CPU and disk).
"""
from __future__ import annotations

import copy
import itertools
import os
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

import hookwire
import hookwire.client
import hookwire.hf as hhf
import hookwire.pyvene
import hookwire.server as hs
import hookwire.transformerlens as htl
import pyvene as pv
from hookwire.errors import SiteNotServed, UnsupportedModel
from hookwire.batching import site_batching
from hookwire.module_sites import ServerObject, is_module_site, owned_by
from hookwire.families import (DTYPES, build_hf_model, family_for_architecture,
                               served_architectures)
from hookwire.server.attention_sites import eager_attention
from hookwire.server.cancel_watch import block_modules
from hookwire.server.models import place_on_devices, wrap_in_bridge
from pyvene.models.intervenable_modelcard import type_to_module_mapping

from family_configs import tiny_config
from graphs import graph, node, read_graph, ref, write_graph
from pipelined import PipelinedClient, equal_values
from weight_memory import sites_sharing_weight_memory
from serving import serving
from strided_sites import strided_hook_points

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning",
                                         "ignore::UserWarning",
                                         "ignore::DeprecationWarning")]

# TransformerLens 4.3's bridges that fail on transformers 5.24, with (part of) their error:
# their TL fronts are refused with it; hookwire.hf, generation and pyvene still serve them.
TL_REFUSED = {
    "CodeGenForCausalLM": "'CodeGenAttention' object has no attribute 'embed_positions'",
    "GraniteMoeHybridForCausalLM": "Original component not set for model.rotary_emb",
}
SERVED = sorted(served_architectures())
B, S = 2, 6
TOKENS = torch.randint(3, 250, (B, S), generator=torch.Generator().manual_seed(7))
SOURCE = torch.randint(3, 250, (B, S), generator=torch.Generator().manual_seed(8))
DEVICE = torch.device(os.environ.get("HOOKWIRE_TEST_DEVICE", "cpu"))
DTYPE = DTYPES[os.environ.get("HOOKWIRE_TEST_DTYPE", "float32")]
SPLIT = os.environ.get("HOOKWIRE_TEST_DEVICE_MAP") == "split"
LOCAL_TOKENS, LOCAL_SOURCE = TOKENS.to(DEVICE), SOURCE.to(DEVICE)
if DTYPE != torch.float32:   # OLMo's bridges mix float32 into half-precision matmuls
    TL_REFUSED.update(dict.fromkeys(
        ["OlmoForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM", "FlexOlmoForCausalLM"],
        "expected m1 and m2 to have the same dtype"))


def build(arch: str, device=DEVICE):
    """The family's tiny model (seed 0: every build has the same weights), in DTYPE."""
    family = family_for_architecture(arch)
    model, cfg = build_hf_model(arch, tiny_config(arch, family.config_class), seed=0,
                                dtype=DTYPE)
    return model.to(device), cfg


def build_served(arch: str):
    """The model the server hosts: on DEVICE, or split layer-wise over two devices (the GPUs
    cuda:0 and cuda:1, or, on a CPU run, the CPU and disk offload)."""
    if not SPLIT:
        return build(arch)[0]
    model, _ = build(arch, device="cpu")
    first, second = ("cpu", "disk") if DEVICE.type == "cpu" else (0, 1)
    layers = layers_path(model)
    n = len(model.get_submodule(layers))
    device_map, seen_layers = {}, False
    for name, _ in list(model.named_parameters(remove_duplicate=False)) + \
            list(model.named_buffers(remove_duplicate=False)):
        module = name.rsplit(".", 1)[0]
        if name.startswith(layers + "."):
            index = int(name[len(layers) + 1:].split(".", 1)[0])
            device_map[f"{layers}.{index}"] = first if index < max(n // 2, 1) else second
            seen_layers = True
        else:   # before the layers (embeddings) on the first device, after them on the second
            device_map.setdefault(module, second if seen_layers else first)
    return place_on_devices(model, device_map)


def cpu(value):
    """Local results (on DEVICE) where the remote ones arrive: on the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {k: cpu(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(cpu(v) for v in value)
    return value


@dataclass
class Case:
    arch: str
    name: str
    server: object
    local_hf: torch.nn.Module        # the same weights, never served: HF, pyvene, generate
    local_tl: torch.nn.Module        # a TL bridge of its own over the same weights
    layers: str                      # the module path of the decoder layers


def layers_path(model) -> str:
    """The decoder layers' module list (the first list of ``num_hidden_layers`` modules, or,
    for a model that counts layers otherwise -- HRM's two stacks -- its first list)."""
    lists = [path for path, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module)]
    n = model.config.num_hidden_layers
    exact = [p for p in lists if len(model.get_submodule(p)) == n]
    assert lists, f"{type(model).__name__} has no module list"
    return (exact or lists)[0]


@pytest.fixture(scope="module", params=SERVED)
def case(request):
    arch = request.param
    name = f"tiny-{arch}"
    with serving(models={name: build_served(arch)}) as srv:
        local_hf, cfg = build(arch)
        tl_model, _ = build(arch)
        local_tl = wrap_in_bridge(tl_model, arch, cfg, None, name)
        yield Case(arch, name, srv, local_hf, local_tl, layers_path(local_hf))


def tl_refusal(case) -> str | None:
    """Why the server refuses the family's TL hook points (None: it serves them). Known
    refusals must come with their reason; any other refusal fails the matrix."""
    reason = hookwire.client.get_connection().model_info(case.name).tl_refused
    if case.arch in TL_REFUSED or reason is not None:
        assert reason is not None and TL_REFUSED.get(case.arch, "?") in reason, reason
    return reason


def assert_tl_refused(case, reason):
    with pytest.raises(UnsupportedModel, match="TransformerLens hook points are not served"):
        htl.RemoteModel(case.name)
    with pytest.raises(UnsupportedModel, match="TransformerLens hook points are not served"):
        case.local_tl.run_with_hooks(TOKENS, fwd_hooks=[], remote=True, remote_model=case.name)


# ---- shared weights ------------------------------------------------------------------------

def weights_digest(case) -> dict:
    entry = case.server.server.entries[case.name]
    models = [m for m in (entry.hosted.bridge, entry.hf_model) if m is not None]
    return {f"{k}:{name}": (t.dtype, tuple(t.shape), t.detach().cpu().clone())
            for k, model in enumerate(models)
            for name, t in list(model.named_parameters()) + list(model.named_buffers())}


def test_in_place_writes_never_reach_the_shared_weights(case):
    """Some families hand a site a tensor that *is* part of the model: OpenAI GPT's and
    BERT's position ids are a slice of a registered buffer. An in-place write a graph makes
    there must not change the shared model (it would change every later request of every
    user): the server edits a copy that replaces the value in that forward (issue 14). For
    every family, every site whose value shares memory with a parameter or buffer gets an
    in-place write of zeros; afterwards every parameter and buffer is bit-identical and a
    clean request's logits equal those before."""
    shared, seen = sites_sharing_weight_memory(case.server.server.entries[case.name], TOKENS)
    assert seen, f"{case.arch}: no site fired"
    if not shared:
        return  # nothing to write into: the property holds trivially for this family
    conn = hookwire.client.get_connection()
    clean = read_graph(case.name, [])
    before_logits = conn.run(clean, {"input_ids": TOKENS}).values["__logits__"]
    before = weights_digest(case)
    for site in shared:
        zero = graph(case.name, nodes=[node(0, "site.read", 0), node(1, "mul", ref(0), 0),
                                       node(2, "site.write", 0, ref(1), mode="inplace")],
                     sites=[site])
        conn.run(zero, {"input_ids": TOKENS})
    after = weights_digest(case)
    changed = [k for k in before if not torch.equal(before[k][2], after[k][2])]
    assert changed == [], f"{case.arch}: in-place writes into {shared} changed {changed}"
    assert torch.equal(conn.run(clean, {"input_ids": TOKENS}).values["__logits__"],
                       before_logits)
    # The write itself does what it does locally (TL's own hook, in place; the local model
    # is a copy, since locally the edit stays in its buffer for later calls too).
    tl_sites = [site for site in shared if not site.startswith("hf:")]
    if tl_sites and tl_refusal(case) is None:
        def zero(x, hook):
            x[:] = 0
        hooks = [(site, zero) for site in tl_sites]
        expected = copy.deepcopy(case.local_tl).run_with_hooks(TOKENS, fwd_hooks=hooks)
        got = htl.RemoteModel(case.name).run_with_hooks(TOKENS, fwd_hooks=hooks)
        assert_close(got, cpu(expected), rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, before_logits)  # the edit changed this forward


def test_a_cobatched_write_never_reaches_its_batch_mate(case):
    """Issue 14's co-batching rule on every family: requests that write every batch-major TL
    site (a few dozen sites per request, replacing, then in place) each share a forward with
    one that reads every TL site a batch member may read, and the reader's values and logits
    equal its solo run every time; a writer of a site that is not batch-major (position ids,
    rotary tables, an MoE router's flattened logits...) runs alone. A site torch refuses an in-place write into (an expanded view,
    as locally) fails its writer alone and is dropped from the next try. (Per site and per
    mode, with each writer's result against local TL, on the built-in models:
    test_cobatch_every_site.py; module-site graphs never share a forward.)"""
    if tl_refusal(case) is not None:
        return  # only module-site graphs: they never share a forward
    info = hookwire.client.get_connection().model_info(case.name)
    sites = [s for s in info.sites if not is_module_site(s.name)]
    # The readers read every site a request may read and still share a forward (a router's
    # flattened batch x position logits, as MoE families have, would keep it alone): one
    # without the sites that fire only with eager attention, one with them (requests share
    # a forward only with requests of the same attention implementation).
    readable = [s for s in sites if site_batching(s.shape, writes=False)]
    rgraphs = {eager: read_graph(case.name, [(s.name, s.call) for s in readable
                                             if eager or not s.eager])
               for eager in (False, True)}
    solo_replace = case.server.server.entries[case.name].solo_replace_sites
    writer, reader = PipelinedClient(case.server.url), PipelinedClient(case.server.url)

    def pair(written, mode, batched, eager):
        """The writer and the reader back to back (retried until they share a forward,
        if they should); the reader checked against its solo run each time."""
        solo = solos[eager]
        for _ in range(8):
            w = writer.send(write_graph(case.name, written, mode), {"input_ids": TOKENS})
            r = reader.send(rgraphs[eager], {"input_ids": TOKENS})
            wa, ra = writer.collect([w])[w], reader.collect([r])[r]
            where = f"{case.arch} {mode} {[n for n, _, _ in written][:3]}..."
            assert ra.error is None, f"{where}: the reader failed: {ra.error}"
            # Bit-equal, or (families whose kernels round differently at another batch size:
            # Mamba2, ModernBERT's decoder, Qwen3.5 -- a read-only batch mate gives the same
            # 7e-7) equal to float rounding; a write that reached it would differ by O(1).
            assert equal_values(ra.values, solo.values) or all(
                torch.allclose(ra.values[k], solo.values[k], rtol=1e-5, atol=1e-5)
                for k in solo.values) and set(ra.values) == set(solo.values), \
                f"{where}: reached the batch mate"
            if not batched:
                assert wa.batch_size in (0, 1) and ra.batch_size == 1, where
                return wa
            if wa.error is not None or wa.batch_size == 2:
                return wa
        pytest.fail(f"{case.arch}: the writer and the reader never shared a forward")

    try:
        solos = {}
        for eager, rgraph in rgraphs.items():
            rid = reader.send(rgraph, {"input_ids": TOKENS})
            solos[eager] = reader.collect([rid])[rid]
            assert solos[eager].error is None and solos[eager].batch_size == 1
        triples = {(s.name, s.call): (s.name, s.call, str(s.dtype).removeprefix("torch."))
                   for s in sites}
        eager_sites = {(s.name, s.call) for s in sites if s.eager}
        major = [(s.name, s.call) for s in sites if site_batching(s.shape, writes=True)]
        shared_forwards = 0
        for mode, eager in itertools.product(("replace", "inplace"), (False, True)):
            todo = [triples[k] for k in major if (k in eager_sites) == eager and
                    not (mode == "replace" and k in solo_replace)]
            for start in range(0, len(todo), 40):  # (a light request: give_way.LIGHT_NODES)
                chunk = todo[start:start + 40]
                while chunk:
                    wa = pair(chunk, mode, batched=True, eager=eager)
                    if wa.error is None:
                        shared_forwards += 1
                        break
                    refused = [t for t in chunk if f"in-place write into site {t[0]!r}"
                               in wa.error.message]
                    assert mode == "inplace" and refused, wa.error
                    chunk = [t for t in chunk if t not in refused]
        assert shared_forwards >= 2, shared_forwards
        for key in triples:
            if key not in major:
                for mode in ("replace", "inplace"):
                    pair([triples[key]], mode, batched=False, eager=key in eager_sites)
    finally:
        writer.close()
        reader.close()


# ---- TransformerLens -----------------------------------------------------------------------

def resid_sites(case) -> list[str]:
    """Hook points that carry the residual stream (batch, seq, d_model), in firing order:
    the matrix hooks a third and two thirds of the way through (names differ by family)."""
    d_model = case.local_tl.cfg.d_model
    info = hookwire.client.get_connection().model_info(case.name)
    names = [s.name for s in info.sites if not s.name.startswith("hf:") and s.call == 0
             and s.shape == ("B", "S", d_model) and not s.name.startswith("hook_")]
    assert len(names) >= 3, names
    return [names[len(names) // 3], names[2 * len(names) // 3]]


def tl_hooks(sites: list[str], store: dict):
    def steer(x, hook):
        return x + 0.25

    def edit_in_place(x, hook):
        x[:, -1] *= 0.5

    def keep(x, hook):
        store[hook.name] = x.detach().clone()
    return [(sites[0], steer), (sites[1], edit_in_place), (sites[1], keep)]


@pytest.mark.parametrize("front", ["stand_in", "local_bridge"])
def test_tl_run_with_hooks(case, front):
    reason = tl_refusal(case)
    if reason is not None:
        return assert_tl_refused(case, reason)
    sites = resid_sites(case)
    local_store, remote_store = {}, {}
    expected = case.local_tl.run_with_hooks(LOCAL_TOKENS,
                                            fwd_hooks=tl_hooks(sites, local_store))
    if front == "stand_in":
        got = htl.RemoteModel(case.name).run_with_hooks(
            TOKENS, fwd_hooks=tl_hooks(sites, remote_store))
    else:
        got = case.local_tl.run_with_hooks(TOKENS, fwd_hooks=tl_hooks(sites, remote_store),
                                           remote=True, remote_model=case.name)
    assert_close(got, cpu(expected))
    assert local_store.keys() == {sites[1]}, f"{sites[1]} never fired locally"
    assert remote_store.keys() == local_store.keys()
    assert_close(remote_store[sites[1]], cpu(local_store[sites[1]]))


# Sites whose activation's strides no coef * B^b * S^s formula describes (hookwire.site_layout):
# they are traced as contiguous. gpt-oss's attention pattern is a slice of a row one longer
# than the sequence (its attention sink).
UNDESCRIBED_LAYOUTS = {"GptOssForCausalLM": "attn.hook_pattern"}


def test_tl_sites_that_are_not_contiguous_trace_with_their_strides(case):
    """The server describes the layout of every site whose activation is not contiguous
    (permuted heads, a row broadcast over the batch, a slice of a fused buffer), with the
    strides the local activation has; through them ``x.contiguous()`` is a copy or the
    tensor itself as locally, so an edit after it reaches the activation as locally."""
    reason = tl_refusal(case)
    if reason is not None:
        return assert_tl_refused(case, reason)
    info = hookwire.client.get_connection().model_info(case.name)
    described = {s.name: s for s in info.sites if s.call == 0 and not is_module_site(s.name)}
    strided = strided_hook_points(case.local_tl, LOCAL_TOKENS)
    for name, (shape, strides) in strided.items():
        site = described.get(name)
        if site is None:
            continue  # not served (its refusal is checked elsewhere)
        if site.layout is None:
            assert name.endswith(UNDESCRIBED_LAYOUTS.get(case.arch, "?")), \
                f"{name} {shape} {strides}: not contiguous, and no layout described"
            continue
        assert all(n == 1 or a == b for n, a, b in
                   zip(shape, site.concrete_strides(B, S), strides)), name
    for name, site in described.items():
        if site.layout is not None:
            assert name in strided or all(n == 1 for n in site.concrete_shape(B, S)[:-1]), \
                f"{name}: a layout is described, yet its local activation is contiguous"
    checked = [n for n in strided if n in described and described[n].layout is not None and
               described[n].dtype.is_floating_point][:4]

    def edit(x, hook):
        x.contiguous().view(-1)[1::3].mul_(-3.0)
    for name in checked:
        with torch.no_grad():
            expected = case.local_tl.run_with_hooks(LOCAL_TOKENS, fwd_hooks=[(name, edit)])
            got = htl.RemoteModel(case.name).run_with_hooks(TOKENS, fwd_hooks=[(name, edit)])
        assert_close(got, cpu(expected), msg=name)


@pytest.mark.parametrize("front", ["stand_in", "local_bridge"])
def test_tl_run_with_cache_of_every_hook_point(case, front):
    """Every hook point that fires (every one the server serves: hooks on the others are
    refused before anything is sent, below). Where attention patterns exist only in eager
    attention the server runs it for this request, as TransformerLens's loader does; so does
    the local reference."""
    reason = tl_refusal(case)
    if reason is not None:
        return assert_tl_refused(case, reason)
    info = hookwire.client.get_connection().model_info(case.name)
    unserved = info.unserved

    def served(name):
        hp = case.local_tl.hook_dict[name]
        return (getattr(hp, "name", None) or name) not in unserved
    with eager_attention(case.local_tl.original_model, any(s.eager for s in info.sites)):
        expected_logits, expected = case.local_tl.run_with_cache(LOCAL_TOKENS,
                                                                 names_filter=served)
    model = htl.RemoteModel(case.name) if front == "stand_in" else case.local_tl
    extra = {} if front == "stand_in" else {"remote": True, "remote_model": case.name}
    logits, cache = model.run_with_cache(TOKENS, names_filter=served, **extra)
    assert_close(logits, cpu(expected_logits))
    assert set(cache.keys()) == set(expected.keys())
    for key in expected.keys():
        assert_close(cache[key], cpu(expected[key]), msg=lambda m, key=key: f"{key}: {m}")
    if any(not name.startswith("hf:") for name in unserved):
        with pytest.raises(SiteNotServed):
            model.run_with_cache(TOKENS, **extra)


# ---- hookwire.hf -----------------------------------------------------------------------------

def steer_layer(module, args, output):
    if isinstance(output, tuple):
        return (output[0] + 0.25,) + output[1:]
    if isinstance(output, list):  # GPT-1's blocks return a list
        return [output[0] + 0.25] + output[1:]
    return output + 0.25


def test_hf_module_hooks_and_cache_of_every_module(case):
    remote = hhf.RemoteModel(case.name)
    # Every module that runs with a tensor -- except attention-dropout modules, which run only
    # remotely, on purpose (server/attention_sites.py: pyvene's attention_weight component).
    modules = [s.name[3:-7] for s in remote.info.sites
               if s.name.startswith("hf:") and s.name.endswith(":output") and s.call == 0
               and not s.name.endswith("attn_dropout:output")]
    hooks = {f"{case.layers}.0": steer_layer}
    got, cache = remote.run_with_cache(TOKENS, modules=modules, hooks=hooks)
    expected, expected_cache = local_cache(case.local_hf, modules, hooks)
    field = remote.info.output
    assert_close(getattr(got, field), cpu(getattr(expected, field)))
    assert cache.keys() == expected_cache.keys()
    for key, value in expected_cache.items():
        same_values(cache[key], cpu(value), key)


def test_hf_module_outputs_that_are_not_contiguous_trace_with_their_strides(case):
    """As for TL sites (test_tl_sites_that_are_not_contiguous_trace_with_their_strides): a
    module whose output is not contiguous is described with its layout, and a torch hook's
    ``output.contiguous()`` is the output itself or a copy as locally."""
    remote = hhf.RemoteModel(case.name)
    outputs = {s.name[3:-7]: s for s in remote.info.sites
               if s.name.startswith("hf:") and s.name.endswith(":output") and s.call == 0}
    strided, tensors = {}, set()  # (modules returning a tuple: their elements' sites)

    def record(key):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                tensors.add(key)
                if not output.is_contiguous():
                    strided.setdefault(key, output.stride())
        return hook
    handles = [case.local_hf.get_submodule(key).register_forward_hook(record(key))
               for key in outputs]
    try:
        with torch.no_grad():
            case.local_hf(input_ids=LOCAL_TOKENS, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    described = {key for key, site in outputs.items()
                 if site.layout is not None and key in tensors}
    assert described <= set(strided), described - set(strided)
    for key, strides in strided.items():
        if key in described:
            shape = outputs[key].concrete_shape(B, S)
            assert all(n == 1 or a == b for n, a, b in
                       zip(shape, outputs[key].concrete_strides(B, S), strides)), key

    def edit(module, args, output):
        output.contiguous().view(-1)[1::3].mul_(-3.0)
    field = remote.info.output
    for key in sorted(k for k in described if outputs[k].dtype.is_floating_point)[:3]:
        got, _ = remote.run_with_cache(TOKENS, modules=[], hooks={key: edit})
        expected, _ = local_cache(case.local_hf, [], {key: edit})
        assert_close(getattr(got, field), cpu(getattr(expected, field)), msg=key)


def local_cache(model, modules, hooks):
    """Plain torch hooks; each cached value is cloned when its hook runs, as the server
    snapshots it then (a model may edit the tensor in place afterwards: Falcon's parallel
    attention adds into its MLP output)."""
    cache = {}

    def keep(key):
        def hook(module, args, output):
            cache[key] = _cloned(output)
        return hook
    handles = [model.get_submodule(key).register_forward_hook(fn)
               for key, fn in hooks.items()]  # the user's hooks first, then the cache's
    handles += [model.get_submodule(key).register_forward_hook(keep(key)) for key in modules]
    try:
        with torch.no_grad():
            out = model(input_ids=LOCAL_TOKENS, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out, cache


def _cloned(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        return type(value)(_cloned(v) for v in value)
    return value


def same_values(got, expected, where):
    if isinstance(got, ServerObject) and not isinstance(expected, torch.Tensor):
        # A value that is no tensor (JetMoE's router returns its expert counts as a list)
        # stays on the server: hooks are handed a placeholder of the same type to pass on.
        assert got.type_name == type(expected).__name__, where
        return
    if isinstance(expected, torch.Tensor):
        assert_close(got, expected, msg=lambda m: f"{where}: {m}")
    elif isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected), where
        for g, e in zip(got, expected):
            same_values(g, e, where)
    elif expected is None:
        assert got is None, where


def test_hf_generation_with_a_steering_hook(case):
    remote = hhf.RemoteModel(case.name)
    if remote.info.generate_refused is not None:
        # Refused before anything is sent, with the reason and a way out.
        assert "generate(remote=True)" in remote.info.generate_refused
        with pytest.raises(UnsupportedModel, match="cannot generate"):
            remote.generate(TOKENS, max_new_tokens=3)
        return
    got = remote.generate(TOKENS, max_new_tokens=3, hooks={f"{case.layers}.0": steer_layer},
                          intervene_on="all")
    handle = case.local_hf.get_submodule(f"{case.layers}.0").register_forward_hook(steer_layer)
    try:
        with torch.no_grad():
            expected = case.local_hf.generate(LOCAL_TOKENS, max_new_tokens=3, do_sample=False,
                                              eos_token_id=None, pad_token_id=0)
    finally:
        handle.remove()
    assert torch.equal(got.sequences, expected.cpu())


# ---- pyvene ------------------------------------------------------------------------------------

def test_pyvene_interchange(case):
    model_class = type(case.local_hf)
    if model_class not in type_to_module_mapping:
        pytest.skip(f"pyvene has no mapping for {model_class.__name__}")

    def config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                       "intervention_type": pv.VanillaIntervention}])
    local = pv.IntervenableModel(config(), copy.deepcopy(case.local_hf))
    remote = hookwire.pyvene.RemoteIntervenableModel(config(), case.name)
    expected = local(base={"input_ids": LOCAL_TOKENS}, sources=[{"input_ids": LOCAL_SOURCE}],
                     unit_locations={"sources->base": 3})
    got = remote(base={"input_ids": TOKENS}, sources=[{"input_ids": SOURCE}],
                 unit_locations={"sources->base": 3})
    assert_close(got[1].logits, cpu(expected[1].logits))


def test_gemma2_pyvene_keeps_final_logit_softcapping():
    """pyvene's logits come from the model's own output, after Gemma 2 soft-caps them
    (``tanh(logits / cap) * cap``), not from the LM head's output. A cap of 0.5 makes the
    difference plain. (The intervention is at the last layer: an earlier one with a source
    hits the eager attention mask of the pyvene issue, which its helper fixes.)"""
    arch = "Gemma2ForCausalLM"
    config = dict(tiny_config(arch, family_for_architecture(arch).config_class),
                  final_logit_softcapping=0.5)
    served, _ = build_hf_model(arch, config, seed=0)
    local, _ = build_hf_model(arch, config, seed=0)

    def pv_config():
        return pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                       "intervention_type": pv.VanillaIntervention}])
    call = ({"input_ids": TOKENS}, [{"input_ids": SOURCE}], {"sources->base": 3})
    expected = pv.IntervenableModel(pv_config(), copy.deepcopy(local))(*call)
    srv = hs.start(models={"gemma2-capped": served}, port=0)
    try:
        got = hookwire.pyvene.RemoteIntervenableModel(pv_config(), "gemma2-capped",
                                                      url=srv.url)(*call)
    finally:
        hookwire.client.close_connections()
        srv.stop()
    assert_close(got[1].logits, expected[1].logits)
    assert got[1].logits.abs().max() <= 0.5
    with torch.no_grad():
        uncapped = local.lm_head(local.model(input_ids=TOKENS).last_hidden_state)
    assert uncapped.abs().max() > 0.5   # without the cap the logits would be larger


# ---- giving way inside a forward ------------------------------------------------------------

def test_the_plain_hf_forward_is_reentrant_between_its_blocks(case):
    """A forward reading HF module sites runs in the server's plain HF tree (a mirror
    sharing the model's parameters) and gives way there too, at each block's pre-hook and
    after each block's attention module (``ModelEntry.hf_attention_points``): light requests
    run nested in it, module-site ones in the same tree, TL ones in the bridge. For the
    family's served tree, at its last block's pre-hook and after its first and last
    attention: a forward with whole nested forwards of other tokens -- one in the plain tree
    itself, one in the TL bridge where it is served -- equals the same forward without
    nesting, and each nested one its solo run -- bit for bit."""
    entry = case.server.server.entries[case.name]
    plain = entry.hf_model
    assert plain is not None, "no plain HF tree: module sites could not run"
    field = entry.hosted.family.output_field
    bridge = entry.hosted.bridge if tl_refusal(case) is None else None
    inner_tokens = LOCAL_SOURCE[:1, :4]

    def hf(tokens):
        out = type(plain).forward(plain, input_ids=tokens, use_cache=False)
        return getattr(out, field)
    attention = entry.hf_attention_points
    ends = dict.fromkeys([0, len(attention) - 1]) if attention else {}
    points = [("the last block's pre-hook", block_modules(plain)[-1], True)] + \
        [(f"after {type(attention[k]).__name__} {k}", attention[k], False) for k in ends]
    with torch.no_grad():
        alone, inner_alone = hf(LOCAL_TOKENS), hf(inner_tokens)
        tl_alone = bridge(inner_tokens) if bridge is not None else None
        for where, module, before in points:
            nested: dict = {}

            def nest(*_):
                if not nested:
                    nested["started"] = True  # (the hook fires in the nested forward too)
                    with owned_by(object()):
                        nested["plain"] = hf(inner_tokens)
                        if bridge is not None:
                            nested["tl"] = bridge(inner_tokens)
            handle = module.register_forward_pre_hook(nest) if before else \
                module.register_forward_hook(nest)
            try:
                out = hf(LOCAL_TOKENS)
            finally:
                handle.remove()
            assert nested, f"{where}: the hook did not fire"
            assert_close(out, alone, rtol=0, atol=0, msg=f"{where}: the interrupted forward")
            assert_close(nested["plain"], inner_alone, rtol=0, atol=0,
                         msg=f"{where}: the nested plain forward")
            if bridge is not None:
                assert_close(nested["tl"], tl_alone, rtol=0, atol=0,
                             msg=f"{where}: the nested TL forward")


def test_a_forward_is_reentrant_at_the_sites_it_gives_way_at(case):
    """A long forward lets waiting light requests run as forwards nested in it at its sites
    that are a block's own hook points and at its attention's scores, pattern and output
    (server/give_way.py, ``ModelEntry.block_sites``, ``attention_sites``). For every such
    site of the family: a forward whose hook there runs a whole nested forward of
    other tokens equals the same forward without nesting, and the nested one equals its solo
    run -- bit for bit. (Not every hook point inside a component is re-entrant: TL's OPT MLP
    bridge keeps per-call state on itself, so the server does not give way there.)"""
    if tl_refusal(case) is not None:
        return
    entry = case.server.server.entries[case.name]
    assert entry.block_sites, "no block-level sites: the forward could never give way at one"
    bridge, inner_tokens = case.local_tl, LOCAL_SOURCE[:1, :4]
    noop = lambda act, hook: None  # noqa: E731  (a TL hook there: the same code paths)
    fired = 0
    with torch.no_grad():
        # every block's own hook points; the attention points of the first and last block
        # (every block's attention is the same code)
        layers = sorted({int(n.split(".")[1]) for n in entry.attention_sites})
        ends = {f"blocks.{k}." for k in layers[:1] + layers[-1:]}
        attention = {n for n in entry.attention_sites if any(n.startswith(e) for e in ends)}
        for name in sorted(entry.block_sites | attention):
            try:
                alone = bridge.run_with_hooks(LOCAL_TOKENS, fwd_hooks=[(name, noop)])
            except ValueError as exc:  # behind one of TL's hook switches (off by default)
                assert "Cannot add hook" in str(exc), exc
                continue
            inner_alone = bridge.run_with_hooks(inner_tokens, fwd_hooks=[(name, noop)])
            nested: dict = {}

            def nest(act, hook):
                if not nested:
                    nested["started"] = True
                    with owned_by(object()):
                        nested["logits"] = bridge(inner_tokens)
            out = bridge.run_with_hooks(LOCAL_TOKENS, fwd_hooks=[(name, nest)])
            if not nested:
                continue  # a site that does not fire in this forward
            fired += 1
            assert_close(out, alone, rtol=0, atol=0, msg=f"{name}: the interrupted forward")
            assert_close(nested["logits"], inner_alone, rtol=0, atol=0,
                         msg=f"{name}: the nested forward")
    assert fired, "no block-level site fired"
