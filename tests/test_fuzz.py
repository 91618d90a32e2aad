"""Property-based fuzzing (hypothesis) of the message decoder, the graph validator and the
executor: HOOKWIRE_FUZZ_EXAMPLES generated messages per run (10,000 by default, split
below), every one answered by a result or a typed error -- no other exception, no
``internal_error``, no missing or double answer. Most run in-process against the real code
(the decoder, the validator, the worker's validate-and-run path on a real model); a share
goes through a real server on one connection, which must keep serving correctly.

Deterministic in CI (``derandomize``); ``bench/fuzz_extended.py`` runs 100,000+ with fresh
randomness and prints the outcome counts.
"""
from __future__ import annotations

import os
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hookwire.client import Connection
from hookwire.server.app import prepare_model
from hookwire.server.worker import ModelWorker
from hookwire.validate import Limits

import fuzzing as fz
from known_good import assert_good

TOTAL = int(os.environ.get("HOOKWIRE_FUZZ_EXAMPLES", "10000"))
# layer -> (hypothesis examples at TOTAL=10,000, messages per example: the drawn one and
# seeded mutations of it). Examples scale with TOTAL.
PLAN = {"text": (250, 16), "binary": (150, 10), "validator": (250, 16), "executor": (300, 1),
        "server": (200, 1)}
OUTCOMES: dict[str, Counter] = {k: Counter() for k in PLAN}


def fuzz_settings(layer: str):
    examples = max(1, round(PLAN[layer][0] * TOTAL / 10_000))
    return settings(max_examples=examples, deadline=None, database=None,
                    derandomize=os.environ.get("HOOKWIRE_FUZZ_RANDOM") is None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def variants(layer: str, seed: int) -> list[random.Random]:
    return [random.Random(seed * 1000 + k) for k in range(PLAN[layer][1] - 1)]


@pytest.fixture(scope="module")
def entry(hosted):
    return prepare_model(hosted["tiny-gpt2"])


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    for layer, counts in OUTCOMES.items():
        print(f"fuzz {layer}: {sum(counts.values())} messages {dict(counts.most_common())}")


def test_plan_is_10000_messages_per_run_by_default():
    assert sum(n * k for n, k in PLAN.values()) == 10_000


@fuzz_settings("text")
@given(st.data(), st.integers(0, 2 ** 32))
def test_decoder_text(entry, data, seed):
    msg = data.draw(fz.client_messages(entry.sites))
    for m in [msg] + [fz.mutate_text(msg, rng) for rng in variants("text", seed)]:
        OUTCOMES["text"][fz.decode_text(m)] += 1


@fuzz_settings("binary")
@given(fz.HEADERS, fz.binary_frames(), st.integers(0, 2 ** 32))
def test_decoder_frames(headers, frame, seed):
    for f in [frame] + [fz.mutate_bytes(frame, rng) for rng in variants("binary", seed)]:
        OUTCOMES["binary"][fz.decode_binary(headers, f)] += 1


@fuzz_settings("validator")
@given(st.data(), st.integers(0, 2 ** 32))
def test_validator(entry, data, seed):
    graph = data.draw(fz.graphs(entry.sites))
    tensors = fz.tensors_for(seed % 10 ** 6, graph["constants"] + ["c0", "c1", "c2"])
    for g in [graph] + [fz.mutate_graph(graph, rng) for rng in variants("validator", seed)]:
        OUTCOMES["validator"][fz.validate_graph(entry, g, tensors)] += 1


@pytest.fixture(scope="module")
def worker(entry):
    return ModelWorker({"tiny-gpt2": entry}, Limits(max_request_seconds=60))


@fuzz_settings("executor")
@given(st.data(), st.integers(0, 10 ** 6))
def test_executor(worker, entry, data, seed):
    graph = data.draw(fz.graphs(entry.sites))
    tensors = fz.tensors_for(seed, graph["constants"])
    OUTCOMES["executor"][fz.execute(worker, graph, tensors)] += 1


def test_executor_ran_graphs_for_real():
    """The generator is not all noise: a good share of graphs validate and run."""
    counts = OUTCOMES["executor"]
    if sum(counts.values()) >= 200:
        assert counts["ok"] >= 0.2 * sum(counts.values()), counts


@pytest.fixture(scope="module")
def fuzz_conn(server):
    c = Connection(server.url)
    yield c
    c.close()


@fuzz_settings("server")
@given(st.data(), st.integers(0, 10 ** 6))
def test_through_the_server(fuzz_conn, entry, data, seed):
    graph = data.draw(fz.graphs(entry.sites))
    tensors = fz.tensors_for(seed, graph["constants"])
    OUTCOMES["server"][fz.through_server(fuzz_conn, graph, tensors)] += 1


def test_server_still_right_after_fuzzing(fuzz_conn, good_answers, tokens):
    assert_good(fuzz_conn, good_answers, tokens)
    assert_good(fuzz_conn, good_answers, tokens, "tiny-llama")
