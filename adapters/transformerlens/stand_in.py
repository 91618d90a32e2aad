"""``RemoteModel(name)``: a TL 4 ``TransformerBridge`` with no weights (meta device), built
from what the server sends -- config (every value, lists and sub-configs included, and the
dtype the model is hosted in), architecture (looked up in hookwire's family table) and
tokenizer files. Hook names, aliases, ``cfg`` (``cfg.dtype`` included),
``to_tokens``/``to_string`` are TL's own. ``RemoteHookedTransformer(name)``: the same as a
TL 2.x ``HookedTransformer`` (see legacy.py)."""
from __future__ import annotations

import contextlib
import functools
import sys
import threading

import torch

from hookwire.client import get_connection
from hookwire.errors import HookwireError, UnsupportedModel
from hookwire.families import build_hf_model, refusal
from hookwire.tokenizer import tokenizer_from_files
from hookwire.transformerlens.legacy import legacy_config_kwargs
from hookwire.transformerlens.remote_run import RemoteTarget, remote_forward
from hookwire.transformerlens.weights import guard_weightless

# What TL offers that needs a tokenizer: on a stand-in of a model served without one, each
# raises a clear error instead of TL's assertion.
_TOKENIZER_METHODS = ("to_tokens", "to_string", "to_str_tokens", "to_single_token",
                      "to_single_str_token", "get_token_position", "tokens_to_residual_directions")


def RemoteModel(name: str, url: str | None = None, api_key: str | None = None):
    """A weightless TL model of the server's ``name``: a TL 4 bridge, or, where TL has no
    bridges (TL 2.x), a legacy ``HookedTransformer`` (see :func:`RemoteHookedTransformer`)."""
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError:
        return RemoteHookedTransformer(name, url, api_key)

    conn = get_connection(url, api_key)
    info = conn.model_info(name)
    if info.tl_refused is not None:
        raise UnsupportedModel(f"model {name!r}: TransformerLens hook points are not served: "
                               f"{info.tl_refused}", architecture=info.architecture)
    if not info.config or refusal(info.architecture) is not None:
        raise HookwireError(
            f"the server hosts {name!r} ({info.architecture}), a model with no weightless "
            "stand-in here (not built from a known HF family); run your own copy of it with "
            f"remote=True, remote_model={name!r}")
    tokenizer = tokenizer_from_files(info.tokenizer_files) if info.tokenizer_files else None
    hf_model, cfg = build_hf_model(info.architecture, info.config, device="meta")
    with _meta_weights_readable():
        bridge = build_bridge_from_module(hf_model, info.architecture, hf_config=cfg,
                                          tokenizer=tokenizer, model_name=name)
    bridge.eval()
    bridge.cfg.device = "cpu"  # tokens are made here; there are no weights to move them to
    # Reading a weight says how to fetch it (weights.fetch_weights), never a meta error.
    guard_weightless(bridge, name)
    bridge._hookwire_remote = {"url": conn.url, "api_key": api_key, "model": name}
    # The stand-in has no weights: its forward always runs on the server, so plain calls,
    # run_with_hooks and run_with_cache (TL's own code) all go remote.
    bridge.forward = functools.partial(remote_forward, bridge,
                                       RemoteTarget(url=conn.url, api_key=api_key, model=name))
    if tokenizer is None:
        for method in _TOKENIZER_METHODS:
            if hasattr(bridge, method):
                setattr(bridge, method, functools.partial(_no_tokenizer, name, method))
    return bridge


def RemoteHookedTransformer(name: str, url: str | None = None, api_key: str | None = None):
    """A TL 2.x ``HookedTransformer`` with no weights (meta device) shaped like the server's
    model, with its tokenizer: legacy hook names, ``cfg``, ``to_tokens``, ``run_with_cache``
    returning an ``ActivationCache`` -- and every forward runs on the server."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    conn = get_connection(url, api_key)
    info = conn.model_info(name)
    cfg = HookedTransformerConfig(model_name=name, init_weights=False, device="cpu",
                                  **legacy_config_kwargs(info.architecture, info.config))
    tokenizer = tokenizer_from_files(info.tokenizer_files) if info.tokenizer_files else None
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.eval()
    model._hookwire_remote = {"url": conn.url, "api_key": api_key, "model": name}
    guard_weightless(model, name, fetchable=False)  # reading a weight says what to do
    model.forward = functools.partial(remote_forward, model,
                                      RemoteTarget(url=conn.url, api_key=api_key, model=name))
    return model



def _no_tokenizer(name: str, method: str, *args, **kwargs):
    raise HookwireError(f"{method}: the server hosts {name!r} without a tokenizer, so text "
                        "cannot be turned into tokens here; pass token ids (a (batch, seq) "
                        "int64 tensor) to the model instead")


# TL refuses to split a fused QKV (or gate/up) matrix on the meta device because it cannot
# read values, and some adapters refuse a model whose weights it cannot read (BitNet's check
# for packed checkpoints). The stand-in only needs the *shapes*, which meta tensors have, so
# while the bridge is built TL's readability checks pass meta weights through -- in every TL
# module that imported them (architecture adapters included, e.g. Phi-3's, BitNet's).
#
# The pass-through is switched on per thread, not by swapping TL's functions in and out: a
# swap is process-wide, so a stand-in built in one thread made meta weights "readable" in
# every other one, and two threads building at once could restore each other's replacement
# and leave it installed for good (every later weight read on a stand-in then gave a meta
# tensor instead of advice). The wrappers, once installed, stay: outside a build they call
# TL's own function unchanged.
_BUILDING = threading.local()
_INSTALL_LOCK = threading.Lock()


def _meta_pass_through(original, on_meta):
    def wrapper(weight, *args, **kwargs):
        if getattr(_BUILDING, "depth", 0) and getattr(weight, "is_meta", False):
            return on_meta(weight)
        return original(weight, *args, **kwargs)

    functools.update_wrapper(wrapper, original)
    wrapper._hookwire_original = original
    return wrapper


def _install_meta_pass_through() -> None:
    """Wrap TL's readability checks in every TL module imported so far (idempotent)."""
    from transformer_lens.utilities import quantization

    with _INSTALL_LOCK:
        wrappers = {}
        for attr, on_meta in (("require_readable_weight", lambda w: w),
                              ("unreadable_weight_reason", lambda w: None)):
            current = getattr(quantization, attr)
            original = getattr(current, "_hookwire_original", current)
            wrappers[attr] = (original, current if current is not original
                              else _meta_pass_through(original, on_meta))
        for module in list(sys.modules.values()):
            if not getattr(module, "__name__", "").startswith("transformer_lens"):
                continue
            for attr, (original, wrapper) in wrappers.items():
                if getattr(module, attr, None) is original:
                    setattr(module, attr, wrapper)


@contextlib.contextmanager
def _meta_weights_readable():
    _install_meta_pass_through()
    _BUILDING.depth = getattr(_BUILDING, "depth", 0) + 1
    try:
        yield
    finally:
        _BUILDING.depth -= 1
