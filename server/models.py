"""Models the server can host: the built-in ones (built from configs with fixed seeds, no
download), local HF checkpoints, and model objects handed to ``start()``.

A causal LM is hosted as a TL 4 ``TransformerBridge`` over the HF model, so TL hook names and
HF module paths address one shared instance. A base model without an LM head (``GPT2Model``)
has no TL bridge: it is hosted as the HF model alone, for the module-path fronts.

Which architectures are served is ``hookwire.families``' table (TransformerLens 4's own); a
model of another one, or one whose TL bridge does not run, or that is not causal, is refused
here with the reason (``UnsupportedModel``) -- at load, before a client ever asks.
"""
from __future__ import annotations

import copy
import functools
import itertools
import os
from dataclasses import dataclass, field

import torch

from hookwire.errors import UnsupportedModel
from hookwire.families import Family, build_hf_model, family_for_architecture, refusal
from hookwire.server.devices import (input_device, model_dtype, parse_device,  # noqa: F401
                                     parse_dtype)
from hookwire.tokenizer import byte_level_tokenizer


@dataclass(frozen=True)
class BuiltinSpec:
    architecture: str
    config: dict
    seed: int


BUILTIN_MODELS: dict[str, BuiltinSpec] = {
    "tiny-gpt2": BuiltinSpec(
        "GPT2LMHeadModel",
        dict(n_layer=2, n_embd=64, n_head=4, n_positions=256, vocab_size=257,
             bos_token_id=256, eos_token_id=256),
        seed=0,
    ),
    "tiny-llama": BuiltinSpec(
        "LlamaForCausalLM",
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, vocab_size=257,
             max_position_embeddings=256, bos_token_id=256, eos_token_id=256,
             pad_token_id=256),
        seed=0,
    ),
    # GPT-2 small's shapes with random weights: the benchmark model.
    "gpt2-small-random": BuiltinSpec(
        "GPT2LMHeadModel",
        dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257,
             bos_token_id=50256, eos_token_id=50256),
        seed=0,
    ),
}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model",
                   "spiece.model", "vocab.txt")


def wrap_in_bridge(hf_model, architecture: str, cfg, tokenizer, name: str):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    bridge = build_bridge_from_module(hf_model, architecture, hf_config=cfg,
                                      tokenizer=tokenizer, model_name=name)
    bridge.eval()
    return bridge


@dataclass
class HostedModel:
    """One model as the server holds it: a TL bridge over the HF model (causal LMs), or the
    HF model alone (``bridge`` None: a base model without an LM head)."""
    name: str
    architecture: str
    config_dict: dict
    bridge: torch.nn.Module | None
    tokenizer: object
    hf_model: torch.nn.Module | None = None   # set for base models (no bridge)
    family: Family | None = field(default=None, repr=False)
    # The HF model's own attention implementation, before TransformerLens forced eager on
    # it for its hook points (None: transformers' default). HF module sites run with it, as
    # the same model does in a local HF forward.
    hf_attention: str | None = None

    def __post_init__(self):
        if self.family is None:
            self.family = family_for_architecture(self.architecture)
        if self.bridge is not None:
            # Lets a client in the same process (tests, notebooks) know its hooks must not
            # stay on this object while the server runs it.
            self.bridge._hookwire_hosted = True

    @property
    def model(self) -> torch.nn.Module:
        """The module whose parameters are the weights (bridge or HF model)."""
        return self.bridge if self.bridge is not None else self.hf_model

    @property
    def original(self) -> torch.nn.Module:
        """The HF model (inside the bridge, for causal LMs)."""
        return self.bridge.original_model if self.bridge is not None else self.hf_model

    @functools.cached_property
    def device(self) -> torch.device:
        """Where inputs go: for a model spread over devices, accelerate's main device. Read
        once (every request asks; a served model never moves)."""
        return input_device(self.original)

    @property
    def dtype(self) -> torch.dtype:
        return model_dtype(self.original)

    @property
    def vocab_size(self) -> int:
        if self.bridge is not None:
            return int(self.bridge.cfg.d_vocab)
        return int(self.original.config.vocab_size)


def place_on_devices(hf_model, device_map):
    """Spread a model built on the CPU over several devices with accelerate's ``device_map``
    ("auto", "balanced", or {module prefix: device}; "disk" offloads). Inside a Ray replica
    the visible GPUs are the ones Ray gave it (``ray_actor_options={"num_gpus": N}``)."""
    if device_map is None:
        return hf_model
    import tempfile

    from accelerate import dispatch_model, infer_auto_device_map

    if isinstance(device_map, str):
        device_map = infer_auto_device_map(
            hf_model, no_split_module_classes=hf_model._no_split_modules or [])
    # Offloaded weights go to a folder of this process's own (weights only, never input).
    offload_dir = None
    if "disk" in device_map.values():
        import shutil
        import weakref

        offload_dir = tempfile.mkdtemp(prefix="hookwire_offload_")
        weakref.finalize(hf_model, shutil.rmtree, offload_dir, True)  # gone with the model
    return dispatch_model(hf_model, device_map=dict(device_map), offload_dir=offload_dir)


def _place(hf_model, device_map, device):
    if device_map is not None and device is not None:
        raise ValueError("give a device or a device_map, not both")
    if device_map is not None:
        return place_on_devices(hf_model, device_map)
    if device is not None:
        return hf_model.to(device)
    return hf_model


def host(name: str, hf_model, cfg, tokenizer, architecture: str) -> HostedModel:
    """Wrap an HF model of a served family for hosting, or refuse it with the reason."""
    family = family_for_architecture(architecture)
    config_dict = family.config_to_dict(cfg, dtype=model_dtype(hf_model))
    hf_attention = getattr(hf_model.config, "_attn_implementation", None)
    if not family.has_lm_head:
        return HostedModel(name, architecture, config_dict, None, tokenizer,
                           hf_model=hf_model.eval(), family=family)
    try:
        bridge = wrap_in_bridge(hf_model, architecture, cfg, tokenizer, name)
    except Exception as exc:
        raise UnsupportedModel(bridge_failure(architecture, exc),
                               architecture=architecture) from exc
    return HostedModel(name, architecture, config_dict, bridge, tokenizer, family=family,
                       hf_attention=hf_attention)


def bridge_failure(architecture: str, exc: BaseException) -> str:
    import transformer_lens
    import transformers

    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    # (importlib.metadata would give the exact version; the static guarantees keep importlib
    # out of the product)
    tl_version = getattr(transformer_lens, "__version__", "4")
    return (f"cannot serve {architecture}: TransformerLens {tl_version}'s "
            f"bridge for it fails with transformers {transformers.__version__} "
            f"({type(exc).__name__}: {first})")


def load_builtin(name: str, device_map=None, dtype=None, device=None) -> HostedModel:
    spec = BUILTIN_MODELS[name]
    hf_model, cfg = build_hf_model(spec.architecture, spec.config, seed=spec.seed,
                                   dtype=parse_dtype(dtype))
    hf_model = _place(hf_model, device_map, parse_device(device))
    tokenizer = byte_level_tokenizer(bos_id=spec.config["bos_token_id"])
    return host(name, hf_model, cfg, tokenizer, spec.architecture)


def checkpoint_tokenizer(path: str):
    """The checkpoint's tokenizer, or None when the folder has no tokenizer files (the model
    is then served without one: clients pass token ids)."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                       for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_checkpoint(path: str, name: str | None = None, device_map=None, dtype="auto",
                    device=None) -> HostedModel:
    """A local HF checkpoint folder (or a name already in the local HF cache), in its own
    dtype (``dtype="auto"``) or the one given; with ``device_map`` its weights load straight
    onto several devices (accelerate)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    architecture = (cfg.architectures or [""])[0]
    family = family_for_architecture(architecture)
    torch_dtype = parse_dtype(dtype)
    device = parse_device(device)
    extra = {"dtype": torch_dtype or "auto"}
    if device_map is not None:
        if device is not None:
            raise ValueError("give a device or a device_map, not both")
        extra["device_map"] = device_map
    hf_model = family.model_class.from_pretrained(path, trust_remote_code=False,
                                                  **extra).eval()
    if device is not None:
        hf_model = hf_model.to(device)
    name = name or os.path.basename(os.path.normpath(path))
    return host(name, hf_model, hf_model.config, checkpoint_tokenizer(path), architecture)


def load_model(name_or_path: str, device_map=None, dtype=None, device=None) -> HostedModel:
    if name_or_path in BUILTIN_MODELS:
        return load_builtin(name_or_path, device_map, dtype, device)
    if os.path.isdir(name_or_path) or "/" in name_or_path:
        return load_checkpoint(name_or_path, device_map=device_map, dtype=dtype or "auto",
                               device=device)
    raise ValueError(f"unknown model {name_or_path!r}: not built in "
                     f"({', '.join(BUILTIN_MODELS)}) and not a local checkpoint folder")


def describe_bridge(bridge) -> tuple[str, dict, Family]:
    """(architecture, config dict, family) of a TL bridge the caller hosts. Over an HF model
    of a served family, the HF config (clients build weightless stand-ins from it). Over
    anything else -- TL's native models, a training framework's module -- the bridge is served
    as it is (its TL hook points, run by TL's own forward); there is no HF config to describe
    it, so clients use their own copy of the model with ``remote=True``."""
    hf_model = getattr(bridge, "original_model", None)
    cfg = getattr(hf_model, "config", None)
    architectures = getattr(cfg, "architectures", None) if cfg is not None else None
    architecture = (architectures or [getattr(bridge.cfg, "architecture", None)
                                      or type(hf_model).__name__])[0]
    if cfg is not None and refusal(architecture) is None:
        family = family_for_architecture(architecture)
        return architecture, family.config_to_dict(cfg, dtype=model_dtype(hf_model)), family
    # Not an HF model of a served family: TL's own forward and hook points only.
    return architecture, {}, Family(architecture, type(cfg), type(hf_model))


def host_model_object(name: str, model, tokenizer=None, dtype=None,
                      device=None) -> HostedModel:
    """Host an already-built object: a TL bridge (with its own tokenizer, possibly None), or
    an HF model of a served family (with ``tokenizer``, or none: clients then pass token
    ids). ``dtype``/``device`` convert it as ``model.to`` does: a bridge in place, an HF
    model's copy.

    An HF model is hosted as a deep copy: wrapping it in a TL bridge replaces its modules
    (``GPT2Block`` becomes ``BlockBridge``) and switches it to eval mode, and the caller's
    object must stay exactly what it was -- same modules, same mode, bit-identical outputs --
    so it can still run locally next to the server (pyvene's tests compare against it). The
    cost is a second copy of the weights in this process; to avoid it, serve a checkpoint
    folder (``models=["/path"]``) instead."""
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, HostedModel):
        return model
    torch_dtype, device = parse_dtype(dtype), parse_device(device)
    if isinstance(model, TransformerBridge):
        if torch_dtype is not None or device is not None:
            model.to(device=device, dtype=torch_dtype)
        architecture, config, family = describe_bridge(model)
        if torch_dtype is not None:
            model.cfg.dtype = torch_dtype
        return HostedModel(name, architecture, config, model,
                           tokenizer if tokenizer is not None else model.tokenizer,
                           family=family)
    model = copy_keeping_set_order(model)  # the caller's object stays as it was
    if torch_dtype is not None or device is not None:
        model.to(device=device, dtype=torch_dtype)
    cfg = model.config
    architecture = type(model).__name__
    return host(name, model.eval(), cfg, tokenizer, architecture)


def copy_keeping_set_order(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` whose modules' sets iterate in the original's order.

    ``copy.deepcopy`` rebuilds a set by inserting the original's elements in iteration order,
    and where two of them collide in the hash table that can reverse the order. Forwards that
    loop over a set (Gemma 4 computes one rotary table per ``set(config.layer_types)``) then
    fire their hook sites in another order than the caller's object does, so the copy's
    ``rotary_emb.hook_cos`` call 0 would be the caller's call 1."""
    hosted = copy.deepcopy(model)
    for (_, original), (_, copied) in zip(model.named_modules(remove_duplicate=False),
                                          hosted.named_modules(remove_duplicate=False)):
        for name, value in vars(original).items():
            if isinstance(value, (set, frozenset)) and \
                    list(getattr(copied, name, ())) != list(value):
                reordered = _set_in_order(value)
                if reordered is not None:
                    setattr(copied, name, reordered)
    return hosted


def _set_in_order(original):
    """A new set of ``original``'s elements that iterates in the same order (None: none found
    among the insertion orders tried -- only small sets are worth the search)."""
    target = list(original)
    orders = [target[::-1]] + (list(itertools.permutations(target)) if len(target) <= 6
                               else [])
    for order in orders:
        candidate = type(original)(order)
        if list(candidate) == target:
            return candidate
    return None


__all__ = ["BUILTIN_MODELS", "copy_keeping_set_order", "HostedModel", "load_model", "host_model_object",
           "build_hf_model", "wrap_in_bridge", "place_on_devices", "parse_dtype",
           "parse_device", "input_device", "host"]
