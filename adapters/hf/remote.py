"""``RemoteModel``: an HF model served by a hookwire server, hooked by module path.

The client holds a weightless stand-in (the HF model of the served family on the meta device)
so hooks get real module objects and paths are checked before anything is sent. Each call
traces the hooks (:mod:`hookwire.hf.trace_forward`) and runs the graph on the server's plain
HF module tree; values the hooks stored come back into the user's own containers.
"""
from __future__ import annotations

import secrets
import threading

import torch

from hookwire.client import get_connection
from hookwire.errors import HookwireError, UnsupportedModel
from hookwire.families import build_hf_model
from hookwire.generation import check_prompt_mask
from hookwire.hf.generate_request import GenerationRun
from hookwire.hf.hooks import hook_list
from hookwire.hf.outputs import (DEFAULT, GenerateOutput, cache_hooks, eos_options,
                                 output_class_of)
from hookwire.hf.trace_forward import trace_forward
from hookwire.remote_call import RemoteCall, start_in_background


def _input_ids(input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or \
            input_ids.dtype not in (torch.int64, torch.int32):
        raise HookwireError("input_ids must be a (batch, seq) integer tensor")
    return input_ids.detach().to("cpu", torch.int64)


def attention_mask_of(mask, tokens: torch.Tensor) -> torch.Tensor | None:
    """A padded batch's 0/1 mask, as HF's forward takes it: checked here, before sending."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(tokens.shape) or \
            mask.dtype not in (torch.int64, torch.int32, torch.bool) or \
            bool(((mask != 0) & (mask != 1)).any()):
        raise HookwireError(f"attention_mask must be a 0/1 integer or bool tensor shaped like "
                            f"input_ids {tuple(tokens.shape)}")
    return mask.detach().to("cpu", torch.int64)


class RemoteModel:
    """``hhf.RemoteModel("tiny-llama")``: run_with_hooks / run_with_cache / generate on the
    server's model. ``url`` / ``api_key`` default to ``hookwire.configure`` / HOOKWIRE_URL."""

    def __init__(self, name: str, *, url: str | None = None, api_key: str | None = None,
                 progress: bool = False):
        self.name = name
        self._target = (url, api_key)
        self.progress = progress
        self.info = get_connection(url, api_key).model_info(name)
        reason = self.info.unserved.get("hf:*")
        if reason is not None:
            raise UnsupportedModel(f"model {name!r} offers no HF module sites: {reason}")
        self.stand_in, self.config = build_hf_model(self.info.architecture, self.info.config,
                                                    device="meta")
        self.output_class = output_class_of(self.stand_in)

    # ---- the torch-like surface ----------------------------------------------------------
    def get_submodule(self, path: str):
        return self.stand_in.get_submodule(path)

    def named_modules(self):
        return self.stand_in.named_modules()

    # ---- one forward ---------------------------------------------------------------------
    def run_with_hooks(self, input_ids, hooks: dict | None = None, *, attention_mask=None,
                       progress=None):
        """The model's output (``.logits``) with ``hooks`` ({module key: fn}) applied, as a
        local forward with the same functions registered as torch hooks (``attention_mask``:
        a padded batch's, passed to the model's forward as HF takes it)."""
        return self._forward(input_ids, hook_list(hooks), progress, attention_mask)

    def run_with_cache(self, input_ids, modules: list[str], hooks: dict | None = None, *,
                       attention_mask=None, progress=None):
        """(output, {key: what a forward hook on that module sees -- after ``hooks``})."""
        cache: dict = {}
        listed = hook_list(hooks) + cache_hooks(modules, cache)
        return self._forward(input_ids, listed, progress, attention_mask), cache

    def _refuse_module_hooks(self) -> None:
        """Hooks registered on the stand-in's own modules (``register_forward_hook``) would
        never run: the stand-in is weightless and never runs a forward. Refused, naming
        where, instead of being ignored."""
        for path, module in self.stand_in.named_modules():
            if module._forward_hooks or module._forward_pre_hooks or \
                    module._backward_hooks or module._backward_pre_hooks:
                raise HookwireError(
                    f"a torch hook is registered on the stand-in's module {path or '(root)'!r}"
                    ": remote runs do not run hooks registered on the stand-in; remove it "
                    "and pass it to the call instead: run_with_hooks(input_ids, "
                    f"hooks={{{path!r}: fn}}) (or {{{path + ':input'!r}: fn}} for a "
                    "pre-hook)")

    def _forward(self, input_ids, hooks, progress, attention_mask=None):
        self._refuse_module_hooks()
        tokens = _input_ids(input_ids)
        mask = attention_mask_of(attention_mask, tokens)
        batch, seq = tokens.shape
        traced = trace_forward(self.info, self.stand_in, batch, seq, hooks)
        tr = traced.tracer
        inputs, tensors = {"input_ids": "input_ids"}, {"input_ids": tokens}
        if mask is not None:
            inputs["attention_mask"] = "attention_mask"
            tensors["attention_mask"] = mask
        graph = {"version": 1, "model": self.name, "inputs": inputs,
                 "constants": list(tr.constants), "sites": tr.sites, "nodes": tr.nodes,
                 "saves": tr.saves,
                 # the plain HF forward even without hooks: a mask means what it does locally
                 "forward": {"return_type": "logits", "hf_forward": True}}
        call = RemoteCall(self.name, graph, {**tensors, **tr.constants},
                          destinations=traced.destinations, tracers=[tr],
                          progress=self.progress if progress is None else progress)
        result = call.send(get_connection(*self._target))
        # logits, or a base model's last_hidden_state: what the local model returns
        return self.output_class(**{self.info.output: result.values["__logits__"]})

    # ---- generation ----------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int, hooks: dict | None = None, *,
                 modules: list[str] | None = None, intervene_on: str = "all",
                 do_sample: bool = False, seed: int | None = None, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float = 1.0, on_token=None,
                 eos_token_id=DEFAULT, pad_token_id=DEFAULT, blocking: bool = True,
                 attention_mask=None):
        """Generate up to ``max_new_tokens`` tokens with the KV cache, on the server -- as
        HF's ``model.generate`` does with the same functions registered as torch hooks.

        ``hooks`` apply to every forward (``intervene_on="all"``, the default: torch hooks
        fire at every step of HF's generate) or to the prompt's forward only
        (``"prompt"``); ``modules`` are cached at every forward: ``.cache[key]`` is a list
        with one value per forward (step). Generation stops when every row has produced an
        EOS token (``eos_token_id``, by default the model's generation config; ``None``:
        never), rows that finished earlier being padded with ``pad_token_id``, as HF does.
        ``attention_mask``: prompts of different lengths, padded (on the left, as HF's
        generate wants decoder-only prompts): each forward gets the mask and positions HF's
        generate derives from it. ``on_token(step, tokens)`` is called with each new token (one per row) as soon as the
        server sends it. ``blocking=False`` returns a ``RemoteRun`` whose ``events()`` yield
        them (and ``result()`` the output). Sampling (``do_sample``) is HF's (temperature,
        top_k, top_p) with draws from a generator seeded with ``seed`` (a random one if None:
        see ``.seed`` of the output)."""
        if intervene_on not in ("prompt", "all"):
            raise HookwireError("intervene_on is 'prompt' or 'all'")
        self._refuse_module_hooks()
        if self.info.generate_refused is not None:
            raise UnsupportedModel(f"model {self.name!r} cannot generate on the server: "
                                   f"{self.info.generate_refused}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise HookwireError("max_new_tokens must be a positive int")
        if do_sample and seed is None:
            seed = secrets.randbits(62)
        tokens = _input_ids(input_ids)
        mask = attention_mask_of(attention_mask, tokens)
        if mask is not None:
            try:
                check_prompt_mask(mask, tokens)
            except ValueError as exc:
                raise HookwireError(str(exc)) from None
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed,
                       temperature=temperature, top_k=top_k, top_p=top_p,
                       **eos_options(self.stand_in, eos_token_id, pad_token_id))
        gen = GenerationRun(self, tokens, hook_list(hooks), modules or [], intervene_on,
                            options, mask)
        if blocking:
            return gen.run(on_token=on_token)
        traced = threading.Event()
        return start_in_background(
            lambda run: gen.run(on_token=on_token, run=run, traced=traced), traced)


__all__ = ["RemoteModel", "GenerateOutput"]
