"""A call interrupted on the client (Ctrl-C in a notebook, a callback that raises) must not
leave its connection reading the old request's messages: the next call gets a fresh
connection and the right answer."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import hookwire.client as hc
import hookwire.server as hs
import hookwire.transformerlens as htl
from hookwire.protocol import Progress
from hookwire.server.models import load_model


class Interrupted(BaseException):
    """Stands in for KeyboardInterrupt (which pytest would treat as a real Ctrl-C)."""


@pytest.fixture(scope="module")
def served():
    hosted = load_model("tiny-gpt2")
    handle = hs.start(models={"tiny-gpt2": hosted.bridge})
    try:
        yield handle, hosted.bridge
    finally:
        hc.close_connections()
        handle.stop()


def test_interrupted_call_leaves_a_usable_client(served):
    handle, local = served
    model = htl.RemoteModel("tiny-gpt2", url=handle.url)
    tokens = local.to_tokens(["hello world"])
    conn = hc.get_connection(handle.url)
    graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
             "forward": {"return_type": "logits"}}

    def interrupt(msg):
        if isinstance(msg, Progress):
            raise Interrupted
    with pytest.raises(Interrupted):
        conn.run(graph, {"input_ids": tokens}, on_event=interrupt)
    assert conn.broken
    # The next remote call (which looks the connection up again) is answered correctly.
    def halve(act, hook):
        return act * 0.5
    fwd = [("blocks.0.hook_resid_pre", halve)]
    assert_close(model.run_with_hooks(tokens, fwd_hooks=fwd),
                 local.run_with_hooks(tokens, fwd_hooks=fwd))
    assert hc.get_connection(handle.url) is not conn


def test_server_error_keeps_the_connection(served):
    handle, local = served
    conn = hc.get_connection(handle.url)
    bad = {"version": 1, "model": "no-such-model", "inputs": {"input_ids": "input_ids"}}
    with pytest.raises(Exception):
        conn.run(bad, {"input_ids": torch.tensor([[1, 2]])})
    assert not conn.broken
    assert hc.get_connection(handle.url) is conn
