"""What cannot be traced fails at trace time -- before anything is sent -- with a
:class:`hookwire.errors.TraceError` naming the hook function, the user's file and line, and
what to do instead. Unknown and gated hook names fail like local TL (KeyError / ValueError).

Each offending statement below carries the marker comment ``# <- untraceable``; the expected
line number is found from the hook's source, so editing this file cannot break the tests.
"""
from __future__ import annotations

import functools
import gc
import inspect
import os
import socket
import tempfile
import warnings

import pytest
import torch

import hookwire.client
from hookwire.errors import TraceError

from conftest import MODEL_NAMES

MARKER = "# <- untraceable"
THIS_FILE = os.path.basename(__file__)
SITE = "blocks.0.hook_resid_pre"


def offending_line(fn) -> int:
    fn = fn.func if isinstance(fn, functools.partial) else fn
    lines, start = inspect.getsourcelines(fn)
    hits = [start + i for i, line in enumerate(lines) if MARKER in line]
    assert len(hits) == 1, f"{fn.__name__} must mark exactly one line"
    return hits[0]


# ---- the hooks ---------------------------------------------------------------------------------

def if_on_norm(act, hook):
    if act.norm() > 5:  # <- untraceable
        return act * 0


def while_any_positive(act, hook):
    while (act > 0).any():  # <- untraceable
        act = act - 1
    return act


def relu_in_place(act, hook):
    return torch.nn.functional.relu(act, inplace=True)  # <- untraceable


def calls_item(act, hook):
    scale = act[0, 0, 0].item()  # <- untraceable
    return act * scale


def calls_tolist(act, hook):
    values = act.mean(-1).tolist()  # <- untraceable
    return act if values else None


def calls_numpy(act, hook):
    arr = act.detach().numpy()  # <- untraceable
    return act if arr is not None else None


def prints_values(act, hook):
    print(act)  # <- untraceable


def formats_values(act, hook):
    text = f"activation: {act[0, 0]}"  # <- untraceable
    return act if text else None


def calls_float(act, hook):
    return act * float(act.sum())  # <- untraceable


def uses_tensor_as_python_index(act, hook):
    i = act.argmax(-1)[0, 0]
    return act[:, [0, 1, 2][i]]  # <- untraceable


def make_file_writer(path):
    def writes_file(act, hook):
        with open(path, "w") as f:  # <- untraceable
            f.write("seen a hook\n")
    return writes_file


def make_torch_saver(path):
    def saves_tensor(act, hook):
        torch.save(act, path)  # <- untraceable
    return saves_tensor


def make_socket_user(port):
    def connects_socket(act, hook):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(1.0)
            s.connect(("127.0.0.1", port))  # <- untraceable
        finally:
            s.close()
    return connects_socket


def item_with_kwarg(act, hook, factor):
    return act * act.max().item() * factor  # <- untraceable


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


@pytest.fixture(params=["stand_in", "bridge_true"])
def front(request):
    return request.param


@pytest.fixture
def model_and_run(front, name, local_models, remote_models):
    if front == "stand_in":
        model = remote_models[name]
        return model, model.run_with_hooks
    model = local_models[name]
    return model, functools.partial(model.run_with_hooks, remote=True, remote_model=name)


@pytest.fixture
def sent(monkeypatch, server):
    """Counts what reaches the wire: client submits and server-side enqueued jobs."""
    counts = {"client_run": 0, "server_submit": 0}
    original_run = hookwire.client.Connection.run
    worker = server.server.worker
    original_submit = worker.submit

    def spy_run(self, *args, **kwargs):
        counts["client_run"] += 1
        return original_run(self, *args, **kwargs)

    def spy_submit(job):
        counts["server_submit"] += 1
        return original_submit(job)

    monkeypatch.setattr(hookwire.client.Connection, "run", spy_run)
    monkeypatch.setattr(worker, "submit", spy_submit)
    return counts


def _cases(tmp_path):
    return {
        "if": if_on_norm,
        "while": while_any_positive,
        "item": calls_item,
        "tolist": calls_tolist,
        "numpy": calls_numpy,
        "print": prints_values,
        "format": formats_values,
        "float": calls_float,
        "python_index": uses_tensor_as_python_index,
        "file_write": make_file_writer(tmp_path / "x"),
        "torch_save": make_torch_saver(tmp_path / "t.pt"),
        "socket": make_socket_user(_free_port()),
        "partial_item": functools.partial(item_with_kwarg, factor=2.0),
        # (refused by the server's validator after sending, naming a node number, before)
        "inplace_kwarg": relu_in_place,
    }


CASE_IDS = ["if", "while", "item", "tolist", "numpy", "print", "format", "float", "python_index",
            "file_write", "torch_save", "socket", "partial_item", "inplace_kwarg"]


# ---- tests ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASE_IDS)
def test_untraceable_fails_at_trace_time(case, model_and_run, tokens, tmp_path, sent, capsys):
    model, run = model_and_run
    hook_fn = _cases(tmp_path)[case]
    fn_name = (hook_fn.func if isinstance(hook_fn, functools.partial) else hook_fn).__name__
    line = offending_line(hook_fn)

    with pytest.raises(TraceError) as info:
        run(tokens, fwd_hooks=[(SITE, hook_fn)])

    message = str(info.value)
    assert fn_name in message, message
    assert THIS_FILE in message, message
    assert f"{THIS_FILE}:{line}" in message, message
    assert "after the run" in message or "instead" in message, message  # says what to do
    assert sent == {"client_run": 0, "server_submit": 0}, "something was sent"
    # Nothing escaped: no file written, nothing printed.
    assert not (tmp_path / "x").exists() and not (tmp_path / "t.pt").exists()
    assert "tensor(" not in capsys.readouterr().out
    # The model is left clean and the connection keeps working.
    assert len(model.hook_dict[SITE]._forward_hooks) == 0
    logits = run(tokens, fwd_hooks=[])
    assert logits.shape[:2] == tokens.shape


def test_trace_error_details_name_hook_file_and_line(model_and_run, tokens, sent):
    _, run = model_and_run
    with pytest.raises(TraceError) as info:
        run(tokens, fwd_hooks=[(SITE, calls_item)])
    details = info.value.details
    assert details.get("line") == offending_line(calls_item)
    assert os.path.basename(details.get("file") or "") == THIS_FILE
    assert "calls_item" in (details.get("hook") or "")
    assert sent["client_run"] == 0


def test_reading_metadata_is_fine(model_and_run, tokens, capsys, sent):
    """Shapes and dtypes are known while tracing: printing them is allowed."""
    _, run = model_and_run

    def shows_shape(act, hook):
        print("shape", tuple(act.shape), act.dtype, act.ndim)
        if act.shape[-1] > 8:  # Python control flow on metadata is fine
            return act * 1.0

    run(tokens, fwd_hooks=[(SITE, shows_shape)])
    out = capsys.readouterr().out
    assert f"shape ({tokens.shape[0]}, {tokens.shape[1]}," in out
    assert sent["client_run"] == 1


def test_a_finalizer_that_runs_while_tracing_is_not_the_hooks_io(model_and_run, name,
                                                                 local_models, tokens):
    """Garbage collection may run a finalizer in the middle of tracing (a TemporaryDirectory
    removing its folder): that I/O is not the hook's, so it neither fails the call nor is
    blocked (the folder is gone afterwards)."""
    _, run = model_and_run
    holder = [tempfile.TemporaryDirectory()]
    folder = holder[0].name

    def doubles(act, hook):
        holder.clear()
        gc.collect()   # the directory's weakref finalizer runs here, during tracing
        return act * 2

    out = run(tokens, fwd_hooks=[(SITE, doubles)])
    assert not os.path.exists(folder)
    torch.testing.assert_close(out, local_models[name].run_with_hooks(
        tokens, fwd_hooks=[(SITE, lambda act, hook: act * 2)]))


# ---- hook names: the same errors as local TL, before anything is sent -------------------------

@pytest.mark.parametrize("bad_name", ["blocks.0.hook_does_not_exist", "blocks.7.hook_resid_pre",
                                      "hook_nonsense"])
def test_unknown_hook_name_raises_key_error(model_and_run, name, local_models, tokens, sent,
                                            bad_name):
    _, run = model_and_run

    def noop(act, hook):
        return None

    with pytest.raises(KeyError):
        local_models[name].run_with_hooks(tokens, fwd_hooks=[(bad_name, noop)])
    with pytest.raises(KeyError):
        run(tokens, fwd_hooks=[(bad_name, noop)])
    assert sent == {"client_run": 0, "server_submit": 0}


@pytest.mark.parametrize("gated", ["blocks.0.attn.hook_result", "blocks.1.hook_q_input",
                                   "blocks.0.hook_mlp_in", "blocks.0.hook_attn_in"])
def test_gated_hook_raises_value_error(model_and_run, name, local_models, tokens, sent, gated):
    model, run = model_and_run

    def noop(act, hook):
        return None

    with pytest.raises(ValueError):
        local_models[name].run_with_hooks(tokens, fwd_hooks=[(gated, noop)])
    with pytest.raises(ValueError):
        run(tokens, fwd_hooks=[(gated, noop)])
    assert sent == {"client_run": 0, "server_submit": 0}
    assert len(model.hook_dict[gated]._forward_hooks) == 0


def test_queue_depth_is_zero_after_refused_hooks(server, remote_models, tokens, sent):
    """The server saw nothing: /health reports an empty queue and no job arrived."""
    import json
    import urllib.request

    model = remote_models["tiny-gpt2"]
    with pytest.raises(TraceError):
        model.run_with_hooks(tokens, fwd_hooks=[(SITE, calls_item)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_result", calls_item)])
    port = server.url.rsplit(":", 1)[1]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert health["queue_depth"] == 0
    assert sent["server_submit"] == 0
