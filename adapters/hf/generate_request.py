"""One remote ``generate``: trace a graph per forward, send them as one request, take the
tokens as they stream back, and put the values hooks stored where the hooks stored them.

Forward 0 reads the prompt, forward k >= 1 the k-th new token (with the server's KV cache).
Hooks are traced once per forward they run in, so a hook that appends to a list appends once
per step, as it does locally."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from hookwire.client import get_connection
from hookwire.errors import TraceError
from hookwire.generation import TOKEN_PREFIX, step_name
from hookwire.ir import rename_constants
from hookwire.hf.outputs import GenerateOutput, cache_hooks
from hookwire.hf.trace_forward import trace_forward
from hookwire.rebind import discard
from hookwire.remote_call import Destinations, RemoteCall


@dataclass
class TokenEvent:
    """A new token for every row, as soon as the server chose it (``step`` 0 is the first)."""
    step: int
    tokens: torch.Tensor


class GenerationRun:
    """One remote ``generate`` call: traces a graph per forward (``_trace``), sends them as
    one generate request, hands tokens to ``on_token`` as they stream back, and puts the
    values the hooks stored where they stored them (taking back those of forwards that never
    ran, when generation stopped early)."""
    def __init__(self, model, tokens: torch.Tensor, hooks: list, modules: list[str],
                 intervene_on: str, options: dict, mask: torch.Tensor | None = None):
        self.model, self.tokens, self.hooks, self.mask = model, tokens, hooks, mask
        self.modules, self.intervene_on, self.options = list(modules), intervene_on, options

    def _trace(self):
        """(graph per forward, tensors, where the request's values go, where each forward's
        go, cache dict per forward, the forwards' tracers)."""
        model = self.model
        batch, seq = self.tokens.shape
        steps = self.options["max_new_tokens"]
        per_step = self.intervene_on == "all" or bool(self.modules)
        graphs, step_destinations, caches = [], [], []
        destinations = Destinations()
        tensors = {"input_ids": self.tokens}
        prompt_inputs = {"input_ids": "input_ids"}
        if self.mask is not None:  # padded prompts: the server derives each forward's
            tensors["attention_mask"] = self.mask  # mask and positions from it
            prompt_inputs["attention_mask"] = "attention_mask"
        # id(captured tensor) -> constant id: a tensor the hooks capture (a steering vector)
        # is attached once, however many forwards use it. (The tracers keep them alive.)
        shared: dict[int, str] = {}
        alive = []  # the tracers hold those tensors: no id is reused while we look them up
        for k in range(steps if per_step else 1):
            cache: dict = {}
            hooks = self.hooks if k == 0 or self.intervene_on == "all" else []
            traced = trace_forward(model.info, model.stand_in, batch, seq if k == 0 else 1,
                                   hooks + cache_hooks(self.modules, cache), cached=True)
            tr = traced.tracer
            alive.append(tr)
            names = tr.export_constants(f"s{k}_", tensors, shared)
            graphs.append({"version": 1, "model": model.name,
                           "inputs": prompt_inputs if k == 0 else {},
                           "constants": sorted(set(names.values())), "sites": tr.sites,
                           "nodes": rename_constants(tr.nodes, names), "saves": tr.saves,
                           "forward": {"return_type": None}})
            # Forward k's save ``name`` comes back as ``k/name``.
            destinations.extend(traced.destinations, functools.partial(step_name, k))
            step_destinations.append(traced.destinations)
            caches.append(cache)
        if self.options["do_sample"] and any(tr.caller_draws for tr in alive):
            # Locally, HF's sampling and the hooks' torch.randn_like draw from one generator,
            # step after step; the server samples from `seed`, and the hooks' noise was
            # drawn here while tracing: the tokens would silently differ from local.
            raise TraceError(
                "a hook draws random numbers from torch's generator (torch.randn_like, "
                "rand_like, normal_, dropout...) in a sampled generation (do_sample=True): "
                "locally those draws interleave with the sampling's own, which the server "
                "cannot replay. Use hookwire.randn_like(x, seed=...) / hookwire.rand_like "
                "(drawn on the server, the same locally), or greedy decoding")
        return graphs, tensors, destinations, step_destinations, caches, alive

    def run(self, on_token=None, run=None, traced=None) -> GenerateOutput:
        graphs, tensors, destinations, step_destinations, caches, tracers = self._trace()
        spec = {**self.options, "steps": graphs[1:]}
        if traced is not None:
            traced.set()
        steps = self.options["max_new_tokens"]
        new_tokens: list = [None] * steps

        def on_value(name, value):
            if name.startswith(TOKEN_PREFIX):
                step = int(name[len(TOKEN_PREFIX):])
                new_tokens[step] = value
                if on_token is not None:
                    on_token(step, value)
                if run is not None:
                    run.emit(TokenEvent(step, value))

        # Progress counts forwards (steps); a non-blocking run's events are the server's
        # messages and the tokens (TokenEvent), and the values are put in place at the end.
        call = RemoteCall(self.model.name, graphs[0], tensors, destinations=destinations,
                          tracers=tracers, n_sites=steps, progress=self.model.progress,
                          submit_extra={"generate": spec}, announce_values=False)
        call.send(get_connection(*self.model._target), run=run, on_value=on_value)
        # Every row reached EOS before max_new_tokens: the later forwards never ran, so what
        # their hooks stored (traced in advance) is taken back out of the user's lists and
        # dicts, as if those hooks had never been called -- as locally.
        ran = next((k for k, t in enumerate(new_tokens) if t is None), steps)
        discard([p for d in step_destinations[ran:] for p in d.proxies()])
        out = GenerateOutput(torch.cat([self.tokens, torch.stack(new_tokens[:ran], dim=1)],
                                       dim=1), seed=self.options.get("seed"))
        for key in self.modules:
            out.cache[key] = [c[key] for c in caches[:ran]]
        return out


__all__ = ["GenerationRun", "TokenEvent"]
