"""Which served model a local nnsight model stands for, and whether it may.

A remote trace addresses the served model by module paths, so the local model (a weightless
stand-in, or the user's own model with weights) must have the served model's architecture:
the same class and config, hence the same module tree. Checked once per local model and server.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hookwire.errors import HookwireError
from hookwire.module_sites import is_module_site, parse_module_site
from hookwire.nnsight.forward import output_class
from hookwire.nnsight.plan import forward_events


@dataclass
class Target:
    info: object                 # hookwire.client.RemoteModelInfo
    root: str                    # the envoy path of the model ("model")
    events: list                 # hookwire.nnsight.plan.Event, one forward
    lm_head: str                 # path of the module whose output is the logits
    output_cls: type             # what the model's forward returns
    # id -> name of the weightless stand-in's (meta) parameters and buffers: module calls in a
    # block (a logit lens' model.lm_head(...)) compute with the server's own weights.
    parameters: dict


def _config_matches(local_cfg, served: dict) -> bool:
    values = local_cfg.to_dict()
    return all(values.get(k) == v for k, v in served.items()
               if k not in ("architectures", "transformers_version", "_name_or_path",
                            "model_type", "torch_dtype", "dtype"))


def _check(module: torch.nn.Module, info) -> None:
    architecture = type(module).__name__
    if architecture != info.architecture:
        raise HookwireError(f"the local model is a {architecture}; the server's "
                            f"{info.name!r} is a {info.architecture}")
    config = getattr(module, "config", None)
    if config is not None and not _config_matches(config, info.config):
        raise HookwireError(f"the local model's config differs from the server's "
                            f"{info.name!r}: their modules would not line up")
    paths = {p for p, _ in module.named_modules()}
    missing = sorted({parse_module_site(s.name)[0] for s in info.sites
                      if is_module_site(s.name)} - paths)
    if missing:
        raise HookwireError(f"the server's {info.name!r} has modules the local model lacks "
                            f"(e.g. {missing[0]!r})")


def _served_name(module, conn) -> str:
    """The one served model with this model's architecture and config."""
    config = getattr(module, "config", None)
    found = []
    for name in conn.available_models:
        info = conn.model_info(name)
        if info.architecture == type(module).__name__ and config is not None and \
                _config_matches(config, info.config):
            found.append(name)
    if len(found) != 1:
        why = "none" if not found else f"several ({', '.join(found)})"
        raise HookwireError(f"which served model is this? {why} of the server's models "
                            f"({', '.join(conn.available_models)}) has its architecture and "
                            "config: name one with remote_model='...' (or RemoteBackend("
                            "model='...'))")
    return found[0]


def _lm_head(module) -> str:
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    for path, m in module.named_modules():
        if m is head and path:
            return path
    return "lm_head"


def target_of(envoy, conn, name: str | None) -> Target:
    """The served model an nnsight model (root envoy) runs on, checked; cached per server."""
    module = envoy._module
    key = (conn.url, name)
    cache = envoy.__dict__.setdefault("_hookwire_targets", {})
    if key not in cache:
        if name is None:
            name = getattr(envoy, "_hookwire_model", None) or _served_name(module, conn)
        info = conn.model_info(name)
        _check(module, info)
        weightless = {id(t): name for name, t in
                      list(module.named_parameters(remove_duplicate=False))
                      + list(module.named_buffers(remove_duplicate=False))
                      if t.device.type == "meta"}
        cache[key] = Target(info, envoy.path, forward_events(info, module), _lm_head(module),
                            output_class(module), weightless)
    return cache[key]


__all__ = ["Target", "target_of"]
