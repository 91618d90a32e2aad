"""Generation with interventions: what a request asks for, and how a next token is chosen.

A generate request is an ordinary submit whose ``graph`` is traced for the prompt's forward,
plus a :class:`GenerateSpec`: the options below and one graph per later forward (each new
token's forward, with the model's KV cache) when hooks intervene on every step. The server
runs forward 0 on the prompt, then forwards 1 .. max_new_tokens-1 on one token each, and
streams every chosen token back (a result named ``token_name(k)``) as soon as it exists; a
value graph k saves comes back as ``step_name(k, name)``.

The token choice is here, in the core, so that a local run (``hookwire.hf.LocalModel``) and the
server pick tokens with exactly the same code. It is what HF's ``generate`` does for greedy
search and for sampling with its default warpers, in its order: temperature, top-k, top-p,
then one draw from a ``torch.Generator`` seeded with ``seed`` (HF draws from torch's global
generator: ``torch.manual_seed(seed)`` before a local ``model.generate`` gives the same draws).
"""
from __future__ import annotations

import functools
import inspect

import torch
from pydantic import BaseModel, ConfigDict, Field

from hookwire.ir import Graph

TOKEN_PREFIX = "__token__"
STEP_SEPARATOR = "/"


class GenerateSpec(BaseModel):
    """``Submit.generate``: how many tokens, how to choose them (greedy, or sampling with
    HF's temperature / top-k / top-p and a seed), when rows stop (EOS, pad), and the graphs
    of the later forwards (``steps``)."""
    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(ge=1, le=1 << 20)
    do_sample: bool = False
    seed: int | None = Field(default=None, ge=0, le=(1 << 63) - 1)
    temperature: float = Field(default=1.0, gt=0.0, le=1e4)
    top_k: int | None = Field(default=50, ge=0, le=1 << 24)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    # Graphs of forwards 1, 2, ... (one new token each); forward 0 is the submit's ``graph``.
    # Empty: hooks intervene on the prompt only; the later forwards run untouched.
    steps: list[Graph] = Field(default_factory=list, max_length=1 << 16)
    # As HF's generate: a row that chose one of these is finished (later tokens of it are
    # ``pad_token_id``), and generation stops once every row is. Empty: never stop early.
    eos_token_id: list[int] = Field(default_factory=list, max_length=64)
    pad_token_id: int | None = Field(default=None, ge=0)


def token_name(step: int) -> str:
    return f"{TOKEN_PREFIX}{step}"


def step_name(step: int, name: str) -> str:
    return f"{step}{STEP_SEPARATOR}{name}"


def parse_step_name(name: str) -> tuple[int, str] | None:
    """``"3/acts"`` -> (3, "acts"); None for names that are not a step's save."""
    step, sep, rest = name.partition(STEP_SEPARATOR)
    return (int(step), rest) if sep and step.isdigit() else None


def _top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1:]
    return scores.masked_fill(scores < kth, float("-inf"))


def _top_p(scores: torch.Tensor, p: float) -> torch.Tensor:
    # Drop the least likely tokens whose total probability is at most 1 - p (keeping one).
    ascending, order = torch.sort(scores, descending=False)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1 - p)
    drop[..., -1:] = False
    return scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def next_tokens(logits: torch.Tensor, spec: GenerateSpec,
                generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row, from the last position's logits ``(batch, vocab)``."""
    scores = logits.to(torch.float32)
    if not spec.do_sample:
        return scores.argmax(dim=-1)
    if spec.temperature != 1.0:
        scores = scores / spec.temperature
    if spec.top_k:
        scores = _top_k(scores, spec.top_k)
    if spec.top_p < 1.0:
        scores = _top_p(scores, spec.top_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def finish_rows(tokens: torch.Tensor, unfinished: torch.Tensor, spec: GenerateSpec
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's end-of-sequence rule for one step: rows already finished get the pad token; rows
    that chose an EOS token are finished from now on. Returns (tokens, unfinished)."""
    if not spec.eos_token_id:
        return tokens, unfinished
    pad = spec.pad_token_id if spec.pad_token_id is not None else spec.eos_token_id[0]
    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, pad))
    eos = torch.tensor(spec.eos_token_id, device=tokens.device)
    return tokens, unfinished & ~torch.isin(tokens, eos)


class PaddedPrompts:
    """The attention mask and position ids of each forward of a generation from padded
    prompts, as HF's ``generate`` makes them from the prompts' ``attention_mask`` (and
    ``position_ids``, where the caller passes them, as nnsight does for a padded batch):
    positions count each row's tokens from its first one (``mask.cumsum(-1) - 1``, 0 at
    padding) unless given; each step appends a 1 to every row's mask and takes the next
    position. An all-ones mask is left out, as HF's generate leaves it out; a model whose
    forward takes no ``position_ids`` gets none (HF passes none either)."""

    def __init__(self, mask: torch.Tensor | None, positions: torch.Tensor,
                 takes_positions: bool):
        self.mask, self.positions, self.takes_positions = mask, positions, takes_positions

    @classmethod
    def of(cls, mask: torch.Tensor | None, forward,
           positions: torch.Tensor | None = None) -> "PaddedPrompts | None":
        """None where nothing is padded and no positions are given: the forwards then take
        neither (as they do from HF's generate)."""
        if mask is not None:
            mask = mask.to(torch.int64)
            if bool(mask.all()):
                mask = None
        if positions is None:
            if mask is None:
                return None
            positions = (mask.cumsum(-1) - 1).masked_fill(mask.eq(0), 0)
        return cls(mask, positions.to(torch.int64),
                   _takes_positions(getattr(forward, "__func__", forward)))

    def prompt(self) -> dict:
        """Keyword arguments of the prompt's forward."""
        return self._kwargs(self.positions)

    def step(self) -> dict:
        """Keyword arguments of the next one-token forward."""
        if self.mask is not None:
            self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))],
                                  dim=-1)
        self.positions = self.positions[:, -1:] + 1
        return self._kwargs(self.positions)

    def _kwargs(self, positions) -> dict:
        out = {} if self.mask is None else {"attention_mask": self.mask}
        if self.takes_positions:
            out["position_ids"] = positions
        return out


@functools.lru_cache(maxsize=None)
def _takes_positions(forward) -> bool:
    try:
        return "position_ids" in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def check_prompt_mask(mask: torch.Tensor, input_ids: torch.Tensor) -> None:
    """A generation's ``attention_mask``: 0/1, shaped like the prompts, every row with at
    least one token (a row of padding only has nothing to continue)."""
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(input_ids.shape) or \
            mask.dtype not in (torch.int64, torch.int32, torch.bool) or \
            bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("attention_mask must be a 0/1 int or bool tensor shaped like the "
                         f"prompts {tuple(input_ids.shape)}")
    if mask.numel() and not bool(mask.to(torch.bool).any(dim=-1).all()):
        raise ValueError("attention_mask has a row with no token (all padding): it has "
                         "nothing to continue")


def make_generator(spec: GenerateSpec, device) -> torch.Generator | None:
    if not spec.do_sample:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(spec.seed if spec.seed is not None else 0)
    return gen


__all__ = ["GenerateSpec", "next_tokens", "make_generator", "token_name", "step_name",
           "parse_step_name", "TOKEN_PREFIX", "finish_rows", "PaddedPrompts", "check_prompt_mask"]
