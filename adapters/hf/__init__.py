"""HuggingFace module-path interventions and generation with interventions, remotely.

``RemoteModel(name)`` is a weightless stand-in for a model a hookwire server hosts;
``LocalModel(model)`` wraps a local HF model with the same calls (plain torch hooks), so the
two can be compared. Both take ``hooks={"transformer.h.1.mlp": fn, "...:input": pre_fn}``
with torch's hook signatures (see :mod:`hookwire.hf.hooks`).
"""
from hookwire.hf.local import LocalModel
from hookwire.hf.outputs import GenerateOutput
from hookwire.hf.remote import RemoteModel
from hookwire.hf.trace_forward import ServerObject

__all__ = ["RemoteModel", "LocalModel", "GenerateOutput", "ServerObject"]
