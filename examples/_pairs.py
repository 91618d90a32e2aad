"""Shared by the examples: an in-process hookwire server and, for each model, a weightless
remote stand-in next to a local TL model with the same weights, so each example can run the
same experiment both ways and compare."""
from __future__ import annotations

import contextlib

import hookwire
import hookwire.server as hs
import hookwire.transformerlens as htl
from hookwire.client import close_connections
from hookwire.server.models import load_model


@contextlib.contextmanager
def remote_and_local(models):
    """Yield [(name, remote stand-in, local bridge)], with the server stopped on exit."""
    srv = hs.start(models=list(models), port=0)
    try:
        print(f"server at {srv.url}")
        hookwire.configure(url=srv.url)
        # The stand-in has no weights (meta device); the local bridge is built from the same
        # config and seed as the server's, so its weights are identical.
        yield [(name, htl.RemoteModel(name), load_model(name).bridge) for name in models]
    finally:
        close_connections()
        srv.stop()


def served_hf_model(name: str):
    """A plain HF model with the weights the server builds for ``name`` (same config, same
    seed), for running pyvene locally next to the remote run. pyvene rewires the model it
    wraps, so this is a separate object from anything the server holds."""
    from hookwire.families import build_hf_model
    from hookwire.server.models import BUILTIN_MODELS

    spec = BUILTIN_MODELS[name]
    model, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed)
    return model
