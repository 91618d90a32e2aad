"""Integer values the model indexes with are checked before it indexes.

An out-of-range token or position id makes an embedding raise -- on CPU an ``IndexError``
that fails the whole batched forward, on CUDA a device-side assert that poisons the
process's CUDA context for every user. Two layers keep one member's ids from hurting anyone
else:

* :func:`value_ranges` finds, for every integer site of a model, the range its values must
  lie in (the size of the embedding they index); the interleaver checks a graph's writes into
  such a site against it, so the writer alone fails, before the forward goes on
  (``hookwire.executor.Interleaver``).
* :func:`embeddings_guarded` checks every embedding's input during a server forward, whatever
  wrote it; a bad index raises :class:`IndexOutOfRange` instead of reaching the kernel (the
  worker then runs the batch again without the members that wrote).
"""
from __future__ import annotations

import contextlib
import weakref

import torch

from hookwire.errors import ExecutionError
from hookwire.module_sites import is_module_site, parse_module_site


class IndexOutOfRange(ExecutionError, IndexError):
    """An embedding was about to index outside its table (an ``IndexError`` too, as the
    model itself would raise on the CPU)."""


def _embedding(module) -> torch.nn.Embedding | None:
    if isinstance(module, torch.nn.Embedding):
        return module
    inner = getattr(module, "original_component", None)  # a TL 4 bridge component
    return inner if isinstance(inner, torch.nn.Embedding) else None


def _module(root, path: str):
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        return None


def value_ranges(sites, bridge, hf_model=None) -> dict[str, tuple[int, int]]:
    """site name -> [low, high) for every integer site whose values index an embedding:
    a TL ``<component>.hook_in`` of an embedding component, an HF ``<embedding>:input``, and
    the input ids of the HF model (or its base model) itself."""
    out = {}
    for site in sites:
        if site.dtype.is_floating_point or site.dtype == torch.bool:
            continue
        table = None
        if is_module_site(site.name):
            path, kind = parse_module_site(site.name)
            module = _module(hf_model, path) if hf_model is not None else None
            if kind == "input" and module is not None:
                table = _embedding(module)
                if table is None and hasattr(module, "get_input_embeddings"):
                    table = module.get_input_embeddings()  # the model's own input ids
        elif site.name.endswith(".hook_in"):
            table = _embedding(_module(bridge, site.name[:-len(".hook_in")]))
        if isinstance(table, torch.nn.Embedding):
            out[site.name] = (0, int(table.num_embeddings))
    return out


def _check(module, args, kwargs):
    ids = args[0] if args else kwargs.get("input")
    if isinstance(ids, torch.Tensor) and ids.numel() and not ids.is_floating_point():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= module.num_embeddings:
            raise IndexOutOfRange(f"an embedding of {module.num_embeddings} rows was handed "
                                  f"ids in [{low}, {high}]", rule="value_range")


# root module -> its embeddings. A hosted model's module tree is fixed once it is loaded, and
# walking it is most of this guard's cost (~2 ms a forward on gpt2-small's 800 modules).
_EMBEDDINGS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _embeddings(root) -> tuple:
    found = _EMBEDDINGS.get(root)
    if found is None:
        found = _EMBEDDINGS[root] = tuple(m for m in root.modules()
                                          if isinstance(m, torch.nn.Embedding))
    return found


@contextlib.contextmanager
def embeddings_guarded(*roots):
    """Check the input of every embedding under ``roots`` for the duration (a server
    forward): a pre-hook, removed afterwards."""
    handles, seen = [], set()
    try:
        for root in roots:
            if root is None:
                continue
            for module in _embeddings(root):
                if id(module) not in seen:
                    seen.add(id(module))
                    handles.append(module.register_forward_pre_hook(_check, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


__all__ = ["IndexOutOfRange", "value_ranges", "embeddings_guarded"]
