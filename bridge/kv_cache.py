"""How a transformers model's forward takes and returns its KV cache, across versions.

transformers 5 renamed the argument and the output field from ``past_key_values`` to
``cache``; the old name is a deprecated alias, announced for removal in 5.40. The server's
generation loop, its start-up checks and the client's ``LocalModel`` call the forward
directly, so they ask the forward which name it takes instead of using either one.
"""
from __future__ import annotations

import functools
import inspect


@functools.lru_cache(maxsize=None)
def _cache_argument(forward) -> str:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(forward, kv) -> dict:
    """``{name: kv}``: the keyword ``forward`` (a model class's forward) takes a cache by."""
    return {_cache_argument(getattr(forward, "__func__", forward)): kv}


def returned_cache(output):
    """The KV cache a forward returned (``output.cache``, or ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


__all__ = ["cache_kwargs", "returned_cache"]
