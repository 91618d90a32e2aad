"""Distributed alignment search (DAS) against a remote model, compared with local pyvene.

The model stays on the server; the rotation being learned lives here. Each step is plain
pyvene: run the interchange, take a loss on the counterfactual logits, ``loss.backward()``,
``optimizer.step()``. With ``RemoteIntervenableModel`` the forward runs on the server, and the
backward asks the server for the gradient of the loss with respect to the rotation (the
model's weights are never differentiated). The same loop on local pyvene, from the same
initial rotation, must end with the same rotation. Run it with::

    .venv/bin/python examples/pyvene_das.py

The task is a toy: find a low-dimensional subspace of layer 0's output at one position such
that swapping it in from the source makes the base predict the token the source predicts.
"""
from __future__ import annotations

import copy

import pyvene as pv
import torch
import torch.nn.functional as F

import hookwire
import hookwire.pyvene as hpv
import hookwire.server as hs
from hookwire.client import close_connections

from _pairs import served_hf_model  # examples/_pairs.py: local models with served weights

MODELS = ["tiny-gpt2", "tiny-llama"]
BATCH, SEQ, POS, STEPS = 8, 10, 4, 12


def das_config():
    return pv.IntervenableConfig([{"layer": 0, "component": "block_output",
                                   "intervention_type": pv.LowRankRotatedSpaceIntervention,
                                   "low_rank_dimension": 4}])


def train(model, base, source, labels) -> list[float]:
    opt = torch.optim.SGD(model.get_trainable_parameters(), lr=2.0)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        _, cf = model(base, [source], {"sources->base": POS})
        loss = F.cross_entropy(cf.logits[:, -1], labels)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"input_ids": torch.randint(0, 256, (BATCH, SEQ), generator=gen)}
    source = {"input_ids": torch.randint(0, 256, (BATCH, SEQ), generator=gen)}
    srv = hs.start(models=MODELS, port=0)
    try:
        print(f"server at {srv.url}")
        hookwire.configure(url=srv.url)
        for name in MODELS:
            local_hf = served_hf_model(name)
            with torch.no_grad():  # the target: what the source itself predicts
                labels = local_hf(**source).logits[:, -1].argmax(-1)
            local = pv.IntervenableModel(das_config(), copy.deepcopy(local_hf))
            remote = hpv.RemoteIntervenableModel(das_config(), name)
            for key, iv in local.interventions.items():  # the same initial rotation
                remote.interventions[key].load_state_dict(iv.state_dict())
            remote_losses = train(remote, base, source, labels)
            local_losses = train(local, base, source, labels)
            torch.testing.assert_close(torch.tensor(remote_losses), torch.tensor(local_losses))
            for p, q in zip(local.get_trainable_parameters(),
                            remote.get_trainable_parameters()):
                torch.testing.assert_close(q, p)
            print(f"{name}: {STEPS} DAS steps, loss {remote_losses[0]:.3f} -> "
                  f"{remote_losses[-1]:.3f}; rotation and losses remote == local")
    finally:
        close_connections()
        srv.stop()


if __name__ == "__main__":
    main()
