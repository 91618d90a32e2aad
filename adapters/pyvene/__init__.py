"""hookwire.pyvene: run pyvene intervention configs, unchanged, against a model on a hookwire
server -- source and base in ONE batched forward.

    import pyvene as pv, hookwire.pyvene as hpv
    config = pv.IntervenableConfig([{"layer": 1, "component": "block_output",
                                     "intervention_type": pv.VanillaIntervention}])
    model = hpv.RemoteIntervenableModel(config, "tiny-gpt2")   # no local weights
    base_out, cf_out = model(base, [source], {"sources->base": 3})

Components map to the server's HF module sites (``hf:<path>:output|input``) through pyvene's
own tables; interventions are traced into whitelisted graph ops (a closed allow-list; custom
classes and functions raise :class:`UnsupportedIntervention`); nothing of pyvene runs on the
server. ``save`` / ``load`` write and read JSON and safetensors only (``persist``).
"""
from hookwire.pyvene.allowed import ALLOWED, UnsupportedIntervention
from hookwire.pyvene.components import UnknownComponent
from hookwire.pyvene.inputs import UnsupportedInput
from hookwire.pyvene.model import NotSupportedRemotely, RemoteIntervenableModel
from hookwire.pyvene.persist import SavedModelError
from hookwire.pyvene.plan import UnsupportedCall

__all__ = ["RemoteIntervenableModel", "UnsupportedIntervention", "UnknownComponent",
           "UnsupportedInput", "UnsupportedCall", "NotSupportedRemotely", "SavedModelError",
           "ALLOWED"]
