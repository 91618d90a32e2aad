"""The hosted model's plain HF module tree, and the module sites it offers.

A TL 4 ``TransformerBridge`` rewrites the HF model it wraps: blocks become ``BlockBridge``
wrappers, and GPT-2's attention is re-implemented from split q/k/v linears, so modules such as
``attn.c_attn`` or ``attn.c_proj`` never run in the bridge's forward. HF module paths (what
pyvene and HF hooks address) must mean what they mean in HF, so the server keeps a second,
plain module tree of the same family whose parameters and buffers *are* the bridge's tensors
(shared storage, no copy). Module sites (``hookwire.module_sites``) run on that tree.
"""
from __future__ import annotations

import copy
from dataclasses import replace
import re

import torch

from hookwire.families import family_for_architecture
from hookwire.kv_cache import cache_kwargs, returned_cache
from hookwire.module_sites import (attach, element_values, is_module_site, module_site,
                                   parse_module_site, site_value)
from hookwire.server.attention_sites import attention_weight_sites, weight_site_modules
from hookwire.server.devices import input_device
from hookwire.server.manifest import PROBE_SHAPES, describe_fired, probe_vocab
from hookwire.ir import SiteInfo

_WRAPPED = re.compile(r"(^|\.)_original_component")


def _canonical(name: str) -> str:
    return _WRAPPED.sub("", name)


def plain_hf_model(hosted) -> torch.nn.Module:
    """The plain HF tree module sites run on (``hosted``: a HostedModel, or a TL bridge): a
    base model (no bridge) is its own; for a bridge, a plain HF model (built on the meta device, so nothing is allocated) whose every
    parameter and buffer is the bridge's own tensor object. A model spread over devices by
    accelerate gets the same dispatch hooks on the mirror, so its sites survive the split."""
    bridge = getattr(hosted, "bridge", hosted)
    if bridge is None:
        return hosted.hf_model
    wrapped = bridge.original_model
    # Our own copy of the config: the attention implementation set below is this tree's only.
    # It is the HF model's own (or transformers' default), not the eager one TransformerLens
    # may have forced on the bridge's model for its hook points: module-path users compare
    # with a plain HF model.
    cfg = copy.deepcopy(wrapped.config)
    cfg._attn_implementation = getattr(hosted, "hf_attention", None)
    family = family_for_architecture(getattr(hosted, "architecture", None) or (
        getattr(cfg, "architectures", None) or [type(wrapped).__name__])[0])
    tensors: dict[str, torch.Tensor] = {}
    for name, t in list(wrapped.named_parameters(remove_duplicate=False)) + \
            list(wrapped.named_buffers(remove_duplicate=False)):
        tensors.setdefault(_canonical(name), t)
    with torch.device("meta"):
        plain = family.model_class(cfg)
    for module_name, module in plain.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for store in (module._parameters, module._buffers):
            for key, value in list(store.items()):
                if value is None:
                    continue
                shared = tensors.get(prefix + key)
                if shared is None or shared.shape != value.shape:
                    raise RuntimeError(f"cannot share {prefix + key} with the bridge's model")
                store[key] = shared
    if getattr(wrapped, "hf_device_map", None):
        _mirror_dispatch(wrapped, plain)
    return plain.eval()


def _mirror_dispatch(wrapped, plain) -> None:
    """Give each module of ``plain`` a copy of accelerate's hook on its counterpart in the
    bridge's model: inputs move to the module's device, offloaded weights are brought in for
    its forward and dropped after (each hook keeps its own parameter slots, so the two trees
    never see each other's loaded weights)."""
    from accelerate.hooks import add_hook_to_module

    hooks: dict[str, object] = {}
    for name, module in wrapped.named_modules(remove_duplicate=False):
        hook = getattr(module, "_hf_hook", None)
        canonical = _canonical(name)
        if hook is None:
            continue
        try:
            counterpart = plain.get_submodule(canonical)
        except AttributeError:
            continue
        if type(counterpart) is type(module):  # the HF module, not a TL wrapper of it
            hooks[canonical] = hook
    for name, hook in hooks.items():
        add_hook_to_module(plain.get_submodule(name), copy.copy(hook))
    plain.hf_device_map = dict(wrapped.hf_device_map)


def _record(model, batch: int, seq: int, vocab: int, attention_weights: bool = False
            ) -> list[tuple[str, int, tuple, torch.dtype, bool, tuple]]:
    fired: list = []
    counts: dict[str, int] = {}

    def note(name, value):
        if isinstance(value, torch.Tensor):
            call = counts.get(name, 0)
            counts[name] = call + 1
            # (grad: measured later, by _gradient_sites; strides: the site's layout)
            fired.append((name, call, tuple(value.shape), value.dtype, False,
                          tuple(value.stride())))

    handles = []
    for path, module in model.named_modules():
        if not path:
            continue  # the whole model's output is the forward's own result
        out_name, in_name = module_site(path, "output"), module_site(path, "input")

        def pre(mod, args, kwargs, name=in_name):
            value = args[0] if args else next((v for v in kwargs.values()
                                               if isinstance(v, torch.Tensor)), None)
            note(name, value)

        def post(mod, args, output, name=out_name, path=path):
            for element, value in element_values(output):
                note(module_site(path, "output", element), value)
            note(name, site_value(output))
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        tokens = torch.randint(0, probe_vocab(model, vocab), (batch, seq),
                               generator=torch.Generator().manual_seed(0)).to(
                                   input_device(model))
        with torch.no_grad(), attention_weight_sites(model, attention_weights):
            model(input_ids=tokens)
    finally:
        for h in handles:
            h.remove()
    return fired


def probe_module_sites(model) -> tuple[list[SiteInfo], dict[str, str]]:
    """(module sites that fire with a tensor, in firing order, with symbolic shapes;
    {site: why it cannot be served} for those whose shapes cannot be described)."""
    vocab = model.config.vocab_size
    (b1, s1), (b2, s2) = PROBE_SHAPES
    first, second = _record(model, b1, s1, vocab), _record(model, b2, s2, vocab)
    weight_names = _weight_site_names(model)
    if weight_names:
        # The attention-dropout sites fire only in the eager implementation requests that
        # hook them run (server.attention_sites); every other site is listed as the default
        # forward fires it (under SDPA, attention modules return no weights, for example).
        plain = {(n, c) for n, c, *_ in first}
        first, second = ([e for e in _record(model, b, s, vocab, attention_weights=True)
                          if (e[0], e[1]) in plain or e[0] in weight_names]
                         for b, s in ((b1, s1), (b2, s2)))
    try:
        sites, unserved = describe_fired(first, second)
    except RuntimeError:
        raise RuntimeError("module sites fire in a different order for different input "
                           "sizes") from None
    names = {site.name for site in sites}
    try:
        graded = _gradient_sites(model, b1, s1, vocab, names - weight_names, False)
        if names & weight_names:
            graded |= {key for key in _gradient_sites(model, b1, s1, vocab,
                                                      names & weight_names, True)
                       if key[0] in weight_names}
    except Exception:  # no backward on this model: no module site offers a gradient
        graded = set()
    return [replace(site, grad=(site.name, site.call) in graded) for site in sites], unserved


def _gradient_sites(model, batch: int, seq: int, vocab: int, names: set,
                    attention_weights: bool) -> set[tuple[str, int]]:
    """(site, call) of the module sites whose value reaches the output and depends on the
    weights: where a backward pass delivers a gradient. Measured as the executor takes it: the
    value the model goes on with is a fresh view at every site (hookwire.executor)."""
    kept: list = []
    counts: dict[str, int] = {}

    def keeper(name):
        def hook(mod, args, value):
            call = counts.get(name, 0)
            counts[name] = call + 1
            if isinstance(value, torch.Tensor) and value.requires_grad:
                value = value.view_as(value)
                kept.append(((name, call), value))
                return value
            return None
        return hook

    table = module_table(model)
    handles = []
    try:
        for name in sorted(names):
            module = table.get(name)
            if module is None:
                module = model.get_submodule(parse_module_site(name)[0])
            handles.append(attach(module, name, keeper(name)))
        tokens = torch.randint(0, probe_vocab(model, vocab), (batch, seq),
                               generator=torch.Generator().manual_seed(0)).to(
                                   input_device(model))
        with torch.enable_grad(), attention_weight_sites(model, attention_weights):
            output = model(input_ids=tokens)[0]  # logits, or a base model's hidden states
            grads = torch.autograd.grad(output.float().sum(), [v for _, v in kept],
                                        allow_unused=True) if kept else ()
    finally:
        for h in handles:
            h.remove()
    return {key for (key, _), g in zip(kept, grads) if g is not None}


def _weight_site_names(model) -> set[str]:
    ids = weight_site_modules(model)
    return {module_site(path, kind) for path, m in model.named_modules() if id(m) in ids
            for kind in ("input", "output")}


def _type_name(value) -> str:
    return "Tensor" if isinstance(value, torch.Tensor) else type(value).__name__


def _layouts(model, run, lists: set | None = None
             ) -> tuple[dict[str, list[str]], dict[str, dict[str, str]]]:
    """Type names of tuple (or list) outputs and positional arguments, per module site (first
    call), and of the keyword arguments of modules called with any, per input site; output
    sites of modules that return a list go to ``lists``."""
    found: dict[str, list[str]] = {}
    keywords: dict[str, dict[str, str]] = {}

    handles = []
    for path, module in model.named_modules():
        if not path:
            continue

        def pre(mod, args, kwargs, path=path):
            site = module_site(path, "input")
            found.setdefault(site, [_type_name(v) for v in args])
            if kwargs:
                keywords.setdefault(site, {str(k): _type_name(v) for k, v in kwargs.items()})

        def post(mod, args, output, path=path):
            if isinstance(output, (tuple, list)):
                found.setdefault(module_site(path, "output"), [_type_name(v) for v in output])
                if isinstance(output, list) and lists is not None:
                    lists.add(module_site(path, "output"))
        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found, keywords


def probe_module_layouts(model) -> tuple[dict, dict, dict, dict, list]:
    """(layouts in a plain forward, layouts in a generation step's forward where they
    differ, keyword layouts in a plain forward, in a step's where they differ, output sites
    whose module returns a list): what a client needs to hand hooks the tuples and lists
    (and nnsight the keyword arguments) torch would."""
    tokens = torch.zeros((1, 3), dtype=torch.int64, device=input_device(model))
    fwd = type(model).forward
    lists: set = set()
    plain, plain_kw = _layouts(model, lambda: fwd(model, input_ids=tokens, use_cache=False),
                               lists)
    try:
        with torch.no_grad():
            cache = returned_cache(fwd(model, input_ids=tokens, use_cache=True))
        step, step_kw = _layouts(model, lambda: fwd(model, input_ids=tokens[:, :1],
                                                     use_cache=True,
                                                     **cache_kwargs(fwd, cache)))
    except Exception:  # no KV cache: the model does not generate on the server (prepare.py)
        step, step_kw = {}, {}
    return (plain, {k: v for k, v in step.items() if plain.get(k) != v},
            plain_kw, {k: v for k, v in step_kw.items() if plain_kw.get(k) != v},
            sorted(lists))


def module_table(model, sites=()) -> dict[str, torch.nn.Module]:
    """site name -> module, for every module of the plain tree (both kinds), and for the
    tuple-element sites among the probed ``sites``."""
    table = {}
    for path, module in model.named_modules():
        if path:
            table[module_site(path, "output")] = module
            table[module_site(path, "input")] = module
    for site in sites:
        if is_module_site(site.name) and site.name not in table:
            table[site.name] = model.get_submodule(parse_module_site(site.name)[0])
    return table


__all__ = ["plain_hf_model", "probe_module_sites", "probe_module_layouts", "module_table"]
