"""API keys are checked in the websocket handshake: no key or a wrong key gets HTTP 401 before
the upgrade (a typed AuthError on the client); the right key serves; /health stays open."""
from __future__ import annotations

import json
import urllib.request

import pytest
import torch

import hookwire.server as hs
from hookwire.client import Connection
from hookwire.errors import AuthError
from hookwire.server.models import load_model


@pytest.fixture(scope="module")
def keyed_server():
    handle = hs.start(models=["tiny-gpt2"],
                      api_keys=["right-key-0123456789", "second-key-0123456789"])
    try:
        yield handle
    finally:
        handle.stop()


@pytest.mark.parametrize("key", [None, "wrong-key-0123456789", "right-key-012345678",
                                 "right-key-0123456789-and-more", ""])
def test_missing_or_wrong_key_is_refused(keyed_server, key):
    with pytest.raises(AuthError, match="401"):
        Connection(keyed_server.url, api_key=key)


@pytest.mark.parametrize("key", ["right-key-0123456789", "second-key-0123456789"])
def test_right_key_serves(keyed_server, key):
    conn = Connection(keyed_server.url, api_key=key)
    try:
        info = conn.model_info("tiny-gpt2")
        tokens = torch.tensor([[256, 72, 105]])
        graph = {"version": 1, "model": "tiny-gpt2", "inputs": {"input_ids": "input_ids"},
                 "forward": {"return_type": "logits"}}
        result = conn.run(graph, {"input_ids": tokens})
        assert result.values["__logits__"].shape == (1, 3, info.config["vocab_size"])
        with torch.no_grad():
            expected = load_model("tiny-gpt2").bridge(tokens)  # same seeded weights
        torch.testing.assert_close(result.values["__logits__"], expected)
    finally:
        conn.close()


def test_health_needs_no_key(keyed_server):
    url = keyed_server.url.replace("ws://", "http://") + "/health"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.loads(response.read())
    assert body["models"] == ["tiny-gpt2"]
