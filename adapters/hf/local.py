"""``LocalModel``: the HF adapter's calls on a local HF model, with plain torch hooks.

It exists so a remote result can be compared with the local one, call for call: the hooks
are registered with ``register_forward_hook`` / ``register_forward_pre_hook`` for one
forward and removed after it, and generation picks tokens with the code the server uses
(:func:`hookwire.generation.next_tokens`)."""
from __future__ import annotations

import contextlib
import secrets

import torch
from transformers import DynamicCache

from hookwire.errors import HookwireError
from hookwire.generation import (GenerateSpec, PaddedPrompts, check_prompt_mask, finish_rows,
                                 make_generator, next_tokens)
from hookwire.kv_cache import cache_kwargs
from hookwire.hf.hooks import hook_list, module_of
from hookwire.hf.outputs import DEFAULT, GenerateOutput, cache_hooks, eos_options


@contextlib.contextmanager
def hooks_registered(model, hooks: list):
    """Register (key, fn) pairs as torch hooks for the duration of one forward."""
    handles = []
    counters: dict = {}

    def counted(key, fn, pre: bool):
        def hook(module, args, *output):
            call = counters.setdefault((key.path, key.kind, id(fn)), [0])
            index = call[0]
            call[0] += 1
            if key.call is not None and index != key.call:
                return None
            return fn(module, args) if pre else fn(module, args, output[0])
        return hook

    try:
        for key, fn in hooks:
            module = module_of(model, key)
            if key.kind == "input":
                handles.append(module.register_forward_pre_hook(counted(key, fn, True)))
            else:
                handles.append(module.register_forward_hook(counted(key, fn, False)))
        yield
    finally:
        for h in handles:
            h.remove()


class LocalModel:
    """A local HF model with the same calls as :class:`hookwire.hf.RemoteModel`
    (``run_with_hooks``, ``run_with_cache``, ``generate``), run with plain torch hooks: what
    a remote result is compared with, call for call."""
    def __init__(self, model: torch.nn.Module):
        self.model = model

    def _call(self, input_ids, **kwargs):
        return self.model(input_ids=input_ids, **kwargs)

    # (``progress`` is RemoteModel's: accepted so one call runs on either; anything else it
    # does not take raises, as RemoteModel does, instead of being dropped)
    def run_with_hooks(self, input_ids, hooks: dict | None = None, *, attention_mask=None,
                       progress=None):
        with torch.no_grad(), hooks_registered(self.model, hook_list(hooks)):
            return self._call(input_ids, use_cache=False, attention_mask=attention_mask)

    def run_with_cache(self, input_ids, modules: list[str], hooks: dict | None = None, *,
                       attention_mask=None, progress=None):
        cache: dict = {}
        with torch.no_grad(), hooks_registered(self.model,
                                               hook_list(hooks) + cache_hooks(modules, cache)):
            return self._call(input_ids, use_cache=False, attention_mask=attention_mask), cache

    def generate(self, input_ids, max_new_tokens: int, hooks: dict | None = None, *,
                 modules: list[str] | None = None, intervene_on: str = "all",
                 do_sample: bool = False, seed: int | None = None, temperature: float = 1.0,
                 top_k: int | None = 50, top_p: float = 1.0, on_token=None,
                 eos_token_id=DEFAULT, pad_token_id=DEFAULT, progress=None, blocking=True,
                 attention_mask=None):
        if intervene_on not in ("prompt", "all"):
            raise HookwireError("intervene_on is 'prompt' or 'all'")
        if do_sample and seed is None:
            seed = secrets.randbits(62)
        spec = GenerateSpec(max_new_tokens=max_new_tokens, do_sample=do_sample, seed=seed,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            **eos_options(self.model, eos_token_id, pad_token_id))
        device = next(self.model.parameters()).device
        generator = make_generator(spec, device)
        listed = hook_list(hooks)
        cache_kv = DynamicCache(config=self.model.config)
        step_input = input_ids.to(device)
        if attention_mask is not None:
            try:
                check_prompt_mask(attention_mask, input_ids)
            except ValueError as exc:
                raise HookwireError(str(exc)) from None
        padded = PaddedPrompts.of(None if attention_mask is None else attention_mask.to(device),
                                  type(self.model).forward)
        new, caches = [], []
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=device)
        with torch.no_grad():
            for k in range(max_new_tokens):
                cache: dict = {}
                active = listed if k == 0 or intervene_on == "all" else []
                with hooks_registered(self.model, active + cache_hooks(modules, cache)):
                    extra = {} if padded is None else \
                        padded.prompt() if k == 0 else padded.step()
                    out = self._call(step_input, use_cache=True,
                                     **cache_kwargs(type(self.model).forward, cache_kv), **extra)
                caches.append(cache)
                token = next_tokens(out.logits[:, -1], spec, generator)
                token, unfinished = finish_rows(token, unfinished, spec)
                new.append(token)
                if on_token is not None:
                    on_token(k, token)
                step_input = token[:, None]
                if not bool(unfinished.any()):
                    break
        result = GenerateOutput(torch.cat([input_ids.to(device), torch.stack(new, 1)], 1),
                                seed=seed)
        for key in modules or ():
            result.cache[key] = [c[key] for c in caches]
        return result


__all__ = ["LocalModel", "hooks_registered"]
