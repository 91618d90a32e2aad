"""NNsight code on a hookwire server: ``with model.trace(prompt, remote=True):`` without
sending code.

::

    import hookwire.nnsight as hnn
    model = hnn.RemoteLanguageModel("gpt2-small-random")   # weightless, from the manifest
    with model.trace("The Eiffel Tower is in"):             # remote by default
        h = model.transformer.h[5].output.save()
        model.transformer.h[6].mlp.output[:] = 0
        logits = model.lm_head.output.save()

The block is nnsight's, run by nnsight's tracer; only the model's forward is replaced by
handoffs of proxies, so the block's code becomes an intervention graph on the client
(:mod:`hookwire.nnsight.backend`). ``hnn.LanguageModel`` / ``hnn.NNsight`` are nnsight's classes
with ``remote=`` on hookwire; ``backend=hnn.RemoteBackend(...)`` works with any nnsight model.

Importing this module imports nnsight, which mounts ``.save`` on every object: nothing else in
hookwire imports it.
"""
from hookwire.nnsight.backend import RemoteBackend
from hookwire.nnsight.models import LanguageModel, NNsight, RemoteLanguageModel
from hookwire.nnsight.values import NotSent, PendingTokens

__all__ = ["RemoteLanguageModel", "LanguageModel", "NNsight", "RemoteBackend", "NotSent",
           "PendingTokens"]
