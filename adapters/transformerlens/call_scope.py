"""Which forward goes where, and whose hooks a trace sees, when remote calls overlap.

TL adds a call's hooks when the call starts and removes them when it ends. A ``blocking=False``
call ends only when the server has answered, so without care the *next* call would be
traced with the previous call's hooks still attached (and its results silently off). Here:

* every TL method that hookwire sends remote runs its TL part (adding hooks, tracing,
  removing hooks) under one lock per model, so no two calls touch the hook points at once;
* a non-blocking call releases that lock as soon as its hooks are traced, after detaching
  the temporary hooks it added (TL removes them again at the end, a no-op then); it takes
  the lock back before TL's own clean-up runs;
* a remote ``with model.hooks(...)`` block holds that lock from entry to exit: TL keeps the
  block's hooks on the model for all that time, so another thread's call (or block) on the
  same model waits rather than run with them;
* ``model.forward`` is one dispatcher per model while remote calls are in progress: each
  thread's forward goes to the server its own call names (overlapping calls on one model
  no longer overwrite each other's redirection).
"""
from __future__ import annotations

import contextlib
import threading
import weakref

from hookwire.transformerlens.hook_tracer import cached_hook_points

_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_BLOCKS = threading.local()   # .models: the models whose hooks() block this thread is in
_LOCKS_GUARD = threading.Lock()


def call_lock(model) -> threading.RLock:
    """The lock that serializes TL's hook bookkeeping of remote calls on ``model``."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def holding_block(model):
    """Mark the calling thread as inside a remote ``with model.hooks(...)`` block (which holds
    the model's call lock for its whole duration)."""
    held = getattr(_BLOCKS, "models", None)
    if held is None:
        held = _BLOCKS.models = []
    held.append(model)
    try:
        yield
    finally:
        held.pop()


def in_block(model) -> bool:
    """True while the calling thread is inside a remote ``hooks()`` block of ``model``."""
    return any(m is model for m in getattr(_BLOCKS, "models", ()))


class Redirect:
    """``model.forward`` while remote calls run on it: the calling thread's target decides
    where the forward goes; threads without one get ``fallback`` (the model's own forward,
    or a stand-in's default remote forward)."""

    def __init__(self, model, fallback):
        self.model_ref = weakref.ref(model)
        self.fallback = fallback
        self.targets: dict[int, list] = {}

    def current(self):
        stack = self.targets.get(threading.get_ident())
        return stack[-1] if stack else None

    def __call__(self, *args, **kwargs):
        from hookwire.transformerlens.remote_run import remote_forward

        target = self.current()
        if target is None:
            return self.fallback(*args, **kwargs)
        return remote_forward(self.model_ref(), target, *args, **kwargs)


_REDIRECT_GUARD = threading.Lock()


@contextlib.contextmanager
def forward_goes_remote(model, target):
    """For the duration of one TL call (in this thread), route the model's forward to the
    server ``target`` names."""
    tid = threading.get_ident()
    with _REDIRECT_GUARD:
        redirect = model.__dict__.get("forward")
        installed = not isinstance(redirect, Redirect)
        if installed:
            previous = model.__dict__.get("forward")
            fallback = previous if previous is not None else \
                type(model).forward.__get__(model, type(model))
            redirect = Redirect(model, fallback)
            redirect.previous = previous
            model.forward = redirect
        redirect.targets.setdefault(tid, []).append(target)
    try:
        yield
    finally:
        with _REDIRECT_GUARD:
            stack = redirect.targets.get(tid, [])
            if stack:
                stack.pop()
            if not stack:
                redirect.targets.pop(tid, None)
            if not redirect.targets and model.__dict__.get("forward") is redirect:
                if redirect.previous is None:
                    del model.forward
                else:
                    model.forward = redirect.previous


def current_remote_target(model):
    """The target of a remote call this thread is inside of on ``model`` (e.g. a
    ``with model.hooks(..., remote=True)`` block), else None."""
    redirect = model.__dict__.get("forward")
    return redirect.current() if isinstance(redirect, Redirect) else None


def hook_handles(model) -> set[int]:
    """Ids of the TL hook handles on every hook point of ``model`` now."""
    return {id(h) for hp in _points(model) for h in _handles(hp)}


def detach_new_hooks(model, before: set[int]) -> None:
    """Take off the hook points every temporary TL hook added since ``before`` (this call's
    own: the call lock kept everyone else out meanwhile). TL's removal at the end of the
    call then finds nothing to do."""
    for hp in _points(model):
        for attr in ("fwd_hooks", "bwd_hooks"):
            handles = getattr(hp, attr, None)
            if not isinstance(handles, list):
                continue
            keep = []
            for handle in handles:
                if id(handle) in before or getattr(handle, "is_permanent", False):
                    keep.append(handle)
                else:
                    handle.hook.remove()
            handles[:] = keep


def _points(model):
    return cached_hook_points(model).values()


def _handles(hp):
    for attr in ("fwd_hooks", "bwd_hooks"):
        handles = getattr(hp, attr, None)
        if isinstance(handles, list):
            yield from handles


__all__ = ["call_lock", "forward_goes_remote", "current_remote_target", "hook_handles",
           "detach_new_hooks", "Redirect"]
