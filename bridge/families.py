"""Model families hookwire knows how to build. An architecture name that arrives over the
wire is only ever looked up in this table: nothing is imported by name."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hookwire.errors import ProtocolError


@dataclass(frozen=True)
class Family:
    architecture: str
    config_class: type
    model_class: type

    def config_to_dict(self, cfg) -> dict:
        # Only plain JSON values of the config travel; defaults fill in the rest.
        out = {}
        for key, value in cfg.to_diff_dict().items():
            if key in ("architectures", "transformers_version", "_name_or_path", "model_type",
                       "torch_dtype", "dtype"):
                continue
            if isinstance(value, (int, float, str, bool)) or value is None:
                out[key] = value
        return out


FAMILIES: dict[str, Family] = {
    "GPT2LMHeadModel": Family("GPT2LMHeadModel", GPT2Config, GPT2LMHeadModel),
    "LlamaForCausalLM": Family("LlamaForCausalLM", LlamaConfig, LlamaForCausalLM),
}


def family_for_architecture(architecture: str) -> Family:
    try:
        return FAMILIES[architecture]
    except KeyError:
        raise ProtocolError(
            f"model architecture {architecture!r} is not supported; "
            f"supported: {', '.join(FAMILIES)}") from None


def build_hf_model(architecture: str, config_dict: dict, *, seed: int | None = None,
                   device: str | torch.device = "cpu"):
    """Build an HF model of an allow-listed family from a config dict.

    With ``device="meta"`` nothing is allocated: that is the client's weightless stand-in."""
    family = family_for_architecture(architecture)
    cfg = family.config_class(**config_dict)
    cfg.architectures = [architecture]
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = family.model_class(cfg)
    return model.eval(), cfg
