"""Models the server can host: the built-in ones (built from configs with fixed seeds, no
download) and local HF checkpoints. Every model is hosted as a TL 4 ``TransformerBridge``
over the HF model, so TL hook names and HF module paths address one shared instance."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch

from hookwire.families import FAMILIES, build_hf_model, family_for_architecture
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


def wrap_in_bridge(hf_model, architecture: str, cfg, tokenizer, name: str):
    from transformer_lens.model_bridge.sources import build_bridge_from_module

    bridge = build_bridge_from_module(hf_model, architecture, hf_config=cfg,
                                      tokenizer=tokenizer, model_name=name)
    bridge.eval()
    return bridge


@dataclass
class HostedModel:
    """One model as the server holds it."""
    name: str
    architecture: str
    config_dict: dict
    bridge: torch.nn.Module
    tokenizer: object

    def __post_init__(self):
        # Lets a client in the same process (tests, notebooks) know its hooks must not stay
        # on this object while the server runs it.
        self.bridge._hookwire_hosted = True

    @property
    def device(self) -> torch.device:
        return next(self.bridge.parameters()).device


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


def load_builtin(name: str, device_map=None) -> HostedModel:
    spec = BUILTIN_MODELS[name]
    hf_model, cfg = build_hf_model(spec.architecture, spec.config, seed=spec.seed)
    hf_model = place_on_devices(hf_model, device_map)
    tokenizer = byte_level_tokenizer(bos_id=spec.config["bos_token_id"])
    bridge = wrap_in_bridge(hf_model, spec.architecture, cfg, tokenizer, name)
    return HostedModel(name, spec.architecture, dict(spec.config), bridge, tokenizer)


def load_checkpoint(path: str, name: str | None = None, device_map=None) -> HostedModel:
    """A local HF checkpoint folder (or a name already in the local HF cache); with
    ``device_map`` its weights load straight onto several devices (accelerate)."""
    from transformers import AutoConfig, AutoTokenizer

    cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    architecture = (cfg.architectures or [""])[0]
    family = family_for_architecture(architecture)
    extra = {"device_map": device_map} if device_map is not None else {}
    hf_model = family.model_class.from_pretrained(path, trust_remote_code=False,
                                                  **extra).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    name = name or os.path.basename(os.path.normpath(path))
    bridge = wrap_in_bridge(hf_model, architecture, cfg, tokenizer, name)
    return HostedModel(name, architecture, family.config_to_dict(cfg), bridge, tokenizer)


def load_model(name_or_path: str, device_map=None) -> HostedModel:
    if name_or_path in BUILTIN_MODELS:
        return load_builtin(name_or_path, device_map)
    if os.path.isdir(name_or_path) or "/" in name_or_path:
        return load_checkpoint(name_or_path, device_map=device_map)
    raise ValueError(f"unknown model {name_or_path!r}: not built in "
                     f"({', '.join(BUILTIN_MODELS)}) and not a local checkpoint folder")


def host_model_object(name: str, model) -> HostedModel:
    """Host an already-built object: a TL bridge, or an HF model of a known family.

    An HF model is hosted as a deep copy: wrapping it in a TL bridge replaces its modules
    (``GPT2Block`` becomes ``BlockBridge``) and switches it to eval mode, and the caller's
    object must stay exactly what it was -- same modules, same mode, bit-identical outputs --
    so it can still run locally next to the server (pyvene's tests compare against it). The
    cost is a second copy of the weights in this process; to avoid it, serve a checkpoint
    folder (``models=["/path"]``) instead."""
    from transformer_lens.model_bridge import TransformerBridge

    if isinstance(model, HostedModel):
        return model
    if isinstance(model, TransformerBridge):
        hf_model = model.original_model
        cfg = hf_model.config
        architecture = (cfg.architectures or [type(hf_model).__name__])[0]
        family = family_for_architecture(architecture)
        return HostedModel(name, architecture, family.config_to_dict(cfg), model,
                           model.tokenizer)
    model = copy.deepcopy(model)
    cfg = model.config
    architecture = (getattr(cfg, "architectures", None) or [type(model).__name__])[0]
    family = family_for_architecture(architecture)
    tokenizer = byte_level_tokenizer(bos_id=getattr(cfg, "bos_token_id", None) or 0)
    bridge = wrap_in_bridge(model.eval(), architecture, cfg, tokenizer, name)
    return HostedModel(name, architecture, family.config_to_dict(cfg), bridge, tokenizer)


__all__ = ["BUILTIN_MODELS", "FAMILIES", "HostedModel", "load_model", "host_model_object",
           "build_hf_model", "wrap_in_bridge", "place_on_devices"]
