"""Memory pressure under Ray: when Ray's memory monitor kills a replica, the request that was
running there gets ``ray.exceptions.OutOfMemoryError`` at the front. That is a replica lost,
not an internal error: sent again (once: the request may itself be what exhausted the
memory) when nothing of its answer reached the client, and a typed ``ReplicaLost`` (with
``details["cause"] == "out_of_memory"``) otherwise.

Ray's memory monitor acts on the memory of the whole node, which on a shared test machine
moves by gigabytes from minute to minute: no threshold makes it kill our replica, and only
it, on cue. So the replicas here are real hookwire replicas on a real local Ray whose
``run`` raises the very exception Ray raises for a monitor kill, at the moment the request
id names -- before any result, after the first result, or on every attempt -- and Ray
carries it to the front as it carries the real one.
"""
from __future__ import annotations

import json

import sys

import pytest
import torch

# Through hookwire's module, which sets what Ray must see before it is imported.
import hookwire.server.ray_cluster  # noqa: F401
import ray  # noqa: E402
import ray.cloudpickle  # noqa: E402

import hookwire.server as hs  # noqa: E402
from hookwire.errors import ReplicaLost  # noqa: E402
from hookwire.server.app import HookwireServer  # noqa: E402
from hookwire.server.ray_engine import RayEngine  # noqa: E402
from hookwire.server.ray_replica import ModelReplica  # noqa: E402

from graphs import read_graph  # noqa: E402
from pipelined import PipelinedClient  # noqa: E402
from ray_helpers import our_processes, stop_ray_server  # noqa: E402

READ = "blocks.0.hook_resid_post"


class MemoryMonitorKills(ModelReplica):
    """A hookwire replica that, for request ids starting ``oom-before`` / ``oom-after`` /
    ``oom-always``, fails as a replica killed by Ray's memory monitor: before its first
    result (first attempt only), after its first result, or on every attempt."""

    async def run(self, payload):
        rid = json.loads(payload["submit"])["request_id"]  # (the submit as the client sent it)
        attempts = self.__dict__.setdefault("_attempts", {})
        attempts[rid] = attempts.get(rid, 0) + 1
        if rid.startswith("oom-always") or (rid.startswith("oom-before") and
                                           attempts[rid] == 1):
            raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running "
                                                  "low on memory (hookwire test replica)")
        async for items in super().run(payload):
            frames = [k for k, item in enumerate(items) if isinstance(item, bytes)]
            if rid.startswith("oom-after") and frames:
                # Killed right after its first frame left (the rest of that burst, the
                # final answer included when the request was quick, never does).
                yield items[:frames[0] + 1]
                raise ray.exceptions.OutOfMemoryError("Task was killed due to the node "
                                                      "running low on memory (test)")
            yield items


@pytest.fixture(scope="module")
def oom_server():
    # The class lives in this test module, which replicas cannot import: pickle it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    before = set(our_processes())
    srv = None
    try:
        engine = RayEngine(["tiny-gpt2"], replicas=1, num_cpus_per_replica=0.5,
                           replica_class=MemoryMonitorKills)
        try:
            srv = hs.ServerHandle(HookwireServer({}, port=0, engine=engine)).start()
        except BaseException:
            engine.close()
            raise
        yield srv
    finally:
        stop_ray_server(srv, before)
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def _run(url, rid_prefix: str, tokens):
    """One request whose id tells the test replica when to fail; its answer."""
    client = PipelinedClient(url)
    try:
        rid = client.send(read_graph("tiny-gpt2", [(READ, 0)]), {"input_ids": tokens},
                          rid=f"{rid_prefix}-{id(tokens)}")
        return client.collect([rid], timeout=120)[rid]
    finally:
        client.close()


def test_a_request_whose_replica_was_killed_for_memory_is_sent_again(oom_server, hosted):
    bridge = hosted["tiny-gpt2"].bridge
    tokens = bridge.to_tokens(["hello world"])
    retried = oom_server.server.worker.retried
    answer = _run(oom_server.url, "oom-before", tokens)
    assert answer.error is None, answer.error
    seen = {}
    with torch.no_grad():
        logits = bridge.run_with_hooks(tokens, fwd_hooks=[
            (READ, lambda act, hook: seen.__setitem__("x", act.clone()))])
    torch.testing.assert_close(answer.values["__logits__"], logits)
    torch.testing.assert_close(answer.values[f"{READ}#0"], seen["x"])
    assert oom_server.server.worker.retried == retried + 1


def test_after_part_of_the_answer_the_client_gets_a_typed_replica_lost(oom_server, hosted):
    tokens = hosted["tiny-gpt2"].bridge.to_tokens(["hello world"])
    answer = _run(oom_server.url, "oom-after", tokens)
    assert answer.error is not None and answer.error.code == ReplicaLost.code, answer.error
    assert answer.error.details.get("cause") == "out_of_memory"
    assert "memory" in answer.error.message


def test_a_request_that_keeps_exhausting_memory_is_sent_again_once_only(oom_server, hosted):
    tokens = hosted["tiny-gpt2"].bridge.to_tokens(["hello world"])
    retried = oom_server.server.worker.retried
    answer = _run(oom_server.url, "oom-always", tokens)
    assert answer.error is not None and answer.error.code == ReplicaLost.code, answer.error
    assert answer.error.details.get("cause") == "out_of_memory"
    assert oom_server.server.worker.retried == retried + 1  # two attempts, not four
