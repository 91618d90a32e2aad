"""What a remote pyvene call takes as ``base`` and ``sources``: what local pyvene takes.

pyvene calls ``model(**base)`` and ``model(**source)``, so any mapping of model keyword
arguments works locally: a plain dict, a tokenizer's ``transformers.BatchEncoding`` (a
``UserDict``, not a dict), an ``OrderedDict``; ``sources`` is one such mapping or a list of
them (``None`` for a group that gets no source). The remote forward runs the served model on
``input_ids`` with an optional 0/1 ``attention_mask`` (any padding side); ``labels`` in the base
give the model's own loss, as locally; ``use_cache`` and keys given as ``None`` change nothing a
caller gets back. Any other model input (``token_type_ids``, ``position_ids``,
``inputs_embeds``, ``past_key_values``, ``output_hidden_states``...) changes what the model
computes or returns in ways the server's forward does not reproduce, so it raises
:class:`UnsupportedInput` naming it, before anything is sent.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from hookwire.errors import HookwireError

_IGNORED = {"use_cache"}   # only decides whether past_key_values come back (they stay None)


class UnsupportedInput(HookwireError):
    """A base or source that the remote forward cannot take as it is."""
    code = "unsupported_input"


@dataclass
class ModelInputs:
    input_ids: torch.Tensor                     # (batch, seq) int64 on the CPU
    attention_mask: torch.Tensor | None         # int64 0/1, None when nothing is padded
    labels: torch.Tensor | None                 # the base's own labels, if it had any
    device: torch.device                        # where the caller's input_ids live


def model_inputs(inputs, what: str) -> ModelInputs:
    if isinstance(inputs, torch.Tensor):
        raise UnsupportedInput(f"{what} is a tensor; pyvene passes inputs to the model as "
                               "keyword arguments, so give a mapping such as "
                               "{'input_ids': ids} or a tokenizer's output", input=what)
    if not isinstance(inputs, Mapping):
        raise UnsupportedInput(f"{what} is a {type(inputs).__name__}; pyvene calls "
                               "model(**inputs), so give a mapping (a dict, or a tokenizer's "
                               "BatchEncoding) with 'input_ids'", input=what)
    given = {k: v for k, v in inputs.items() if v is not None}
    other = sorted(set(given) - {"input_ids", "attention_mask", "labels"} - _IGNORED)
    if other:
        raise UnsupportedInput(
            f"{what}: the model inputs {other} are not supported remotely: the server's forward "
            "takes input_ids, an optional attention_mask and labels. Drop them (for a tokenizer, "
            "e.g. return_token_type_ids=False) if the model does not need them, or run this "
            "call locally with pyvene", input=what, keys=",".join(other))
    ids = given.get("input_ids")
    if ids is None:
        raise UnsupportedInput(f"{what} has no 'input_ids' (remote models take token ids)",
                               input=what)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or \
            ids.is_complex() or ids.dtype == torch.bool:
        got = f"a {ids.dim()}-d {ids.dtype} tensor" if isinstance(ids, torch.Tensor) \
            else type(ids).__name__
        raise UnsupportedInput(f"{what}['input_ids'] is {got}; it must be a (batch, seq) tensor "
                               "of integer token ids (tokenizer(..., return_tensors='pt'))",
                               input=what)
    mask = given.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            raise UnsupportedInput(f"{what}['attention_mask'] must be a tensor shaped like "
                                   f"input_ids {tuple(ids.shape)}", input=what)
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise UnsupportedInput(f"{what}['attention_mask'] must hold only 0 and 1", input=what)
        mask = None if bool((mask == 1).all()) else mask.detach().to("cpu", torch.int64)
    labels = given.get("labels")
    if labels is not None and not isinstance(labels, torch.Tensor):
        raise UnsupportedInput(f"{what}['labels'] must be a tensor", input=what)
    return ModelInputs(ids.detach().to("cpu", torch.int64), mask, labels, ids.device)


__all__ = ["UnsupportedInput", "ModelInputs", "model_inputs"]
