"""``run_with_hooks(..., remote=True)``: trace the hooks TL would call, run the graph on the
server, and hand back what TL would have returned.

:func:`remote_forward` stands in for the model's forward, in named steps: check the call and
the served model (:func:`served_model_info`), turn TL's inputs into the request's
(:func:`forward_inputs`), trace the hooks under the model's lock with the model's
:class:`~hookwire.transformerlens.hook_tracer.Dialect` (:func:`trace_forward`), run the
request through the core's :class:`hookwire.remote_call.RemoteCall` (:func:`send_traced`),
and build what TL's forward returns (:func:`forward_value`)."""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch

from hookwire.backward_done import (GradientNotAvailable, backward_on_demand,
                                    backward_ran_on_server, gradient_stays_remote)
from hookwire.client import RemoteModelInfo, get_connection
from hookwire.errors import HookwireError, TraceError, UnsupportedModel
from hookwire.frames import DTYPE_NAMES
from hookwire.remote_call import Destinations, RemoteCall
from hookwire.runs import RemoteRun
from hookwire.trace import Proxy, Tracer, tracing
from hookwire.transformerlens.call_scope import (call_lock, detach_new_hooks,
                                                 forward_goes_remote)
from hookwire.transformerlens.checks import (check_remote_capable, hook_flags,
                                             implicit_attention_mask, implicit_position_ids,
                                             padding_mask, position_ids_input, start_input,
                                             start_skip)
from hookwire.transformerlens.hook_tracer import (BridgeDialect, Dialect, cached_hook_points,
                                                  hooks_parked, trace_backward_hooks,
                                                  trace_hook_points)
from hookwire.transformerlens.legacy import LegacyDialect, is_legacy

RETURN_TYPES = ("logits", "loss", "both", None)


class NeedsScalar(HookwireError, ValueError):
    """Backward hooks with no scalar to differentiate (a ``ValueError`` too, as TL's
    ``run_with_cache(incl_bwd=True)`` raises for a non-scalar output)."""


class NothingToDifferentiate(HookwireError, ValueError):
    """Backward hooks on a model whose parameters are all frozen: locally the output has no
    grad_fn (TL raises ``ValueError``); remotely it must not silently differentiate."""


def _all_frozen(model) -> bool:
    """Every parameter has ``requires_grad=False`` (locally the output then has no grad_fn).
    A stand-in's meta weights count: freezing the stand-in freezes what it stands for. Stops
    at the first trainable one (a full walk of a bridge's parameters was 0.13-0.18 ms of each
    call's ~2 ms overhead on tiny-gpt2)."""
    params = iter(model.parameters())
    first = next(params, None)
    if first is None or first.requires_grad:
        return False
    return not any(p.requires_grad for p in params)


def model_name_of(model, remote_model: str | None) -> str:
    if remote_model:
        return remote_model
    stand_in = getattr(model, "_hookwire_remote", None)
    if stand_in:
        return stand_in["model"]
    return model.cfg.model_name


def tokens_of(model, input) -> torch.Tensor:
    if isinstance(input, torch.Tensor):
        tokens = input
    elif isinstance(input, (str, list)):
        tokens = model.to_tokens(input)
    else:
        raise TypeError(f"remote runs take token ids or text, not {type(input).__name__}")
    if tokens.device.type == "meta":
        raise HookwireError("token ids are on the meta device")
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        # Locally TL hands a float tensor to the model as input embeddings (and fails unless
        # it is [batch, pos, d_model]); truncating it to token ids would be a silent wrong run.
        raise HookwireError(
            f"the input is a {tokens.dtype} tensor of shape {tuple(tokens.shape)}: remote runs "
            "take integer token ids (model.to_tokens(text), or .long() if these are ids); a "
            "residual-stream tensor goes with start_at_layer=k")
    tokens = tokens.detach().to("cpu")
    if tokens.dim() == 1:
        tokens = tokens.unsqueeze(0)
    return tokens.to(torch.int64)


def trace_backward_target(tracer: Tracer, info: RemoteModelInfo, model, batch: int, seq: int,
                          return_type, loss_per_token: bool, metric):
    """The scalar the server differentiates: ``metric(output)`` traced like a hook, or the
    loss itself. Returns (proxy, forward return_type to request)."""
    dtype = info.output_dtype
    if return_type is None:
        raise HookwireError("metric= and backward hooks need the forward's output: "
                            "return_type=None computes none")
    loss_shape = (batch, seq - 1) if loss_per_token else ()
    outputs = {}
    if return_type in ("logits", "both"):
        width = info.output_width or model.cfg.d_vocab
        outputs["logits"] = tracer.read_output("logits", (batch, seq, width), dtype)
    if return_type in ("loss", "both"):
        outputs["loss"] = tracer.read_output("loss", loss_shape, dtype)
    if metric is None:
        if "loss" not in outputs or loss_per_token:
            raise NeedsScalar(
                "backward hooks in a remote run need a scalar output to differentiate: pass "
                "return_type='loss', or metric=lambda logits: ... (a function of the output, "
                "traced like a hook, whose value the server differentiates)")
        return outputs["loss"]
    output = outputs["logits"] if return_type == "logits" else outputs["loss"] \
        if return_type == "loss" else (outputs["logits"], outputs["loss"])
    with tracing(tracer):
        tracer.context = (getattr(metric, "__qualname__", "metric"), "the model's output")
        value = metric(output)
        tracer.context = None
    if not isinstance(value, Proxy):
        raise TraceError(f"metric returned a {type(value).__name__}, not a tensor computed "
                         "from the model's output")
    return value


def build_request(tracer: Tracer, model_name: str, tokens: torch.Tensor, return_type,
                  loss_per_token: bool, send_output: bool = True) -> tuple[dict, dict]:
    tensors = {"input_ids": tokens}
    tensors.update(tracer.constants)
    graph = {"version": 1, "model": model_name, "inputs": {"input_ids": "input_ids"},
             "constants": list(tracer.constants), "sites": tracer.sites,
             "nodes": tracer.nodes, "saves": tracer.saves,
             "forward": {"return_type": return_type, "loss_per_token": loss_per_token,
                         "send_output": send_output}}
    if tracer.backward is not None:
        graph["backward"] = tracer.backward
    return graph, tensors


@dataclass
class RemoteTarget:
    """Where a remote forward goes: server, key, model name, and whether to show progress."""
    url: str | None = None
    api_key: str | None = None
    model: str | None = None
    progress: bool | None = None
    run: "RemoteRun | None" = None                 # set for blocking=False calls
    traced: "threading.Event | None" = None        # set once tracing is over
    # blocking=False only (see call_scope): the model's call lock, the TL hook handles that
    # were on the model before the call, and whether the call's own come off once traced.
    lock: "threading.RLock | None" = None
    hooks_before: set | None = None
    detach_hooks: bool = False


def dialect_for(model) -> Dialect:
    """TL 2.x names and layouts for a legacy ``HookedTransformer``, TL 4's for a bridge."""
    return LegacyDialect(model) if is_legacy(model) else BridgeDialect(model)


@dataclass
class ForwardInputs:
    """What a TL forward's inputs become in the request: token ids (zeros of the right size
    when the forward starts at a block), a padding mask and position ids where they change
    anything, and the residual a forward with ``start_at_layer`` starts from."""
    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    start: int | None = None
    residual: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq(self) -> int:
        return self.tokens.shape[1]


@dataclass
class TracedForward:
    """A traced TL forward, ready to send: the request, where its values go, and what the
    call returns once it ran (``return_type`` after ``stop_at_layer``; whether the server
    differentiates; whether the backward waits for ``logits.backward(grad)``)."""
    call: RemoteCall
    return_type: str | None
    stopped: bool
    differentiate: bool
    deferred: bool
    metric: object = None


def remote_forward(model, target: RemoteTarget, input, return_type="logits",
                   loss_per_token=False, prepend_bos=None, padding_side=None,
                   attention_mask=None, stop_at_layer=None, start_at_layer=None,
                   progress=None, output_attentions=False, metric=None, **kwargs):
    """Stands in for ``model.forward``: traces every hook TL has put on the model's hook
    points (run_with_hooks', run_with_cache's, hooks() contexts', add_hook's), runs the graph
    on the server, puts the real tensors where the hooks stored theirs, and returns what the
    forward would have returned. TL's own run_with_hooks / run_with_cache / hooks() wrap it,
    so hook resolution, caching keys and contexts are exactly TL's.

    TL's hook switches (``set_use_attn_result`` & co.) travel with the request: the server
    runs that request with the same switches, so the gated hook points fire as locally.
    ``stop_at_layer`` returns the residual entering that block; ``start_at_layer=k`` takes
    ``input`` as the residual entering block k, as TL's forward does.

    Backward hooks (``bwd_hooks``, ``incl_bwd``, ``add_hook(..., dir="bwd")``) make the
    server run a backward pass from a scalar: the loss (``return_type="loss"``) or
    ``metric(output)``, a function the user passes that is traced like a hook. The value
    returned is then that scalar, and its ``.backward()`` is a no-op (see
    :mod:`hookwire.backward_done`). With ``metric`` and no backward hooks, the metric's value
    is returned instead of the output (and the output is not sent)."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}")
    # The call as given, for a backward pass asked for later (see ``deferred``).
    again = functools.partial(
        remote_forward, model, RemoteTarget(target.url, target.api_key, target.model,
                                            target.progress),
        input, return_type=return_type, loss_per_token=loss_per_token,
        prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask,
        stop_at_layer=stop_at_layer, start_at_layer=start_at_layer, progress=progress,
        output_attentions=output_attentions, **kwargs)
    check_remote_capable(model)
    position_ids = kwargs.pop("position_ids", None)
    unsupported = {k: v for k, v in kwargs.items() if v is not None}
    if unsupported:
        raise HookwireError(f"not supported in remote runs yet: {sorted(unsupported)}")
    # Any connection for the model's description (cached after the first call); the one
    # the request goes on is taken after tracing: with the pool full and busy, a
    # blocking=False call returns once traced and its request waits for whichever
    # connection frees first.
    conn = get_connection(target.url, target.api_key, wait=False)
    name = target.model or model_name_of(model, None)
    dialect = dialect_for(model)
    flags = hook_flags(model)
    info = served_model_info(conn, name, flags, dialect)
    inputs = forward_inputs(model, info, input, return_type, prepend_bos, padding_side,
                            attention_mask, position_ids, start_at_layer)
    with call_lock(model):  # no other call adds or removes TL hooks while they are traced
        traced = trace_forward(model, target, dialect, info, name, flags, inputs,
                               return_type, loss_per_token, stop_at_layer, metric,
                               output_attentions, target.progress if progress is None
                               else progress)
        released = _traced(model, target)
    result = send_traced(model, target, get_connection(target.url, target.api_key),
                         traced.call, released)
    return forward_value(model, traced, result.values, again)


def served_model_info(conn, name: str, flags, dialect: Dialect) -> RemoteModelInfo:
    """The server's description of ``name`` with these hook switches, once the server
    serves TL hook points on it and the local model matches it."""
    info = conn.model_info(name, flags)
    if info.tl_refused is not None:
        raise UnsupportedModel(f"model {name!r}: TransformerLens hook points are not served: "
                               f"{info.tl_refused}", architecture=info.architecture)
    dialect.check_model(info)
    return info


def forward_inputs(model, info: RemoteModelInfo, input, return_type, prepend_bos,
                   padding_side, attention_mask, position_ids,
                   start_at_layer) -> ForwardInputs:
    """TL's forward inputs (text, token ids, or the residual entering block
    ``start_at_layer``; a mask and position ids, given or implied by padded text) as the
    request's tensors."""
    start = residual = None
    if start_at_layer is not None:
        if return_type in ("loss", "both"):  # as TL's forward says (it has no tokens)
            raise ValueError("Cannot compute loss with inputs_embeds — token IDs required "
                             "for labels.")
        start, residual = start_input(model, info, input, start_at_layer)
        # sizes only: the forward starts from the residual (see build_request)
        tokens = torch.zeros(tuple(residual.shape[:2]), dtype=torch.int64)
    else:
        texts = input if isinstance(input, list) else None
        if isinstance(input, (str, list)):
            input = model.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        tokens = tokens_of(model, input)
        if attention_mask is None and texts is not None:
            attention_mask = implicit_attention_mask(model, texts, tokens, padding_side)
            if attention_mask is not None and position_ids is None:
                position_ids = implicit_position_ids(model, attention_mask)
    mask = padding_mask(attention_mask, tokens) if attention_mask is not None else None
    positions = position_ids_input(position_ids, tokens, getattr(model.cfg, "n_ctx", None)) \
        if position_ids is not None else None
    return ForwardInputs(tokens, mask, positions, start, residual)


def trace_forward(model, target: RemoteTarget, dialect: Dialect, info: RemoteModelInfo,
                  name: str, flags, inputs: ForwardInputs, return_type, loss_per_token: bool,
                  stop_at_layer, metric, output_attentions, progress) -> TracedForward:
    """Trace the forward's hooks (and the metric and backward hooks, if any) into a request:
    the caller holds the model's lock."""
    tracer = Tracer()
    # Locally TL runs the hooks under the caller's grad mode, on activations that require
    # grad where the weights do: some in-place edits torch then refuses are refused here.
    tracer.activations_require_grad = torch.is_grad_enabled() and any(
        p.requires_grad for p in model.parameters())
    backward_sites: list = []
    stopped = trace_hook_points(model, info, inputs.batch, inputs.seq, tracer,
                                dialect.stop_site(info, stop_at_layer), backward_sites,
                                skip=start_skip(model, inputs.start, dialect.legacy),
                                dialect=dialect)
    differentiate, deferred, return_type = backward_plan(model, target, backward_sites,
                                                         metric, return_type, stopped)
    send_output, exclude = trace_scalar(model, tracer, info, inputs, return_type,
                                        loss_per_token, metric, differentiate,
                                        backward_sites, dialect)
    # Where the hooks (and the metric) can reach is searched first (hookwire.rebind); read
    # now, while the hooks are on the model (a model hosted in this process has them parked
    # during the run).
    destinations = Destinations.keep_escaped(tracer, exclude_ids=exclude, share_views=True,
                                             roots=_rebind_roots(model, metric))
    graph, tensors = build_request(tracer, name, inputs.tokens, return_type, loss_per_token,
                                   send_output)
    add_forward_options(graph, tensors, inputs, flags, output_attentions)
    call = RemoteCall(name, graph, tensors, destinations=destinations, tracers=[tracer],
                      progress=progress)
    return TracedForward(call, return_type, stopped, differentiate, deferred, metric)


def backward_plan(model, target: RemoteTarget, backward_sites: list, metric, return_type,
                  stopped: bool) -> tuple[bool, bool, str | None]:
    """(whether the server differentiates now, whether the backward waits for
    ``logits.backward(grad)``, the return type left to request)."""
    differentiate = bool(backward_sites)
    # Backward hooks and only the logits to return, as in ``model(tokens)`` followed by
    # ``metric(logits).backward()`` (attribution patching's usual spelling): the forward
    # runs now, and the backward when the user asks for it, with the gradient they pass.
    deferred = differentiate and metric is None and return_type == "logits" and \
        not stopped and target.run is None and torch.is_grad_enabled() and \
        not _all_frozen(model)
    if deferred:
        differentiate = False
    if stopped:
        if differentiate or metric is not None:
            raise HookwireError("backward hooks and metric= cannot be combined with "
                                "stop_at_layer: the forward stops before the output")
        return_type = None  # the forward ends at the stop site: nothing after it runs
    return differentiate, deferred, return_type


def trace_scalar(model, tracer: Tracer, info: RemoteModelInfo, inputs: ForwardInputs,
                 return_type, loss_per_token: bool, metric, differentiate: bool,
                 backward_sites: list, dialect: Dialect) -> tuple[bool, tuple]:
    """The metric (saved as ``__metric__``) and the scalar the server differentiates, with
    the backward hooks traced on its gradients. Returns (whether the output is sent, ids of
    the proxies that are not the user's escaped values)."""
    if not (differentiate or metric is not None):
        return True, ()
    scalar = trace_backward_target(tracer, info, model, inputs.batch, inputs.seq,
                                   return_type, loss_per_token, metric)
    send_output = True
    if metric is not None:
        tracer.save("__metric__", scalar)
        send_output = False
    if differentiate:
        if _all_frozen(model):
            raise NothingToDifferentiate(
                "every parameter of the local model has requires_grad=False, so "
                "locally the output has no grad_fn to differentiate and backward "
                "hooks never run; unfreeze them (the server differentiates its own "
                "copy either way, and never changes its weights)")
        if scalar.numel() != 1 or not scalar.dtype.is_floating_point:
            raise TraceError(f"the value to differentiate must be a floating-point "
                             f"scalar, got shape {tuple(scalar.shape)} {scalar.dtype} "
                             "(reduce it, e.g. with .mean() or .sum())")
        tracer.backward = tracer.current(scalar)
        trace_backward_hooks(backward_sites, inputs.batch, inputs.seq, tracer, dialect)
    return send_output, (id(scalar),)


def add_forward_options(graph: dict, tensors: dict, inputs: ForwardInputs, flags,
                        output_attentions) -> None:
    """The forward's options and extra inputs on a request from :func:`build_request`."""
    graph["forward"]["output_attentions"] = bool(output_attentions)
    if flags:
        graph["forward"]["tl_flags"] = sorted(flags)
    for key, value in (("attention_mask", inputs.mask), ("position_ids", inputs.positions)):
        if value is not None:
            graph["inputs"][key] = key
            tensors[key] = value
    if inputs.start is not None:
        graph["forward"]["start_at_layer"] = inputs.start
        graph["inputs"]["residual"] = "residual"
        tensors["residual"] = inputs.residual


def _rebind_roots(model, metric) -> tuple:
    """Where the user's code that saw proxies lives: the hooked hook points (their hook
    functions, ``hook.ctx``) and the metric."""
    return tuple(hp for hp in cached_hook_points(model).values()
                 if hp._forward_hooks or hp._backward_hooks) + \
        ((metric,) if metric is not None else ())


def send_traced(model, target: RemoteTarget, conn, call: RemoteCall, released: bool):
    """Run a traced forward on the server (inside ``target.run`` for a non-blocking call);
    returns its :class:`hookwire.client.RunResult`. ``released``: the model's lock was let go
    after tracing, and is taken again for TL's own clean-up of this call."""
    # If this very model object is also hosted by a server in this process (tests do that),
    # the traced hooks must not fire on the server's real forward: park them meanwhile.
    parked = hooks_parked(model) if getattr(model, "_hookwire_hosted", False) else \
        contextlib.nullcontext()
    try:
        with parked:
            return call.send(conn, run=target.run)
    finally:
        if released:
            target.lock.acquire()


def forward_value(model, traced: TracedForward, values: dict, again):
    """What TL's forward returns, from the values that came back."""
    # With autograd on and trainable weights, a local output has a grad_fn; a remote one
    # that ran no backward pass gets one that says why it cannot differentiate.
    local_grad = torch.is_grad_enabled() and not _all_frozen(model)
    plain = gradient_stays_remote if local_grad else (lambda value: value)
    if traced.stopped:
        # What a TL forward with stop_at_layer returns (TL 2.x and TL 4 alike): the residual.
        return plain(values["__stop__"])
    done = backward_ran_on_server if traced.differentiate else plain
    if traced.metric is not None:  # hookwire's own argument: its value pretends no backward
        return done(values["__metric__"]) if traced.differentiate else values["__metric__"]
    if traced.return_type == "logits":
        if traced.deferred:
            return backward_on_demand(values["__logits__"],
                                      lambda grad: _backward_later(again, grad))
        return plain(values["__logits__"])
    if traced.return_type == "loss":
        return done(values["__loss__"])
    if traced.return_type == "both":
        return plain(values["__logits__"]), done(values["__loss__"])
    return None


def _backward_later(again, grad: torch.Tensor) -> None:
    """``logits.backward(grad)`` of a remote forward that had backward hooks: the same call
    again, with the server differentiating ``(logits * grad).sum()`` -- whose gradient with
    respect to the logits is exactly ``grad`` -- so the backward hooks attached now run on
    the gradients a local backward would give them."""
    model = again.args[0]
    if not any(hp._backward_hooks for hp in cached_hook_points(model).values()):
        # Locally this backward would only fill the parameters' .grad: not here.
        raise GradientNotAvailable(
            "no backward hooks are attached any more, so this remote output's backward "
            "would only give the model's weights gradients, and those stay on the server: "
            "call .backward() while the backward hooks are attached (e.g. inside the "
            "hooks() block), or run the model locally")
    seed = grad.detach().to("cpu")
    again(metric=lambda logits: (logits * seed).sum())


def _traced(model, target: RemoteTarget) -> bool:
    """Tracing is over. For a non-blocking call: take its temporary hooks off the model, let
    the caller go on, and (unless it is a generation, traced at every step) let other calls
    trace while this one waits for the server. True when the model's lock was released."""
    if target.traced is None or target.traced.is_set():
        return False
    release = target.detach_hooks and target.lock is not None and \
        not getattr(model, "_hookwire_hosted", False)  # hosted here: the server's forward
    # runs on this very object, so no other call may add hooks to it meanwhile
    if release:
        detach_new_hooks(model, target.hooks_before)
    target.traced.set()
    if release:
        target.lock.release()
    return release


__all__ = ["remote_forward", "forward_goes_remote", "RemoteTarget", "trace_hook_points",
           "build_request", "cached_hook_points", "dialect_for", "Proxy", "DTYPE_NAMES"]
