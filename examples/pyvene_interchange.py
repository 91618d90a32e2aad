"""A pyvene interchange-intervention sweep, run remotely, compared with local pyvene.

For every layer and position, pyvene's ``VanillaIntervention`` swaps the ``block_output`` of
the clean prompt (the source) into the corrupted prompt (the base), and we read the logit
difference between the right and the wrong answer at the last position. The config and the
call are plain pyvene; only the model differs: ``hookwire.pyvene.RemoteIntervenableModel`` runs
them on a hookwire server (source and base in one batched forward), ``pv.IntervenableModel``
on a local copy with the same weights. The two sweeps must match. Run it with::

    .venv/bin/python examples/pyvene_interchange.py
"""
from __future__ import annotations

import pyvene as pv
import torch

import hookwire
import hookwire.pyvene as hpv
import hookwire.server as hs
from hookwire.client import close_connections
from hookwire.tokenizer import byte_level_tokenizer

from _pairs import served_hf_model  # examples/_pairs.py: local models with served weights

MODELS = ["tiny-gpt2", "tiny-llama"]
# Byte-level tokenizer: the prompts differ in exactly one token; answers are one character.
CLEAN = "When Mary and John went to the store, John gave a drink to "
CORRUPT = "When Mary and John went to the store, Joan gave a drink to "
ANSWER, WRONG = "M", "J"


def sweep(make_model, n_layers: int, base, source, answer: int, wrong: int) -> torch.Tensor:
    n_pos = base["input_ids"].shape[1]
    results = torch.zeros(n_layers, n_pos)
    for layer in range(n_layers):
        config = pv.IntervenableConfig([{"layer": layer, "component": "block_output",
                                         "intervention_type": pv.VanillaIntervention}])
        model = make_model(config)
        for pos in range(n_pos):
            _, out = model(base, [source], {"sources->base": pos})
            last = out.logits[0, -1]
            results[layer, pos] = last[answer] - last[wrong]
    return results


def main() -> None:
    tok = byte_level_tokenizer(bos_id=256)
    base = {"input_ids": torch.tensor([tok.encode(CORRUPT)])}
    source = {"input_ids": torch.tensor([tok.encode(CLEAN)])}
    answer, wrong = tok.encode(ANSWER)[-1], tok.encode(WRONG)[-1]
    srv = hs.start(models=MODELS, port=0)
    try:
        print(f"server at {srv.url}")
        hookwire.configure(url=srv.url)
        for name in MODELS:
            local_hf = served_hf_model(name)
            n_layers = local_hf.config.num_hidden_layers
            with torch.no_grad():
                remote = sweep(lambda c: hpv.RemoteIntervenableModel(c, name), n_layers,
                               base, source, answer, wrong)
                local = sweep(lambda c: pv.IntervenableModel(c, local_hf), n_layers,
                              base, source, answer, wrong)
            torch.testing.assert_close(remote, local)
            best = divmod(int(remote.abs().argmax()), remote.shape[1])
            print(f"{name}: {n_layers} layers x {remote.shape[1]} positions, remote == local; "
                  f"largest effect at layer {best[0]}, position {best[1]} "
                  f"({remote[best].item():+.4f})")
    finally:
        close_connections()
        srv.stop()


if __name__ == "__main__":
    main()
