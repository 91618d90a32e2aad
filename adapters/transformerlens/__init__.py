"""hookwire.transformerlens: importing it makes ``run_with_hooks(..., remote=True)``,
``run_with_cache(..., remote=True)`` and ``with model.hooks(..., remote=True)`` work on TL 4
``TransformerBridge`` and ``HookedRootModule`` models -- including TL 2.x
``HookedTransformer`` in an environment with transformers 4.x (see legacy.py).

TL's own methods still do all the TL work (resolving names and aliases, filters, caching
keys, ``hooks()`` contexts, ``reset_hooks_end``, ``clear_contexts``); only the model's
forward is routed to the server, where the hooks run as a traced graph."""
from __future__ import annotations

import contextlib
import functools
import sys
import threading
import warnings

from hookwire.errors import HookwireError
from hookwire.remote_call import start_in_background
from hookwire.transformerlens.call_scope import (call_lock, current_remote_target,
                                                 forward_goes_remote, holding_block,
                                                 hook_handles, in_block)
from hookwire.transformerlens.remote_run import RemoteTarget, remote_forward
from hookwire.transformerlens.stand_in import RemoteHookedTransformer, RemoteModel
from hookwire.transformerlens.weights import WeightsNotFetched, fetch_weights

_REMOTE_METHODS = ("run_with_hooks", "run_with_cache", "generate")


def _patch(cls, method_name: str) -> None:
    original = getattr(cls, method_name, None)
    if original is None or getattr(original, "_hookwire_patched", False):
        return

    @functools.wraps(original)
    def method(self, *args, remote=None, remote_model=None, progress=None, blocking=True,
               **kwargs):
        stand_in = getattr(self, "_hookwire_remote", None)
        if current_remote_target(self) is not None:
            # Inside ``with model.hooks(..., remote=...)``: the forward already goes remote.
            with call_lock(self):
                return original(self, *args, **kwargs)
        if remote is None:
            remote = stand_in is not None
        if remote and method_name == "generate":
            _no_kv_cache(self, kwargs)
        if not remote:
            if stand_in is not None:
                raise HookwireError("a RemoteModel has no weights to run locally; "
                                    "use remote=True (the default for it)")
            return original(self, *args, **kwargs)
        base = stand_in or {}
        target = RemoteTarget(url=remote if isinstance(remote, str) else base.get("url"),
                              api_key=base.get("api_key"),
                              model=remote_model or base.get("model"), progress=progress)
        if blocking:
            with call_lock(self), forward_goes_remote(self, target):
                return original(self, *args, **kwargs)
        # Non-blocking: TL's method runs in the background; the caller waits only for the
        # tracing, so trace errors still surface here, then gets the RemoteRun handle. Once
        # traced, the call's temporary hooks come off the model so the next call is traced
        # without them (see call_scope); generate traces every step, so it keeps the model
        # to itself until it is done.
        target.traced = threading.Event()
        target.detach_hooks = method_name != "generate" and kwargs.get("reset_hooks_end", True)

        def work(run):
            target.run = run
            target.lock = call_lock(self)
            with target.lock:
                target.hooks_before = hook_handles(self)
                with forward_goes_remote(self, target):
                    return original(self, *args, **kwargs)
        # Waiting for it inside this thread's own remote hooks() block would wait forever
        # (the run needs the model's lock the block holds): RemoteRun raises instead.
        return start_in_background(work, target.traced,
                                   blocked_by=functools.partial(in_block, self))

    method._hookwire_patched = True
    setattr(cls, method_name, method)


class GenerateWithoutKVCache(UserWarning):
    """Remote ``generate`` re-runs the whole sequence at each step (no KV cache)."""


def _no_kv_cache(model, kwargs: dict) -> None:
    """TL's own loop picks the tokens; each of its forwards (the whole sequence so far, hooks
    traced anew) runs on the server, so no KV cache is kept on either side: hooks see every
    position at every step, as locally with ``use_past_kv_cache=False`` (which it equals).
    With TL's default (a KV cache) a local hook sees the prompt, then one new position per
    step, and the tokens differ (even for a hook adding one vector everywhere, on TL 4.3)."""
    hooked = any(hp._forward_hooks or hp._backward_hooks
                 for hp in model.hook_dict.values() if hasattr(hp, "_forward_hooks"))
    if kwargs.get("use_past_kv_cache") and hooked:
        raise HookwireError(
            "generate(remote=True, use_past_kv_cache=True) with hooks: remote generation keeps "
            "no KV cache, so the hooks would see the whole sequence at every step instead of "
            "one new position. Pass use_past_kv_cache=False (what the remote run does, and "
            "what a local run with that setting gives)")
    if "use_past_kv_cache" not in kwargs and hooked:
        warnings.warn("remote generate re-runs the whole sequence at each step (no KV "
                      "cache): with hooks it equals local generate(use_past_kv_cache=False), "
                      "not TL's cached default (hooks see every position at every step, and "
                      "tokens can differ). Pass use_past_kv_cache=False to say you mean it",
                      GenerateWithoutKVCache, stacklevel=4)
    kwargs["use_past_kv_cache"] = False


def _patch_hooks_context(cls) -> None:
    """``with model.hooks(fwd_hooks=..., remote=True):`` -- every forward of the model inside
    the block (``model(tokens)``, ``run_with_cache``...) runs on the server with the hooks."""
    original = getattr(cls, "hooks", None)
    if original is None or getattr(original, "_hookwire_patched", False):
        return

    @functools.wraps(original)
    @contextlib.contextmanager
    def hooks(self, *args, remote=None, remote_model=None, progress=None, **kwargs):
        # TL adds the hooks on entry and removes them on exit: both under the model's call
        # lock, so a non-blocking call finishing in the background never interleaves. A
        # remote block holds the lock throughout: its hooks are module state until it exits,
        # so another thread's call on this model must not run (or be traced) meanwhile.
        lock = call_lock(self)
        stand_in = getattr(self, "_hookwire_remote", None) is not None
        held = contextlib.ExitStack()
        if remote or stand_in:
            held.enter_context(lock)
            held.enter_context(holding_block(self))
        with held:
            context = original(self, *args, **kwargs)
            with lock:
                ctx = context.__enter__()
            try:
                if not remote or stand_in:
                    yield ctx  # not asked for, or a stand-in (always remote already)
                else:
                    target = RemoteTarget(url=remote if isinstance(remote, str) else None,
                                          model=remote_model, progress=progress)
                    with forward_goes_remote(self, target):
                        yield ctx
            except BaseException:
                with lock:
                    if not context.__exit__(*sys.exc_info()):
                        raise
            else:
                with lock:
                    context.__exit__(None, None, None)

    hooks._hookwire_patched = True
    setattr(cls, "hooks", hooks)


def _hooked_root_module():
    """TL's ``HookedRootModule`` class: ``transformer_lens.HookedRootModule`` on TL 4 (where
    importing it from ``hook_points`` raises), ``transformer_lens.hook_points`` before."""
    try:
        import transformer_lens
        cls = getattr(transformer_lens, "HookedRootModule", None)
        cls = getattr(cls, "HookedRootModule", cls)  # the module of that name, on some versions
        if isinstance(cls, type):
            return cls
    except ImportError:
        pass
    try:
        from transformer_lens.hook_points import HookedRootModule
        return HookedRootModule
    except ImportError:
        return None


def install() -> None:
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError:  # TL 2.x (HookedTransformer only): see legacy.py
        TransformerBridge = None
    HookedRootModule = _hooked_root_module()
    try:  # TL 2.x/3.x: its run_with_cache wraps HookedRootModule's (ActivationCache)
        from transformer_lens import HookedTransformer
    except ImportError:
        HookedTransformer = None

    for cls in (TransformerBridge, HookedRootModule, HookedTransformer):
        if cls is None:
            continue
        for name in _REMOTE_METHODS:
            _patch(cls, name)
        _patch_hooks_context(cls)


install()

__all__ = ["RemoteModel", "RemoteHookedTransformer", "remote_forward", "install",
           "fetch_weights", "WeightsNotFetched", "GenerateWithoutKVCache"]
