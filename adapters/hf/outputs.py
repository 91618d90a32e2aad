"""What the HF adapter's calls return, the same for the remote and the local model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hookwire.families import output_class
from hookwire.hf.hooks import hook_list


def output_class_of(model) -> type:
    """The model class's own output type (what ``model(input_ids)`` returns)."""
    return output_class(type(model), has_lm_head=model.get_output_embeddings() is not None)


def cache_hooks(modules, cache: dict) -> list:
    """Hooks that store, under each key of ``modules``, what a torch hook there sees: a
    module's output (its tuple, for tuple outputs) or, for ``"path:input"``, its args."""
    hooks = {}
    for key in modules or ():
        if key.partition("@")[0].endswith(":input"):
            def store_args(module, args, key=key):
                cache[key] = args
            hooks[key] = store_args
        else:
            def store_output(module, args, output, key=key):
                cache[key] = output
            hooks[key] = store_output
    return hook_list(hooks)


DEFAULT = object()  # "as the model's generation config says"


def eos_options(model, eos_token_id=DEFAULT, pad_token_id=DEFAULT) -> dict:
    """``eos_token_id`` / ``pad_token_id`` of a generation, as HF's ``generate`` picks them:
    given ones win; otherwise the model's generation config (then its config). ``None`` or
    ``[]`` for ``eos_token_id``: never stop early."""
    config = getattr(model, "generation_config", None)
    if eos_token_id is DEFAULT:
        eos_token_id = getattr(config, "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if pad_token_id is DEFAULT:
        pad_token_id = getattr(config, "pad_token_id", None)
    if eos_token_id is None:
        eos_token_id = []
    elif isinstance(eos_token_id, int):
        eos_token_id = [eos_token_id]
    return {"eos_token_id": [int(t) for t in eos_token_id], "pad_token_id": pad_token_id}


@dataclass
class GenerateOutput:
    """``sequences``: prompt and new tokens ``(batch, seq + new)``, where ``new`` is
    ``max_new_tokens`` unless every row reached an EOS token first (as HF's ``generate``:
    rows that finished earlier are padded with ``pad_token_id``); ``cache``: per key of
    ``modules``, one value per forward that ran (step 0 is the prompt's forward)."""
    sequences: torch.Tensor
    cache: dict = field(default_factory=dict)
    seed: int | None = None


__all__ = ["output_class_of", "cache_hooks", "GenerateOutput", "eos_options", "DEFAULT"]
