"""What the everyday pyvene tests share: seeded inputs of the tiny models' shape, and a record
of the requests sent (to tell "refused before sending" from "refused by the server")."""
from __future__ import annotations

import torch

import hookwire.client

B, S, D = 2, 7, 64  # batch, positions, the tiny models' width


def ids(seed, batch=B, seq=S):
    return {"input_ids": torch.randint(0, 256, (batch, seq),
                                       generator=torch.Generator().manual_seed(seed))}


BASE, SRC, SRC2 = ids(11), ids(12), ids(13)


def record_sends(monkeypatch) -> list:
    """The shapes of ``input_ids`` of every request sent from now on (this test)."""
    sent = []
    real_run = hookwire.client.Connection.run

    def recording_run(self, graph, tensors, **kwargs):
        sent.append(tuple(tensors["input_ids"].shape))
        return real_run(self, graph, tensors, **kwargs)
    monkeypatch.setattr(hookwire.client.Connection, "run", recording_run)
    return sent
