"""Shared fixtures: one real hookwire server per test module hosting both tiny models.

The server hosts the very bridge objects that ``local_models`` hands out, so a remote run and
a local TL run use identical weights. Everything listens on 127.0.0.1 with ephemeral ports.
"""
from __future__ import annotations


import pytest
import torch

import hookwire
import hookwire.client
import hookwire.server as hs
import hookwire.transformerlens as htl
from engines import ENGINES, RAY_SERVER, TWO_PARTS, engine_of, runs_on_its_engine
from hookwire.families import build_hf_model
from hookwire.server.models import BUILTIN_MODELS, load_model
from known_good import local_answers

MODEL_NAMES = ("tiny-gpt2", "tiny-llama")

# Files that start a private Ray instance (or check that Ray was never started): with
# pytest-xdist (scripts/test.sh) they run on one worker, one after another.
RAY_FILES = {"test_ray_engine.py", "test_ray_memory_pressure.py", "test_engine_choice.py"}


# Files outside the fast tier (`pytest -m "not slow"`): each takes a minute or more here
# (every served family, every site, Ray clusters, notebooks and scripts in subprocesses,
# load and timing), or re-runs what faster files cover on other models and spellings.
SLOW_FILES = RAY_FILES | {
    "test_families.py", "test_cobatch_every_site.py", "test_tl_remote_equals_local.py",
    "test_tl_cache_and_hooks.py", "test_sharded_model.py", "test_devices.py",
    "test_notebooks.py", "test_examples.py", "test_bench_workloads.py", "test_server_load.py",
    "test_pyvene_upstream_spellings.py", "test_tl_legacy_client.py", "test_cancel.py",
    "test_nnsight_tutorials.py", "test_no_hook_lost.py", "test_serving_options.py",
    "test_isolation.py", "test_fuzz.py", "test_pyvene_training.py", "test_hf_remote.py",
    "test_op_costs.py", "test_progress_display.py", "test_tl_model_checks.py",
    "test_tl_cache_aliases.py", "test_integrity.py", "test_server_batching.py",
    "test_tl_gradients.py", "test_tl_nonblocking.py", "test_give_way_state.py",
    "test_pyvene_everyday_diff.py", "test_tl_everyday_diff.py", "test_hf_everyday_diff.py"}


@pytest.hookimpl(hookwrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under ``--dist loadgroup`` each test file runs whole on one worker (its module
    fixtures -- servers, models -- are built once), the Ray files and every Ray-engine test
    together; files of SLOW_FILES and tests on an engine other than "embedded" are marked
    ``slow``. Marks go on before pytest and xdist read them; once pytest has ordered the
    items, the Ray-engine tests move to the end (test_ray_engine.py's last: its last test
    kills a replica), so the session's one Ray server (tests/engines.py) runs them in one
    stretch and is stopped before anything else starts."""
    kept = [item for item in items if runs_on_its_engine(item)]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept
    for item in items:
        name, engine = item.path.name, engine_of(item)
        ray = name in RAY_FILES or engine == "ray"
        item.add_marker(pytest.mark.xdist_group("ray" if ray else name))
        if name in SLOW_FILES or engine != "embedded":
            item.add_marker(pytest.mark.slow)
        if engine == "ray":  # the first one waits for Ray and its replicas to start
            item.add_marker(pytest.mark.timeout(600))
    yield
    if getattr(config.option, "loadgroup", False) and any("@" not in item.nodeid for item in items):
        # xdist groups by a suffix it writes into each node id; pytest 9.2 ignores that write
        # (pytest-dev/pytest-xdist#1386), and the groups would silently fall apart: the Ray
        # files on both workers, two Ray instances side by side. pyproject pins pytest < 9.2.
        raise pytest.UsageError("pytest-xdist --dist loadgroup did not group the tests "
                                "(pytest-dev/pytest-xdist#1386): install pytest < 9.2")
    on_ray = [item for item in items if engine_of(item) == "ray"]
    on_ray.sort(key=lambda item: item.path.name == "test_ray_engine.py")  # stable
    items[:] = [item for item in items if engine_of(item) != "ray"] + on_ray


def pytest_generate_tests(metafunc):
    """``@pytest.mark.engines("embedded", "ray", ...)`` runs the test once per engine."""
    marker = metafunc.definition.get_closest_marker("engines")
    if marker is None or "engine" not in metafunc.fixturenames:
        return
    unknown = set(marker.args) - set(ENGINES)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown engines {unknown}")
    metafunc.parametrize("engine", marker.args, indirect=True, scope="module")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    """After the last Ray-engine test in a row (its fixtures already finalized), stop the
    shared Ray server: every process it started is gone before the next test runs."""
    yield
    if nextitem is None or engine_of(nextitem) != "ray":
        RAY_SERVER.stop()


def pytest_sessionfinish(session, exitstatus):
    RAY_SERVER.stop()  # an interrupted run (-x, Ctrl-C) stops it too


TEXTS = ["hello world", "abcdefghij!"]
CLEAN_TEXTS = ["The cat sat on a mat", "Paris is in France!!"]
CORRUPT_TEXTS = ["The dog sat on a rug", "Rome is in Italy!!!!"]


@pytest.fixture(scope="module")
def hosted():
    """name -> HostedModel, built from configs with fixed seeds (no download)."""
    return {name: load_model(name) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def engine(request):
    """The engine the module's ``server`` runs its models on: "embedded" (in-process) unless
    the test is marked ``@pytest.mark.engines(...)`` (tests/engines.py)."""
    return getattr(request, "param", "embedded")


@pytest.fixture(scope="module")
def sharded():
    """name -> HostedModel split over two devices (the CPU and disk offload; TWO_PARTS)."""
    return {name: load_model(name, device_map=TWO_PARTS[name]) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def server(hosted, engine, request):
    """A real websocket server on 127.0.0.1 (ephemeral port) hosting both tiny models. On the
    embedded engine it hosts the very objects of ``hosted``; on the sharded engine the same
    models split over two devices; on the Ray engine (the session's one Ray server) replicas,
    and on the process engine model processes, that build the same models from the same
    configs and seeds."""
    if engine == "ray":
        pytest.importorskip("hookwire.server.ray_cluster",
                            reason="the Ray engine needs the 'ray' extra (scripts/setup.sh)")
        srv, stop = RAY_SERVER.get(MODEL_NAMES), lambda: None  # stopped after its last test
    elif engine == "process":
        srv = hs.start(models=list(MODEL_NAMES), port=0, engine="process")
        stop = srv.stop
    elif engine == "sharded":
        srv = hs.start(models=request.getfixturevalue("sharded"), port=0)
        stop = srv.stop
    else:
        srv = hs.start(models={name: h.bridge for name, h in hosted.items()}, port=0)
        stop = srv.stop

    def finalize():
        try:
            hookwire.client.close_connections()
        finally:
            try:
                stop()
            finally:
                hookwire.configure(url=None)

    request.addfinalizer(finalize)
    assert srv.url.startswith("ws://127.0.0.1:")
    hookwire.configure(url=srv.url)
    return srv


@pytest.fixture(scope="module")
def local_models(hosted, server):
    """name -> the TL 4 TransformerBridge the server hosts (same object, same weights)."""
    return {name: h.bridge for name, h in hosted.items()}


@pytest.fixture(scope="module")
def remote_models(server):
    """name -> weightless RemoteModel stand-in built from what the server sends."""
    return {name: htl.RemoteModel(name) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def tokens(hosted):
    """Token ids (batch 2) -- both tiny models share the byte-level tokenizer."""
    toks = hosted["tiny-gpt2"].bridge.to_tokens(TEXTS)
    assert toks.shape[0] == 2 and toks.dtype == torch.int64
    return toks


@pytest.fixture(scope="module")
def clean_corrupt_tokens(hosted):
    b = hosted["tiny-gpt2"].bridge
    clean, corrupt = b.to_tokens(CLEAN_TEXTS), b.to_tokens(CORRUPT_TEXTS)
    assert clean.shape == corrupt.shape
    return clean, corrupt


@pytest.fixture(scope="module")
def good_answers(local_models, tokens):
    """Local TL's answers to tests/known_good.py's graph, per model (``assert_good``)."""
    return local_answers(local_models, tokens)


@pytest.fixture
def conn(server):
    """A ``hookwire.client.Connection`` to the module's server, closed after the test."""
    c = hookwire.client.Connection(server.url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def hf_models(hosted, server):
    """name -> a plain HF model with the hosted model's weights (never served itself)."""
    out = {}
    for name in MODEL_NAMES:
        spec = BUILTIN_MODELS[name]
        model, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed)
        tokens = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():  # same seed, same config: the served weights
            torch.testing.assert_close(model(input_ids=tokens).logits,
                                       hosted[name].bridge(tokens))
        out[name] = model
    return out


@pytest.fixture(autouse=True)
def _no_hooks_left_behind(request):
    """Every test leaves the models without hooks (a failed test must not poison others)."""
    yield
    for fixture in ("local_models", "remote_models"):
        if fixture in request.fixturenames:
            for model in request.getfixturevalue(fixture).values():
                model.reset_hooks(including_permanent=True)
