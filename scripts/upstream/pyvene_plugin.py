"""A pytest plugin that runs pyvene's own test suite (a checkout of stanfordnlp/pyvene) with
no hub access, locally or re-pointed at a hookwire server.

Loaded by ``scripts/upstream/run_pyvene_tests.py`` (``-p pyvene_plugin``); the mode comes from
``HOOKWIRE_UPSTREAM_MODE``:

``local``   pyvene as it is. Only the hub is replaced: ``from_pretrained`` of the names pyvene's
            helpers load ("gpt2", "sharpbai/alpaca-7b-merged", TinyStories, flan-t5) builds the
            model from its config with seeded random weights (the published configs' shapes),
            and tokenizers are hookwire's byte-level tokenizer (no download).
``remote``  the same, and ``IntervenableModel(config, model)`` becomes
            ``hookwire.pyvene.RemoteIntervenableModel(config, <name>)`` on a hookwire server
            started in this process that hosts ``model`` (one server per model object, at most
            one alive at a time). ``IntervenableModel.load(dir, model=m)`` becomes
            ``RemoteIntervenableModel.load(dir, <name>)``. Everything else in the tests --
            golden outputs computed with the local model, assertions -- is unchanged.

Nothing here changes what a test computes or asserts.
"""
from __future__ import annotations

import copy
import gc
import os
import traceback

import pytest
import torch

MODE = os.environ.get("HOOKWIRE_UPSTREAM_MODE", "local")

# Shapes of the checkpoints pyvene's helpers download (their published configs), built with
# random weights instead. Anything else falls back to the config class's defaults.
_CONFIGS = {
    "roneneldan/TinyStories-33M": dict(hidden_size=768, num_layers=4, num_heads=16,
                                       attention_types=[[["global", "local"], 2]],
                                       max_position_embeddings=2048, window_size=256,
                                       vocab_size=50257),
    "google/flan-t5-small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64,
                                 feed_forward_proj="gated-gelu", vocab_size=32128),
}


def _offline_hub():
    """from_pretrained without a download: configs from the table above (else defaults),
    models built from their config with seed 0, tokenizers byte-level."""
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    from hookwire.tokenizer import byte_level_tokenizer

    def config_from_pretrained(cls, name, *args, **kwargs):
        return cls(**_CONFIGS.get(str(name), {}))

    def model_from_pretrained(cls, name, *args, config=None, torch_dtype=None, dtype=None,
                              **kwargs):
        if config is None:
            config = config_from_pretrained(cls.config_class, name)
        torch.manual_seed(0)
        model = cls(config).eval()
        want = dtype or torch_dtype
        return model.to(want) if isinstance(want, torch.dtype) else model

    tokenizer = byte_level_tokenizer(bos_id=256)   # built before from_pretrained is replaced

    def tokenizer_from_pretrained(cls, name, *args, **kwargs):
        return copy.deepcopy(tokenizer)

    PretrainedConfig.from_pretrained = classmethod(config_from_pretrained)
    PreTrainedModel.from_pretrained = classmethod(model_from_pretrained)
    PreTrainedTokenizerBase.from_pretrained = classmethod(tokenizer_from_pretrained)
    import transformers
    for name in ("GPT2Tokenizer", "LlamaTokenizer", "T5Tokenizer", "AutoTokenizer"):
        cls = getattr(transformers, name, None)
        if cls is not None:
            cls.from_pretrained = classmethod(tokenizer_from_pretrained)


class _Servers:
    """One hookwire server per hosted model object (the most recent stays alive)."""

    def __init__(self):
        self.alive: list[tuple[object, object, str]] = []   # (model, server, name)
        self.keep = 1   # servers alive at once: each holds a copy of its model
        self.started = 0

    def name_for(self, model) -> tuple[str, str]:
        for m, srv, name in self.alive:
            if m is model:
                return srv.url, name
        import hookwire.server as hs

        while len(self.alive) >= self.keep:   # make room first: each server holds a copy
            self.alive.pop(0)[1].stop()
        self.started += 1   # a fresh name per server: ports (and so URLs) get reused
        name = f"upstream-{self.started}-{type(model).__name__}"
        srv = hs.start(models={name: model}, port=0)
        self.alive.append((model, srv, name))
        return srv.url, name

    def stop_all(self):
        import hookwire.client

        hookwire.client.close_connections()
        while self.alive:
            self.alive.pop()[1].stop()


SERVERS = _Servers()


def _remote_intervenable_model(pyvene_class):
    import hookwire.pyvene as hpv

    class IntervenableModel:
        """``pv.IntervenableModel(config, model, **kw)`` -> the remote model on a server
        hosting ``model``."""

        def __new__(cls, config, model=None, **kwargs):
            if any(p.is_meta for p in model.parameters()):
                # hookwire's own weightless stand-in: RemoteIntervenableModel builds pyvene's
                # real IntervenableModel over it (through the same public name).
                return pyvene_class(config, model, **kwargs)
            url, name = SERVERS.name_for(model)
            return hpv.RemoteIntervenableModel(config, name, url=url, **kwargs)

        @staticmethod
        def load(load_directory, model, **kwargs):
            url, name = SERVERS.name_for(model)
            return hpv.RemoteIntervenableModel.load(load_directory, name, url=url, **kwargs)

    return IntervenableModel


def pytest_configure(config):
    _offline_hub()
    if MODE == "remote":
        import pyvene
        import pyvene.models.intervenable_base as base

        remote = _remote_intervenable_model(base.IntervenableModel)
        # Before pyvene's test modules import it (``from ..utils import *`` binds the name).
        pyvene.IntervenableModel = remote
        base.IntervenableModel = remote
    elif MODE != "local":
        raise ValueError(f"HOOKWIRE_UPSTREAM_MODE must be 'local' or 'remote', not {MODE!r}")


def pytest_unconfigure(config):
    if MODE == "remote":
        SERVERS.stop_all()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test's traceback keeps its frames, and so its models, alive for the rest of the
    session (pyvene's tests build a gpt2-small per test): clear them once reported."""
    yield
    excinfos = [call.excinfo] + list(getattr(item, "_excinfo", None) or [])
    for excinfo in excinfos:
        if excinfo is not None and excinfo.tb is not None:
            traceback.clear_frames(excinfo.tb)


def pytest_runtest_teardown(item, nextitem):
    gc.collect()
