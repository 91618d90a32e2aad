"""Client memory: what a remote run allocates on the client, against loading the model locally.

Run in a fresh process by the suite (``python -m bench.client_memory URL MODEL``), so nothing
else is resident: it measures RSS (from /proc/self/status) and the bytes of parameters that
are not on the ``meta`` device, after the imports, after a remote TL run and a remote pyvene
run, and after building the local model. Prints one JSON object.
"""
from __future__ import annotations

import gc
import json
import sys


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def param_bytes(module) -> int:
    """Bytes of parameters and buffers that hold real storage (the meta device holds none)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "meta")


def main(url: str, model: str) -> dict:
    import pyvene as pv
    import torch

    import hookwire
    import hookwire.pyvene as hpv
    import hookwire.transformerlens as htl
    from hookwire.server.models import load_model

    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    hookwire.configure(url=url)
    gc.collect()
    out = {"model": model, "rss_after_imports": rss_bytes()}

    remote = htl.RemoteModel(model)
    tokens = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    logits, cache = remote.run_with_cache(tokens, progress=False,
                                          names_filter=lambda n: n.endswith("resid_post"))
    config = pv.IntervenableConfig([{"layer": 0, "component": "block_output",
                                     "intervention_type": pv.VanillaIntervention}])
    remote_pv = hpv.RemoteIntervenableModel(config, model)
    remote_pv({"input_ids": tokens}, [{"input_ids": tokens}], {"sources->base": 3})
    del logits, cache
    gc.collect()
    out["remote"] = {"rss_bytes": rss_bytes(),
                     "tl_stand_in_param_bytes": param_bytes(remote),
                     "pyvene_stand_in_param_bytes": param_bytes(remote_pv.stand_in)}

    local = load_model(model).bridge
    gc.collect()
    out["local"] = {"rss_bytes": rss_bytes(), "param_bytes": param_bytes(local)}
    out["remote"]["rss_growth_bytes"] = out["remote"]["rss_bytes"] - out["rss_after_imports"]
    out["local"]["rss_growth_bytes"] = out["local"]["rss_bytes"] - out["remote"]["rss_bytes"]
    return out


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
