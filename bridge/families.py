"""Model families hookwire can build, driven by TransformerLens 4's own architecture table.

An architecture is served when TransformerLens 4 has a bridge for it
(``transformer_lens.factories.architecture_adapter_factory.SUPPORTED_ARCHITECTURES``), the
installed transformers has its class (no checkpoint code is ever run), and it is a
decoder-only language model whose forward takes token ids (transformers' causal-LM table, and
not one of its multimodal ones). The base model of each such family (``GPT2Model``,
``LlamaModel``: no LM head, its output is ``last_hidden_state``) is served too, on the HF
module-path fronts (``hookwire.hf``, pyvene); TransformerLens needs the LM head.

Anything else is refused with the reason (:func:`refusal`). Whether TransformerLens's bridge
for a family really runs on this transformers is found out when the server loads a model
(``hookwire.server.models``), which refuses it there with the bridge's own error.

An architecture name that arrives over the wire is only ever looked up against this table:
nothing is imported by a name the table does not already hold.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch

from hookwire.errors import UnsupportedModel

# Config keys that never travel: set by us, or able to make a client fetch or run code
# (``attn_implementation`` may name a kernel repository on the Hub; ``auto_map`` names remote
# code). Checked at every level of nested sub-configs.
_DROPPED_KEYS = {"architectures", "transformers_version", "_name_or_path", "model_type",
                 "torch_dtype", "dtype", "auto_map", "quantization_config", "custom_pipelines",
                 "trust_remote_code", "name_or_path", "tokenizer_class"}
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_FLOAT = "__float__"  # JSON has no inf/nan: {"__float__": "inf"} stands for float("inf")


def _clean_config(value, depth: int = 0, decode: bool = False):
    """A config's JSON values, minus keys that must not travel (see ``_DROPPED_KEYS``);
    non-finite floats are encoded (``decode``: decoded back)."""
    if depth > 8:
        raise UnsupportedModel("model config nested deeper than 8 levels")
    if isinstance(value, dict):
        if decode and set(value) == {_FLOAT} and value[_FLOAT] in ("inf", "-inf", "nan"):
            return float(value[_FLOAT])
        return {k: _clean_config(v, depth + 1, decode) for k, v in value.items()
                if isinstance(k, str) and _KEY.match(k) and k not in _DROPPED_KEYS
                and "implementation" not in k}
    if isinstance(value, (list, tuple)):
        return [_clean_config(v, depth + 1, decode) for v in value]
    if isinstance(value, float) and not math.isfinite(value) and not decode:
        return {_FLOAT: str(value)}
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return None  # not JSON: left to the config class's default


@dataclass(frozen=True)
class Family:
    """One served architecture: its name (``GPT2LMHeadModel``), the transformers config and
    model classes (looked up in transformers' own tables, never imported by a name from a
    checkpoint), and whether it has an LM head (a base model returns ``last_hidden_state``)."""
    architecture: str
    config_class: type
    model_class: type[torch.nn.Module]
    has_lm_head: bool = True   # False: a base model, whose output is last_hidden_state

    @property
    def output_field(self) -> str:
        """The field of the model's output that a forward returns (and graphs read)."""
        return "logits" if self.has_lm_head else "last_hidden_state"

    @property
    def output_class(self) -> type:
        """The model class's own output type (what ``model(input_ids)`` returns), read from
        its forward's annotation (``tuple | CausalLMOutputWithPast`` included)."""
        return output_class(self.model_class, self.has_lm_head)

    def config_to_dict(self, cfg, dtype: torch.dtype | None = None) -> dict:
        """The config as the client needs it to build the same model: every JSON value,
        lists and nested sub-configs included, and the dtype the model is *hosted* in."""
        out = _clean_config(cfg.to_diff_dict())
        dtype = dtype or getattr(cfg, "dtype", None)
        if isinstance(dtype, str):
            dtype = DTYPES.get(dtype)
        if dtype in DTYPES.values():
            out["dtype"] = next(k for k, v in DTYPES.items() if v == dtype)
        return out


def output_class(model_class: type[torch.nn.Module], has_lm_head: bool = True) -> type:
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
    from transformers.utils import ModelOutput

    returns = model_class.forward.__annotations__.get("return")
    for candidate in (returns, *getattr(returns, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, ModelOutput):
            return candidate
    return CausalLMOutput if has_lm_head else BaseModelOutput


# ---- the table ---------------------------------------------------------------------------------

def tl_architectures() -> frozenset[str]:
    """TransformerLens 4's architecture table where TL 4 is in use (the server, TL clients);
    elsewhere (a pyvene or hookwire.hf client, a TL 2.x client) the snapshot of it in
    ``tl_architectures.py``, which the test suite checks equals the live table -- importing
    TL only for its table would cost those clients seconds."""
    import sys

    factory = "transformer_lens.factories.architecture_adapter_factory"
    if factory in sys.modules or "transformer_lens.model_bridge" in sys.modules:
        try:
            from transformer_lens.factories.architecture_adapter_factory import (
                SUPPORTED_ARCHITECTURES)
            return frozenset(SUPPORTED_ARCHITECTURES)
        except ImportError:
            pass
    from hookwire.tl_architectures import TL_ARCHITECTURES
    return TL_ARCHITECTURES


def _auto_names(mapping: str) -> dict[str, str]:
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, mapping, {})
    return {k: v for k, v in names.items() if isinstance(v, str)}


@functools.lru_cache(maxsize=1)
def _tables() -> tuple[frozenset, dict, dict]:
    """(causal LM architectures served, base architecture -> its causal family, refusal reason
    per TL architecture that is not served)."""
    import transformers

    tl = tl_architectures()
    causal = _auto_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")        # model_type -> class
    multimodal = set(_auto_names("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES").values()) | \
        set(_auto_names("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES").values())
    kinds = {"seq2seq": set(_auto_names("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES").values()),
             "masked": set(_auto_names("MODEL_FOR_MASKED_LM_MAPPING_NAMES").values())}
    causal_names = set(causal.values())
    # Names transformers exports, without importing every model's module (dir() of its lazy
    # module lists them).
    exported = set(dir(transformers))
    served, refused = set(), {}
    for arch in tl:
        if arch not in exported:
            refused[arch] = (f"transformers {transformers.__version__} has no class "
                             f"{arch} (its checkpoints ship their own modelling code, and "
                             "hookwire never runs a checkpoint's code)")
        elif arch in multimodal:
            refused[arch] = (f"{arch} takes images or audio with the text; hookwire serves "
                             "text-only language models (host the family's text model, e.g. "
                             "its ...ForCausalLM)")
        elif arch in kinds["seq2seq"]:
            refused[arch] = (f"{arch} is an encoder-decoder model; hookwire serves decoder-only "
                             "language models")
        elif arch not in causal_names:
            kind = "a masked language model" if arch in kinds["masked"] else \
                "not a language model over token ids (audio, vision, or a bare encoder)"
            refused[arch] = (f"{arch} is {kind}; hookwire serves decoder-only language models "
                             "whose forward takes token ids")
        else:
            served.add(arch)
    base_models = _auto_names("MODEL_MAPPING_NAMES")
    bases = {base_models[mt]: name for mt, name in causal.items()
             if name in served and mt in base_models and base_models[mt] not in tl
             and base_models[mt] in exported}
    return frozenset(served), bases, refused


def served_architectures() -> frozenset[str]:
    """Causal LM architectures hookwire serves (whose TL bridge is then tried at load)."""
    return _tables()[0]


def base_architectures() -> dict[str, str]:
    """Base model architecture (no LM head) -> the causal LM family it belongs to."""
    return dict(_tables()[1])


def refusal(architecture: str) -> str | None:
    """Why an architecture is not served (None: it is)."""
    served, bases, refused = _tables()
    if architecture in served or architecture in bases:
        return None
    if architecture in refused:
        return refused[architecture]
    return (f"model architecture {architecture!r} is not supported: TransformerLens 4 has no "
            f"bridge for it ({len(served)} decoder-only architectures are served, e.g. "
            f"{', '.join(sorted(served)[:6])}, ...; and their base models, e.g. GPT2Model)")


def family_for_architecture(architecture: str) -> Family:
    reason = refusal(architecture) if isinstance(architecture, str) else "not a string"
    if reason is not None:
        raise UnsupportedModel(reason, architecture=str(architecture)[:100])
    import transformers

    # The name is in the table (checked above): only then is the class looked up.
    model_class = getattr(transformers, architecture)
    return Family(architecture, model_class.config_class, model_class,
                  has_lm_head=architecture not in base_architectures())


def config_from_dict(family: Family, config_dict: dict):
    """The family's config from a dict that may have crossed the wire (cleaned again)."""
    if not isinstance(config_dict, dict):
        raise UnsupportedModel("a model config must be a JSON object")
    values = _clean_config(config_dict, decode=True)
    dtype = config_dict.get("dtype")
    cfg = family.config_class(**values)
    cfg.architectures = [family.architecture]
    if dtype in DTYPES:
        cfg.dtype = DTYPES[dtype]
    return cfg


def build_hf_model(architecture: str, config_dict: dict, *, seed: int | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Build an HF model of a served family from a config dict, in the config's dtype (or
    ``dtype``). With ``device="meta"`` nothing is allocated: that is the clients' weightless
    stand-in. Weights are drawn in float32 from ``seed`` and then cast, so a model built in
    bfloat16 is the float32 one rounded."""
    family = family_for_architecture(architecture)
    cfg = config_from_dict(family, config_dict)
    dtype = dtype or (cfg.dtype if isinstance(cfg.dtype, torch.dtype) else torch.float32)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = family.model_class(cfg)
    if dtype != torch.float32:
        model = model.to(dtype)
    cfg.dtype = dtype
    return model.eval(), cfg


__all__ = ["Family", "DTYPES", "output_class", "family_for_architecture", "build_hf_model", "config_from_dict",
           "served_architectures", "base_architectures", "refusal", "tl_architectures"]
