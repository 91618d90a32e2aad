"""``RemoteModel(name)``: a TL 4 ``TransformerBridge`` with no weights (meta device), built
from what the server sends -- config, architecture (looked up in an allow-list) and tokenizer
files. Hook names, aliases, ``cfg``, ``to_tokens``/``to_string`` are TL's own."""
from __future__ import annotations

import contextlib
import functools

from hookwire.client import get_connection
from hookwire.errors import HookwireError
from hookwire.families import FAMILIES, build_hf_model
from hookwire.tokenizer import tokenizer_from_files
from hookwire.transformerlens.remote_run import RemoteTarget, remote_forward
from hookwire.transformerlens.weights import guard_weightless


def RemoteModel(name: str, url: str | None = None, api_key: str | None = None):
    """A weightless TL model of the server's ``name``: a TL 4 bridge, or, where TL has no
    bridges (TL 2.x), a legacy ``HookedTransformer`` (see legacy.RemoteHookedTransformer)."""
    try:
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError:
        from hookwire.transformerlens.legacy import RemoteHookedTransformer
        return RemoteHookedTransformer(name, url, api_key)

    conn = get_connection(url, api_key)
    info = conn.model_info(name)
    if info.architecture not in FAMILIES:
        raise HookwireError(
            f"the server hosts {name!r} ({info.architecture}), a model with no weightless "
            "stand-in here (not built from a known HF family); run your own copy of it with "
            f"remote=True, remote_model={name!r}")
    tokenizer = tokenizer_from_files(info.tokenizer_files)
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
    return bridge


# TL refuses to split a fused QKV matrix on the meta device because it cannot read values.
# The stand-in only needs the *shapes* of the split, which meta tensors have, so while the
# bridge is built the readability check passes meta weights through.
@contextlib.contextmanager
def _meta_weights_readable():
    from transformer_lens.model_bridge.generalized_components import (attention,
                                                                      joint_qkv_attention, mlp)

    patched = []
    for module in (joint_qkv_attention, attention, mlp):
        original = getattr(module, "require_readable_weight", None)
        if original is None:
            continue

        def passthrough(weight, *args, _original=original, **kwargs):
            if getattr(weight, "is_meta", False):
                return weight
            return _original(weight, *args, **kwargs)

        module.require_readable_weight = passthrough
        patched.append((module, original))
    try:
        yield
    finally:
        for module, original in patched:
            module.require_readable_weight = original
