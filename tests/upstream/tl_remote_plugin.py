"""A pytest plugin that runs TransformerLens's *own* tests with every hooked forward on a
hookwire server (``scripts/tl_upstream.sh`` runs it; TL's tests are not part of this
repository).

With ``--hookwire-mode=remote`` every forward of a ``TransformerBridge`` that has a hook on
any of its hook points (forward or backward: ``run_with_hooks``, ``run_with_cache``,
``hooks()`` contexts, ``add_hook``) goes through hookwire's ``remote_forward`` -- the code
``run_with_hooks(..., remote=True)`` runs -- against a real server on 127.0.0.1 that hosts a
copy of the test's model. Forwards without hooks stay local. The copy is made on the first
hooked forward (hooks stripped, TL's ``set_use_*`` switches at their defaults, as a server's
model is) and made again when the test changes the model's weights; the server is stopped
when the model is gone or the session ends.

``--hookwire-mode=local`` changes nothing but counts the hooked forwards, so the two runs'
reports (``--hookwire-report FILE``, JSON) can be compared test by test
(``tests/upstream/compare.py``).

``--hookwire-offline-checkpoints DIR``: TL's integration tests boot hub checkpoints
(``distilgpt2``, ``gpt2``); with no hub access these fail locally. With this option they get
random-weight stand-ins with the checkpoint's real config (and a byte-level tokenizer),
written once into DIR -- the same model locally and remotely, so the comparison stays fair.
"""
from __future__ import annotations

import copy
import gc
import itertools
import json
import os
import threading
import traceback
import weakref

import pytest
import torch

import hookwire.client
import hookwire.server as hs
import hookwire.transformerlens  # noqa: F401  (installs remote= on TL's methods)
from hookwire.errors import HookwireError
from hookwire.transformerlens.remote_run import RemoteTarget, remote_forward

_MANAGED_FLAGS = ("use_attn_result", "use_split_qkv_input", "use_attn_in", "use_hook_mlp_in")

# Hub checkpoints TL's selected tests boot, and their real configs (random weights here).
OFFLINE_CHECKPOINTS = {
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257),
    "openai-community/gpt2": dict(n_layer=12, n_embd=768, n_head=12, n_positions=1024,
                                  vocab_size=50257),
}


class ModelNotHostable(HookwireError):
    """The plugin could not put the test's model on a server (the server refused it)."""
    code = "model_not_hostable"


# ---- per-test record ----------------------------------------------------------------------

class _Record:
    def __init__(self):
        self.hooked_forwards = 0
        self.remote_forwards = 0
        self.host_errors: list[str] = []
        self.phases: dict[str, dict] = {}


_record = _Record()
_mode = {"value": "remote"}


# ---- hosting ------------------------------------------------------------------------------

class _Host:
    def __init__(self, model, name: str):
        self.ref = weakref.ref(model)
        self.name = name
        self.copy = _server_copy(model)
        self.server = hs.start(models={name: self.copy}, port=0)
        self.target = RemoteTarget(url=self.server.url, model=name, progress=False)
        self._weights = _tensors(self.copy)

    def same_weights(self, model) -> bool:
        mine = _tensors(model)
        if len(mine) != len(self._weights):
            return False
        return all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
                   for a, b in zip(mine, self._weights))

    def stop(self):
        url = self.server.url
        with hookwire.client._connections_lock:
            for key in [k for k in hookwire.client._connections if k[0] == url]:
                try:
                    hookwire.client._connections.pop(key).close()
                except Exception:
                    pass
        self.server.stop()


def _tensors(model) -> list[torch.Tensor]:
    return [t.detach() for t in itertools.chain(model.parameters(), model.buffers())]


def _hook_points(model):
    from transformer_lens.hook_points import HookPoint

    return [m for m in model.modules() if isinstance(m, HookPoint)]


def _server_copy(model):
    """The model as a server would hold it: a deep copy with no hooks and TL's hook switches
    at their defaults (the request must carry them), in the test model's train/eval mode."""
    points = _hook_points(model)
    saved = []
    for hp in points:  # the test's hooks must not travel into the server's copy
        saved.append((hp, hp._forward_hooks, hp._backward_hooks, hp._forward_pre_hooks,
                       hp._backward_pre_hooks, list(getattr(hp, "fwd_hooks", [])),
                       list(getattr(hp, "bwd_hooks", []))))
        hp._forward_hooks, hp._backward_hooks = type(hp._forward_hooks)(), \
            type(hp._backward_hooks)()
        hp._forward_pre_hooks, hp._backward_pre_hooks = type(hp._forward_pre_hooks)(), \
            type(hp._backward_pre_hooks)()
        if hasattr(hp, "fwd_hooks"):
            hp.fwd_hooks, hp.bwd_hooks = [], []
    try:
        clone = copy.deepcopy(model)
    finally:
        for hp, f, b, fp, bp, fl, bl in saved:
            hp._forward_hooks, hp._backward_hooks = f, b
            hp._forward_pre_hooks, hp._backward_pre_hooks = fp, bp
            if hasattr(hp, "fwd_hooks"):
                hp.fwd_hooks, hp.bwd_hooks = fl, bl
    for flag in _MANAGED_FLAGS:
        if getattr(clone.cfg, flag, False):
            getattr(clone, f"set_{flag}")(False)
    clone.train(model.training)
    return clone


class _Hosts:
    def __init__(self):
        self.by_model: dict[int, _Host] = {}
        self.names = itertools.count()
        self.lock = threading.Lock()

    def target_for(self, model) -> RemoteTarget:
        with self.lock:
            host = self.by_model.get(id(model))
            if host is not None and (host.ref() is not model or not host.same_weights(model)):
                host.stop()
                host = self.by_model.pop(id(model))  # weights changed: host them anew
                host = None
            if host is None:
                try:
                    host = _Host(model, f"tl-test-{next(self.names)}")
                except Exception as exc:
                    _record.host_errors.append(f"{type(exc).__name__}: {exc}")
                    raise ModelNotHostable(
                        f"the server cannot host this {type(model).__name__}: "
                        f"{type(exc).__name__}: {str(exc)[:300]}") from exc
                self.by_model[id(model)] = host
            return host.target

    def stop_dead(self):
        if not self.by_model:
            return
        gc.collect()  # models of finished tests often sit in reference cycles
        with self.lock:
            for key, host in list(self.by_model.items()):
                if host.ref() is None:
                    host.stop()
                    del self.by_model[key]

    def stop_all(self):
        with self.lock:
            for host in self.by_model.values():
                host.stop()
            self.by_model.clear()


_hosts = _Hosts()


# ---- routing ------------------------------------------------------------------------------

def _has_hooks(model) -> bool:
    if not isinstance(model, torch.nn.Module) or "_modules" not in model.__dict__:
        return False  # TL's tests call the unbound forward on stand-in objects too
    return any(hp._forward_hooks or hp._backward_hooks for hp in _hook_points(model))


def _install_routing():
    from transformer_lens.model_bridge import TransformerBridge

    original = TransformerBridge.forward
    if getattr(original, "_hookwire_plugin", False):
        return

    def forward(self, *args, **kwargs):
        if getattr(self, "_hookwire_hosted", False) or \
                getattr(self, "_hookwire_remote", None) is not None or \
                "forward" in getattr(self, "__dict__", {}) or not _has_hooks(self):
            return original(self, *args, **kwargs)
        _record.hooked_forwards += 1
        if _mode["value"] != "remote":
            return original(self, *args, **kwargs)
        _record.remote_forwards += 1
        return remote_forward(self, _hosts.target_for(self), *args, **kwargs)

    forward._hookwire_plugin = True
    forward.__wrapped__ = original
    TransformerBridge.forward = forward


def _install_offline_checkpoints(folder: str):
    from transformer_lens.model_bridge import TransformerBridge

    original = TransformerBridge.boot_transformers

    def boot_transformers(model_name, *args, **kwargs):
        if model_name in OFFLINE_CHECKPOINTS:
            model_name = _offline_checkpoint(folder, model_name)
        return original(model_name, *args, **kwargs)

    TransformerBridge.boot_transformers = staticmethod(boot_transformers)


def _offline_checkpoint(folder: str, name: str) -> str:
    path = os.path.join(folder, name.replace("/", "--"))
    if not os.path.exists(os.path.join(path, "config.json")):
        from transformers import GPT2Config, GPT2LMHeadModel

        from hookwire.tokenizer import byte_level_tokenizer

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**OFFLINE_CHECKPOINTS[name], bos_token_id=256,
                                           eos_token_id=256))
        tmp = path + ".tmp"
        model.save_pretrained(tmp)
        byte_level_tokenizer(bos_id=256).save_pretrained(tmp)
        os.replace(tmp, path)
    return path


# ---- pytest hooks -------------------------------------------------------------------------

def pytest_addoption(parser):
    group = parser.getgroup("hookwire")
    group.addoption("--hookwire-mode", choices=("local", "remote"), default="remote",
                    help="remote: hooked forwards run on a hookwire server; local: counted only")
    group.addoption("--hookwire-report", default=None, help="write per-test outcomes (JSON)")
    group.addoption("--hookwire-offline-checkpoints", default=None,
                    help="folder for random-weight stand-ins of hub checkpoints")


def pytest_configure(config):
    _mode["value"] = config.getoption("--hookwire-mode")
    _install_routing()
    folder = config.getoption("--hookwire-offline-checkpoints")
    if folder:
        os.makedirs(folder, exist_ok=True)
        _install_offline_checkpoints(folder)
    config._hookwire_results = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _record
    _record = _Record()
    yield
    _hosts.stop_dead()
    item.config._hookwire_results.append({
        "nodeid": item.nodeid, "outcome": _outcome(_record.phases),
        "hooked_forwards": _record.hooked_forwards,
        "remote_forwards": _record.remote_forwards,
        "host_errors": _record.host_errors[:3],
        **_failure(_record.phases)})


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    entry = {"outcome": report.outcome}
    if call.excinfo is not None and report.outcome == "failed":
        exc = call.excinfo.value
        chain = _chain(exc)
        entry["error_type"] = type(exc).__name__
        entry["error"] = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        entry["hookwire_error"] = next((type(e).__name__ for e in chain
                                        if isinstance(e, HookwireError)), None)
        entry["where"] = _where(call.excinfo.tb)
    _record.phases[call.when] = entry


def pytest_sessionfinish(session, exitstatus):
    _hosts.stop_all()
    hookwire.client.close_connections()
    path = session.config.getoption("--hookwire-report")
    if path:
        with open(path, "w") as fh:
            json.dump({"mode": _mode["value"], "tests": session.config._hookwire_results},
                      fh, indent=1)


def _chain(exc):
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _where(tb) -> str:
    frames = traceback.extract_tb(tb)
    inner = [f for f in frames if "site-packages" not in f.filename] or frames
    f = inner[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno}"


def _outcome(phases: dict) -> str:
    if any(p["outcome"] == "failed" for w, p in phases.items() if w != "call"):
        return "error"
    call = phases.get("call")
    if call is None:
        return phases.get("setup", {}).get("outcome", "skipped")
    return call["outcome"]


def _failure(phases: dict) -> dict:
    for when in ("setup", "call", "teardown"):
        p = phases.get(when)
        if p and p["outcome"] == "failed":
            return {k: p.get(k) for k in ("error_type", "error", "hookwire_error", "where")}
    return {}
