"""One remote ``with model.generate(...)`` block: a graph per forward, one generate request.

Locally nnsight runs HF's ``generate``: the streamer module gets the prompt, then every forward
(the prompt's, then one per new token, with the KV cache) hands over its modules' values, the
streamer gets each new token, and the ``generator`` module the finished ids (``tracer.result``).
Here the same handoffs are made in that order (``tracer.iter[...]`` and ``tracer.all()`` work as
locally: nnsight counts the visits), each forward recording its own graph; the server runs
them as one generate request (:mod:`hookwire.generation`) with its KV cache and picks the tokens
-- greedily, or sampling as HF does with a seed. Tokens are :class:`PendingTokens` while the
block runs (they can be saved, not computed with) and real ids afterwards.

The server generates every one of ``max_new_tokens``; where HF would have stopped at an EOS
token, the returned ids are made what HF returns (a finished row continues with the pad token,
and the ids end once every row has finished), with a warning that the later steps' values come
from forwards a local run would not have made.
"""
from __future__ import annotations

import inspect
import sys
import warnings

import torch
from nnsight.intervention.source import NO_SKIP

from hookwire.generation import TOKEN_PREFIX, parse_step_name
from hookwire.ir import rename_constants
from hookwire.nnsight.forward import ForwardDriver
from hookwire.nnsight.trace_job import model_inputs, real_inputs
from hookwire.nnsight.values import PendingTokens
from hookwire.trace import Tracer, trace_error, tracing

SAMPLING = ("do_sample", "temperature", "top_k", "top_p")
# Generation options HF accepts that the server's token choice does not implement: allowed
# only at the value that makes them do nothing.
_INERT = {"num_beams": (1, None), "num_return_sequences": (1, None),
          "repetition_penalty": (1.0, None), "no_repeat_ngram_size": (0, None),
          "min_new_tokens": (0, None), "min_length": (0, None), "typical_p": (1.0, None),
          "epsilon_cutoff": (0.0, None), "eta_cutoff": (0.0, None), "min_p": (None,),
          "use_cache": (True, None), "output_scores": (False, None),
          "return_dict_in_generate": (False, None), "bad_words_ids": (None,),
          "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
          "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
          "length_penalty": (1.0, None), "diversity_penalty": (0.0, None)}


class GenerationJob:
    """A ``model.generate`` block traced into one graph per forward."""

    def __init__(self, envoy, target):
        self.envoy, self.target, self.info = envoy, target, target.info
        self.tracers: list[Tracer] = [Tracer()]
        self.escaped: list[list] = []
        self.prompt: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # padded prompts' attention_mask
        self.positions: torch.Tensor | None = None  # and position ids, where given
        self.spec: dict | None = None
        self.tokens: list[PendingTokens] = []     # the token of each step (streamer)
        self.step_inputs: list[PendingTokens] = []   # input_ids of forwards 1, 2, ...
        self.sequences: PendingTokens | None = None
        self.eos: list[int] = []
        self.pad: int | None = None

    # ---- tracing --------------------------------------------------------------------------
    def _options(self, kwargs: dict, seq: int) -> dict:
        config = getattr(self.envoy._module, "generation_config", None)

        def default(name, fallback):
            value = kwargs.pop(name, None)
            if value is None:
                value = getattr(config, name, None)
            return fallback if value is None else value

        if kwargs.get("streamer") is not None:
            raise trace_error("a streamer of your own in a remote generation",
                              "read model.generator.streamer.output in the block instead")
        kwargs.pop("streamer", None)
        for name, inert in _INERT.items():
            if name in kwargs and kwargs.pop(name) not in inert:
                raise trace_error(f"generate({name}=...) remotely",
                                  "the server generates greedily or samples (do_sample, "
                                  "temperature, top_k, top_p, seed=); other options are not "
                                  "supported")
        new = kwargs.pop("max_new_tokens", None) or getattr(config, "max_new_tokens", None)
        if new is None:
            length = kwargs.pop("max_length", None) or getattr(config, "max_length", None)
            if length is None:
                # HF's default when no length is set: 20 new tokens, within the positions the
                # model has (transformers 5 leaves max_length None until generate runs).
                limit = getattr(getattr(self.envoy._module, "config", None),
                                "max_position_embeddings", None)
                length = seq + 20 if limit is None else min(seq + 20, limit)
            new = length - seq
        options = {"max_new_tokens": int(new), "do_sample": bool(default("do_sample", False)),
                   "temperature": float(default("temperature", 1.0)),
                   "top_k": default("top_k", 50), "top_p": float(default("top_p", 1.0))}
        seed = kwargs.pop("seed", None)
        if options["do_sample"] and seed is None:
            # From torch's generator: torch.manual_seed makes remote sampling reproducible.
            seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        options["seed"] = seed
        eos = default("eos_token_id", None)
        self.eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        pad = default("pad_token_id", None)
        self.pad = pad if pad is not None else (self.eos[0] if self.eos else None)
        return options

    def _module_call(self, location: str, args: tuple, value):
        """The handoffs of a module that runs on the client's side of generation (nnsight's
        generator and streamer): it hands over what the server will choose."""
        il = self.envoy.interleaver
        given = (args, {})
        if il.handle(f"{location}.input", given) is not given:
            raise trace_error(f"changing the input of {location}",
                              "generated tokens cannot be edited remotely")
        if il.handle(f"{location}.skip", NO_SKIP) is not NO_SKIP:
            raise trace_error(f"skipping {location}", "generated tokens cannot be edited "
                              "remotely")
        if il.handle(f"{location}.output", value) is not value:
            raise trace_error(f"replacing {location}.output",
                              "generated tokens cannot be edited remotely")
        return value

    def trace(self, nn_tracer) -> None:
        target = self.target
        original = nn_tracer.fn
        root = target.root

        def generate(*args, **kwargs):
            args, kwargs = real_inputs(self.envoy, original, args, kwargs)
            kwargs = dict(kwargs)
            given = kwargs.get("input_ids", args[0] if args else None)
            seq = given.shape[-1] if isinstance(given, torch.Tensor) else 0
            self.spec = self._options(kwargs, seq)
            inputs = model_inputs(args, kwargs, "generation")
            # Prompts of different lengths come left-padded with their attention_mask (and
            # the position ids nnsight derives from it); the server gives each forward the
            # mask and positions HF's generate would.
            self.mask = inputs.get("attention_mask")
            self.positions = inputs.get("position_ids")
            self.prompt = ids = inputs["input_ids"]
            batch, seq = ids.shape
            n = self.spec["max_new_tokens"]
            streamer = f"{root}.generator.streamer"
            # HF's generate computes the prompt's logits at its last position only.
            forward_params = inspect.signature(type(self.envoy._module).forward).parameters
            last_only = target.lm_head if "logits_to_keep" in forward_params else None
            self._module_call(streamer, (ids,), ids)
            for k in range(n):
                if k == len(self.tracers):
                    self.tracers.append(Tracer())
                hw = self.tracers[k]
                hw.parameters = target.parameters
                if k:
                    self.step_inputs.append(PendingTokens(
                        (batch, 1), f"the input ids of generation step {k}"))
                step_ids = ids if k == 0 else self.step_inputs[-1]
                with tracing(hw):
                    ForwardDriver(self.info, self.envoy.interleaver, hw, target.events, batch,
                                  seq if k == 0 else 1, root=root, cached=True,
                                  output_cls=target.output_cls, lm_head=target.lm_head,
                                  logits="lm_head", last_only=last_only if k == 0 else None
                                  ).run((), {"input_ids": step_ids})
                token = PendingTokens((batch,), f"the token of generation step {k}")
                self.tokens.append(token)
                self._module_call(streamer, (token,), token)
            self.sequences = PendingTokens((batch, seq + n), "the generated ids")
            return self._module_call(f"{root}.generator", (self.sequences,), self.sequences)

        generate.__name__ = "generate"
        generate._hookwire = True
        nn_tracer.fn = generate
        try:
            with torch.no_grad(), tracing(self.tracers[0]):   # HF's generate is no_grad
                nn_tracer.execute(nn_tracer.info.code)
        except BaseException:
            self.abandon()
            raise
        for k, hw in enumerate(self.tracers):
            escaped = hw.escaped()
            for i, proxy in enumerate(escaped):
                hw.save(f"__escaped_{i}", proxy)
            self.escaped.append(escaped)

    # ---- the request ----------------------------------------------------------------------
    def _graphs(self) -> tuple[list[dict], dict]:
        tensors = {"input_ids": self.prompt}
        prompt_inputs = {"input_ids": "input_ids"}
        for key, value in (("attention_mask", self.mask), ("position_ids", self.positions)):
            if value is not None:
                tensors[key] = value
                prompt_inputs[key] = key
        shared: dict[int, str] = {}   # one upload for a tensor several forwards capture
        graphs = []
        for k, hw in enumerate(self.tracers):
            names = hw.export_constants(f"s{k}_", tensors, shared)
            graphs.append({"version": 1, "model": self.info.name,
                           "inputs": prompt_inputs if k == 0 else {},
                           "constants": sorted(set(names.values()) | hw.parameter_refs),
                           "sites": hw.sites,
                           "nodes": rename_constants(hw.nodes, names), "saves": hw.saves,
                           "forward": {"return_type": None}})
        return graphs, tensors

    def pending_ids(self) -> set[int]:
        ids = {id(t) for t in self.tokens + self.step_inputs}
        if self.sequences is not None:
            ids.add(id(self.sequences))
        return ids | {id(p) for step in self.escaped for p in step}

    def user_refs(self) -> dict[int, int]:
        """id -> references the caller's code holds, for each proxy and pending token."""
        refs: dict[int, int] = {}
        for hw in self.tracers:
            refs.update(hw.user_refs)
        for kept in (self.tokens, self.step_inputs):
            for t in kept:   # our list's reference, the loop's and getrefcount's own
                refs[id(t)] = sys.getrefcount(t) - 3
        if self.sequences is not None:   # our attribute and getrefcount's own
            refs[id(self.sequences)] = sys.getrefcount(self.sequences) - 2
        return refs

    def progress_total(self) -> int:
        return self.spec["max_new_tokens"] if self.spec else 1

    def request(self) -> tuple[dict, dict, dict | None] | None:
        """(graph of the prompt's forward, tensors, the generate fields) to send, or None:
        nothing to run."""
        if self.prompt is None:
            return None
        graphs, tensors = self._graphs()
        n = self.spec["max_new_tokens"]
        steps = graphs[1:n] if any(g["sites"] or g["nodes"] for g in graphs[1:]) else []
        steps += [_empty(self.info.name)] * ((n - 1 - len(steps)) if steps else 0)
        return graphs[0], tensors, {"generate": {**self.spec, "steps": steps}}

    def abandon(self) -> None:
        for hw in self.tracers:
            hw.closed = True

    def replacements(self, values: dict) -> tuple[list, list]:
        if self.prompt is None:
            return [], []
        n = self.spec["max_new_tokens"]
        raw = [values[f"{TOKEN_PREFIX}{k}"] for k in range(n)]
        tokens, stopped = _stop_at_eos(raw, self.eos, self.pad)
        if stopped is not None:
            warnings.warn(f"every row of the generation ended (EOS) at step {stopped}, where a "
                          "local run stops; the server generated all max_new_tokens, so tokens "
                          "and values of later steps come from forwards a local run would not "
                          "make", stacklevel=2)
        steps = tokens + raw[len(tokens):]
        olds = self.tokens + self.step_inputs + [self.sequences]
        news = steps + [t[:, None] for t in steps[:-1]] + \
            [torch.cat([self.prompt, torch.stack(tokens, dim=1)], dim=1)]
        for name, value in values.items():
            parsed = parse_step_name(name)
            if parsed is None or not parsed[1].startswith("__escaped_"):
                continue
            olds.append(self.escaped[parsed[0]][int(parsed[1][len("__escaped_"):])])
            news.append(value)
        self.tokens, self.step_inputs, self.sequences, self.escaped = [], [], None, []
        return olds, news


def _empty(model: str) -> dict:
    return {"version": 1, "model": model, "inputs": {}, "constants": [], "sites": [],
            "nodes": [], "saves": {}, "forward": {"return_type": None}}


def _stop_at_eos(tokens: list, eos: list[int], pad):
    """HF's EOS stopping applied to the tokens the server chose: (tokens as HF returns them,
    the step at which every row had ended, or None)."""
    if not eos:
        return tokens, None
    eos_ids = torch.tensor(eos)
    unfinished = torch.ones_like(tokens[0], dtype=torch.bool)
    out = []
    for k, token in enumerate(tokens):
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        out.append(token)
        unfinished &= ~torch.isin(token, eos_ids)
        if not bool(unfinished.any()):
            return out, (k if k < len(tokens) - 1 else None)
    return out, None


__all__ = ["GenerationJob"]
