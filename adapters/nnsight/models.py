"""nnsight's model classes with ``remote=`` pointing at a hookwire server.

* :class:`RemoteLanguageModel` -- ``RemoteLanguageModel("tiny-llama")``: an nnsight
  ``LanguageModel`` over a weightless stand-in built from the server's manifest (config,
  tokenizer files); every trace and generation runs on the server.
* :class:`LanguageModel` and :class:`NNsight` -- nnsight's own classes, constructed exactly as
  nnsight's (your HF model with its weights, a tokenizer, ...); ``remote=True`` (the
  configured server) or ``remote="ws://host:port"`` runs a trace on hookwire, anything else
  is nnsight's (local, ``remote="local"``, NDIF).

For a model of any other nnsight class, pass the backend yourself:
``model.trace(prompt, backend=hookwire.nnsight.RemoteBackend("tiny-gpt2"))``.
"""
from __future__ import annotations

from nnsight.modeling.base import NNsight as _NNsight
from nnsight.modeling.language import LanguageModel as _LanguageModel

from hookwire.client import get_connection
from hookwire.errors import HookwireError
from hookwire.families import build_hf_model
from hookwire.nnsight.backend import RemoteBackend
from hookwire.tokenizer import tokenizer_from_files


def _ours(remote) -> bool:
    return remote is True or (isinstance(remote, str) and remote.startswith(("ws://",
                                                                             "wss://")))


class _RemoteTrace:
    """``trace`` (and through it ``generate``) with hookwire's ``remote=``."""
    _hookwire_remote_default = False
    _hookwire_url: str | None = None
    _hookwire_api_key: str | None = None

    def trace(self, *inputs, remote=None, blocking: bool = True, progress=None,
              remote_model: str | None = None, api_key: str | None = None, backend=None,
              **kwargs):
        if remote is None:
            remote = self._hookwire_remote_default
        if backend is None and _ours(remote):
            backend = RemoteBackend(remote_model or getattr(self, "_hookwire_model", None),
                                    url=remote if isinstance(remote, str) else self._hookwire_url,
                                    api_key=api_key or self._hookwire_api_key,
                                    blocking=blocking, progress=progress)
            return super().trace(*inputs, backend=backend, **kwargs)
        if remote:
            if not isinstance(self, _LanguageModel):
                raise HookwireError(f"remote={remote!r}: NNsight runs remotely on a hookwire "
                                    "server only (remote=True or 'ws://...')")
            kwargs.update(remote=remote, blocking=blocking)
        return super().trace(*inputs, backend=backend, **kwargs)

    def session(self, *args, remote=None, **kwargs):
        # On hookwire a session is nnsight's own, run here; its traces run remotely one by
        # one (remote= on each, or by default on a RemoteLanguageModel).
        if _ours(remote):
            raise HookwireError("a session runs remotely trace by trace on hookwire: open it "
                                "without remote= and pass remote= to each trace inside it")
        if remote:
            kwargs["remote"] = remote
        return super().session(*args, **kwargs)


class LanguageModel(_RemoteTrace, _LanguageModel):
    """nnsight's ``LanguageModel`` with ``remote=True`` / ``remote="ws://..."`` on hookwire
    (``remote_model="name"`` picks the served model when several would fit)."""


class NNsight(_RemoteTrace, _NNsight):
    """nnsight's ``NNsight`` (any HF causal LM module) with ``remote=`` on hookwire."""


class _NoTokenizer:
    """Stands in for the tokenizer of a server model hosted without one: token ids pass
    through nnsight as they are; anything that needs the tokenizer says why it is missing."""

    padding_side = "left"
    truncation_side = "right"
    pad_token = eos_token = bos_token = None
    pad_token_id = eos_token_id = bos_token_id = None
    model_max_length = int(1e30)
    chat_template = None

    def __init__(self, name: str):
        self._name = name

    def _missing(self, what: str):
        return HookwireError(f"the server hosts {self._name!r} without a tokenizer: pass token "
                             "ids (a (batch, seq) int64 tensor or a list of id lists) instead "
                             f"of text ({what} is not available)")

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        raise self._missing(f"tokenizer.{attr}")

    def __call__(self, *args, **kwargs):
        raise self._missing("tokenizing text")


class RemoteLanguageModel(LanguageModel):
    """An nnsight ``LanguageModel`` of a model a hookwire server hosts, without its weights:
    ``with model.trace(prompt):`` and ``with model.generate(prompt, max_new_tokens=n):`` run
    on the server (remote by default). ``url``/``api_key`` default to
    ``hookwire.configure`` / HOOKWIRE_URL / HOOKWIRE_API_KEY."""

    _hookwire_remote_default = True

    def __init__(self, name: str, *, url: str | None = None, api_key: str | None = None,
                 **kwargs):
        info = get_connection(url, api_key).model_info(name)
        stand_in, _ = build_hf_model(info.architecture, info.config, device="meta")
        # A server model without a tokenizer (hosted with none): traces take token ids.
        tokenizer = tokenizer_from_files(info.tokenizer_files) if info.tokenizer_files \
            else _NoTokenizer(name)
        super().__init__(stand_in, tokenizer=tokenizer, device="meta", **kwargs)
        self._hookwire_model = name
        self._hookwire_url, self._hookwire_api_key = url, api_key

    def trace(self, *inputs, remote=None, **kwargs):
        if remote is False or remote == "local":
            raise HookwireError(f"{self._hookwire_model!r} has no weights here: it runs "
                                "remotely only")
        return super().trace(*inputs, remote=remote, **kwargs)

    def interleave(self, fn, *args, **kwargs):
        from torch._guards import detect_fake_mode
        # model.scan(...) runs on fake tensors (shapes only): it needs no weights.
        if not getattr(fn, "_hookwire", False) and detect_fake_mode() is None:
            raise HookwireError(f"{self._hookwire_model!r} has no weights here: run it in a "
                                "`with model.trace(...)` or `with model.generate(...)` block")
        return super().interleave(fn, *args, **kwargs)


__all__ = ["LanguageModel", "NNsight", "RemoteLanguageModel"]
