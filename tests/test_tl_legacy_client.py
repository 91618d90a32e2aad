"""A TransformerLens 2.x user, for real: a client in a second virtual environment
(.venv-legacy: TL 2.18 + transformers 4.57, built by scripts/setup_legacy_env.sh) runs
``HookedTransformer`` hooks with legacy names against a server started from this (TL 4 /
transformers 5) environment, and every result must equal the same hooks run locally on the
server's own TL 4 bridge.

The client (tests/legacy_client.py) runs tests/legacy_cases.py on a weightless stand-in and
on a real local HookedTransformer with the server's weights; results come back as .npy files
(``allow_pickle=False``). No skip: if the legacy environment cannot be built, this fails.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import MODEL_NAMES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import legacy_cases  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEGACY_PY = os.path.join(ROOT, ".venv-legacy", "bin", "python")
CLIENT = os.path.join(ROOT, "tests", "legacy_client.py")
SETUP_TIMEOUT = 1800   # a first build installs torch, TL 2.18, transformers 4.57
CLIENT_TIMEOUT = 600
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)

pytestmark = [pytest.mark.timeout(SETUP_TIMEOUT + CLIENT_TIMEOUT + 120),
              pytest.mark.filterwarnings("ignore:.*gated-off hook name.*")]


def _run(cmd, timeout, **kwargs) -> subprocess.CompletedProcess:
    """Run a child; on timeout kill it (by its pid, via Popen) and fail with its output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{cmd[:2]} did not finish in {timeout}s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


@pytest.fixture(scope="module")
def legacy_python():
    """.venv-legacy's python, built if missing (scripts/test.sh builds it before pytest)."""
    done = _run(["bash", os.path.join(ROOT, "scripts", "setup_legacy_env.sh")], SETUP_TIMEOUT,
                cwd=ROOT)
    assert done.returncode == 0, f"building .venv-legacy failed:\n{done.stdout[-4000:]}"
    assert os.access(LEGACY_PY, os.X_OK), LEGACY_PY
    return LEGACY_PY


def _save(path, tensor):
    np.save(path, tensor.detach().cpu().numpy(), allow_pickle=False)


def _load_dir(folder) -> dict:
    with open(os.path.join(folder, "index.json")) as fh:
        index = json.load(fh)
    return {key: torch.from_numpy(np.load(os.path.join(folder, f), allow_pickle=False))
            for key, f in index.items()}


@pytest.fixture(scope="module")
def legacy_run(legacy_python, server, hosted, tokens, clean_corrupt_tokens):
    """Write the inputs, run the legacy client once for both models, return its output."""
    from hookwire.families import build_hf_model
    from hookwire.server.models import BUILTIN_MODELS

    folder = tempfile.mkdtemp(prefix="legacy_client_")
    try:
        clean, corrupt = clean_corrupt_tokens
        for n, t in (("tokens", tokens), ("clean", clean), ("corrupt", corrupt)):
            _save(os.path.join(folder, f"{n}.npy"), t)
        for name in MODEL_NAMES:
            # The server model's HF weights, rebuilt from its spec (same seed, same values).
            spec = BUILTIN_MODELS[name]
            hf_model, _ = build_hf_model(spec.architecture, spec.config, seed=spec.seed)
            wdir = os.path.join(folder, "weights", name)
            os.makedirs(wdir)
            index = {}
            for i, (key, value) in enumerate(hf_model.state_dict().items()):
                _save(os.path.join(wdir, f"{i}.npy"), value)
                index[key] = f"{i}.npy"
            with open(os.path.join(wdir, "index.json"), "w") as fh:
                json.dump(index, fh)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HOOKWIRE_")}
        done = _run([legacy_python, CLIENT, server.url, folder], CLIENT_TIMEOUT, cwd=ROOT,
                    env=env)
        assert done.returncode == 0, f"legacy client failed:\n{done.stdout[-6000:]}"
        out = os.path.join(folder, "out")
        with open(os.path.join(out, "facts.json")) as fh:
            facts = json.load(fh)
        results = {name: {variant: _load_dir(os.path.join(out, name, variant))
                          for variant in ("standin", "local_remote", "legacy_local",
                                          "processing", "gated")}
                   for name in MODEL_NAMES}
        yield {"facts": facts, "results": results, "log": done.stdout}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def expected(hosted, tokens, clean_corrupt_tokens):
    """The same cases run locally by TL 4 on the server's own bridges."""
    clean, corrupt = clean_corrupt_tokens
    out = {}
    for name in MODEL_NAMES:
        bridge = hosted[name].bridge
        try:
            values, _ = legacy_cases.run_all(bridge, name, tokens, clean, corrupt, kw={},
                                             ctx_kw={})
            values["text/logits"] = bridge.run_with_hooks("hello world", fwd_hooks=[])
        finally:
            bridge.reset_hooks(including_permanent=True)
        out[name] = {k: v.detach() for k, v in values.items()}
    return out


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def test_legacy_env_is_tl2_with_transformers_4(legacy_run):
    facts = legacy_run["facts"]
    assert facts["transformers"].startswith("4.57.")
    assert facts["transformer_lens_has_bridge"] is False


@pytest.mark.parametrize("variant", ["standin", "local_remote"])
def test_remote_legacy_hooks_equal_local_tl4(legacy_run, expected, name, variant):
    """run_with_hooks (hook_z ablation, resid edits, returned tensors, stores),
    run_with_cache (callable, list and str filters, remove_batch_dim), hooks() contexts,
    add_hook, hook.ctx, losses, backward hooks and incl_bwd, activation patching, GQA/rotary layouts and
    stop_at_layer: all equal to TL 4 locally."""
    got = legacy_run["results"][name][variant]
    want = expected[name]
    if variant == "local_remote":
        want = {k: v for k, v in want.items() if not k.startswith("text/")}
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        # Gradients: the server differentiates a batched graph with autograd.grad, so allow
        # the rounding test_tl_gradients.py allows; everything else at assert_close's default.
        tol = GRAD_TOL if key.startswith("gradients/") else {}
        assert_close(got[key], want[key], **tol, msg=lambda m, key=key: f"{key}: {m}")
    # The edits did something, or the comparisons prove nothing.
    base = want["baseline/logits"]
    for key in ("ablate_hook_z/logits", "resid_edits/logits", "returned/logits",
                "hooks_ctx/ctx+forward", "hooks_ctx/ctx+run_with_hooks", "add_hook/logits"):
        assert not torch.allclose(want[key], base), key
    assert not torch.allclose(want["patching/patched/0"], want["patching/patched/1"])


def test_hooks_see_legacy_names_and_cache_is_activation_cache(legacy_run, name):
    facts = legacy_run["facts"]["models"][name]
    points = legacy_cases.COMMON_POINTS + legacy_cases.FAMILY_POINTS[name]
    assert sorted(set(facts["names_seen"])) == sorted(points)  # hook.name: legacy, not TL 4's
    assert facts["cache_is_activation_cache"]
    assert facts["cache_keys"] == ["blocks.1.hook_resid_post"]
    # run_with_cache() with no filter: exactly the points a local TL 2.x forward fires
    # (gated-off ones such as hook_result are hooked by TL but never fire, here or there).
    keys = facts["full_cache_keys"]
    assert keys["remote"] == keys["local"] == legacy_cases.ALL_POINTS[name]


def test_backward_hooks_fire_in_backward_order(legacy_run, name):
    order = legacy_run["facts"]["models"][name]["grad_order"]
    assert order["remote"] == order["local"]  # latest site first, as TL 2.x locally
    assert len(order["remote"]) == 5


def test_pos_slice_caches_match_tl2_locally(legacy_run, name):
    # run_with_cache(pos_slice=...) exists only in TL 2.x: compared with TL 2.x run locally
    # on the same weights (unprocessed), so to float rounding.
    assert legacy_run["facts"]["models"][name]["pos_slice_max_abs_diff"] < 1e-4


def test_patching_refers_to_server_resident_values(legacy_run, name):
    # Two patched runs, each reading a slice of the clean cache that came from the server.
    assert legacy_run["facts"]["models"][name]["patching_references"] >= 2


def test_nonblocking_runs_from_a_legacy_client(legacy_run, name):
    facts = legacy_run["facts"]["models"][name]
    assert facts["nonblocking_equal"] is True
    assert facts["nonblocking_cache"] == ["ActivationCache", ["hook_embed"]]


def test_text_input_tokenizes_like_tl4(legacy_run, hosted, name):
    facts = legacy_run["facts"]["models"][name]
    assert facts["text_tokens"] == hosted[name].bridge.to_tokens("hello world").tolist()


def test_tl_hook_switches_travel_with_the_request(legacy_run, name):
    """``cfg.use_attn_result = True`` on a TL 2.x model: hook_result fires remotely, with the
    values TL 2.x computes locally (unprocessed weights)."""
    gated = legacy_run["results"][name]["gated"]
    remote = gated["remote/blocks.0.attn.hook_result"]
    assert remote.shape[2] == 4  # [batch, pos, head, d_model], as TL 2.x lays it out
    assert_close(remote, gated["local/blocks.0.attn.hook_result"], rtol=1e-5, atol=1e-5)


def test_typed_errors_before_sending(legacy_run, name):
    errors = legacy_run["facts"]["models"][name]["errors"]
    assert "HookwireError" in errors["wrong_model"]
    assert "TraceError" in errors["trace"] and "blocks.0.hook_resid_pre" in errors["trace"]
    if name == "tiny-llama":
        assert "ungroup_grouped_query_attention" in errors["ungrouped_k"]


def test_unprocessed_legacy_model_matches_server_numerics(legacy_run, expected, name):
    """The server's numerics are TL 2.x ``from_pretrained_no_processing``'s: the same
    weights run locally by TL 2.x agree with the server to float rounding."""
    got = legacy_run["results"][name]["legacy_local"]
    want = expected[name]
    for key in want:
        if key.startswith("text/") or "hook_attn_scores" in key:
            continue  # TL 2.x masks scores with -inf, TL 4 with the dtype's minimum
        assert_close(got[key], want[key], rtol=1e-4, atol=1e-4,
                     msg=lambda m, key=key: f"{key}: {m}")


def test_weight_processing_changes_activations_not_predictions(legacy_run, name):
    """``from_pretrained``'s default processing (fold_ln, center_writing_weights,
    center_unembed, fold_value_biases) moves activations and shifts logits by a constant per
    position: log-probabilities agree, the residual stream does not."""
    values = legacy_run["results"][name]["processing"]
    assert_close(values["processed/logits"].log_softmax(-1),
                 values["unprocessed/logits"].log_softmax(-1), rtol=1e-4, atol=1e-4)
    if name == "tiny-gpt2":  # centering writing weights (LN models only) moves the residual
        assert not torch.allclose(values["processed/blocks.1.hook_resid_post"],
                                  values["unprocessed/blocks.1.hook_resid_post"], atol=1e-3)
