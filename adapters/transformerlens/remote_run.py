"""``run_with_hooks(..., remote=True)``: trace the hooks TL would call, run the graph on the
server, and hand back what TL would have returned."""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from dataclasses import dataclass

import torch

try:
    from transformer_lens.model_bridge.exceptions import StopAtLayerException
except ImportError:  # TL 2.x has no bridges; its forward returns early instead of raising
    class StopAtLayerException(Exception):
        pass

from hookwire.aliases import plan_aliases
from hookwire.backward_done import (GradientNotAvailable, backward_on_demand,
                                    backward_ran_on_server, gradient_stays_remote,
                                    gradient_unchanged)
from hookwire.client import RemoteModelInfo, get_connection
from hookwire.errors import HookwireError, SiteNotServed, TraceError, UnsupportedModel
from hookwire.frames import DTYPE_NAMES
from hookwire.progress import ProgressBar
from hookwire.rebind import rebind
from hookwire.runs import RemoteRun, SavedValue
from hookwire.trace import Proxy, Tracer, tracing
from hookwire.transformerlens.call_scope import (call_lock, detach_new_hooks,
                                                 forward_goes_remote)
from hookwire.transformerlens.checks import (check_bridge_compatible, check_remote_capable,
                                             hook_flags, implicit_attention_mask,
                                             implicit_position_ids, padding_mask,
                                             position_ids_input, start_input, start_skip)

RETURN_TYPES = ("logits", "loss", "both", None)


class NeedsScalar(HookwireError, ValueError):
    """Backward hooks with no scalar to differentiate (a ``ValueError`` too, as TL's
    ``run_with_cache(incl_bwd=True)`` raises for a non-scalar output)."""


class NothingToDifferentiate(HookwireError, ValueError):
    """Backward hooks on a model whose parameters are all frozen: locally the output has no
    grad_fn (TL raises ``ValueError``); remotely it must not silently differentiate."""


def _all_frozen(model) -> bool:
    params = [p for p in model.parameters() if not p.is_meta]
    return bool(params) and not any(p.requires_grad for p in params)


def model_name_of(model, remote_model: str | None) -> str:
    if remote_model:
        return remote_model
    stand_in = getattr(model, "_hookwire_remote", None)
    if stand_in:
        return stand_in["model"]
    return model.cfg.model_name


def hook_label(hp, key) -> str:
    """The user's hook function as a readable name (TL wraps it in ``full_hook``)."""
    for handle in getattr(hp, "fwd_hooks", []):
        if getattr(handle.hook, "id", None) == key and handle.user_hook is not None:
            fn = handle.user_hook
            if isinstance(fn, functools.partial):
                return f"partial({getattr(fn.func, '__qualname__', fn.func)!s})"
            return getattr(fn, "__qualname__", None) or repr(fn)
    return "hook"


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


def trace_hook_points(model, info: RemoteModelInfo, batch: int, seq: int,
                      tracer: Tracer, stop_at: str | None = None,
                      backward_sites: list | None = None, skip=None) -> bool:
    """Call every forward hook TL registered, in the server's firing order, on proxies.

    With ``stop_at`` (a site name), tracing ends at that site, as a TL forward with
    ``stop_at_layer`` ends there, and its value (after its hooks) is saved as ``__stop__``.
    Sites with backward hooks are listed too, and appended to ``backward_sites`` as
    ``(index, site, hook_point)`` for :func:`trace_backward_hooks`. Sites for which
    ``skip(name)`` is true do not fire in this forward (``start_at_layer``)."""
    hook_dict = cached_hook_points(model)
    hooked = {id(hp) for hp in hook_dict.values() if hp._forward_hooks or hp._backward_hooks}
    check_served(hook_dict, info)
    stamp_token_shape(hook_dict, batch, seq)
    covered = set()
    with tracing(tracer):
        for site in info.sites:
            if skip is not None and skip(site.name):
                hp = hook_dict.get(site.name)
                if hp is not None:
                    covered.add(id(hp))
                continue
            hp = hook_dict.get(site.name)
            stopping = stop_at is not None and site.name == stop_at and site.call == 0
            if hp is None or not (hp._forward_hooks or hp._backward_hooks or stopping):
                continue
            covered.add(id(hp))
            # Backward hooks fire only where a gradient arrives (as locally).
            if hp._backward_hooks and backward_sites is not None and site.grad:
                backward_sites.append((len(tracer.sites), site, hp))
            if not (hp._forward_hooks or stopping):
                if site.grad:
                    tracer.add_site(site.name, site.call)  # its gradient is read, not its value
                continue
            x = tracer.read_site(site.name, site.call, site.concrete_shape(batch, seq),
                                 site.dtype)
            index = len(tracer.sites) - 1
            out = x
            stopped_by_hook = None
            for key, fn in list(hp._forward_hooks.items()):
                tracer.context = (hook_label(hp, key), site.name)
                try:
                    if hp._forward_hooks_with_kwargs.get(key):
                        result = fn(hp, (x,), {}, out)
                    else:
                        result = fn(hp, (x,), out)
                except StopAtLayerException as exc:
                    # TL's run_with_cache(stop_at_layer=k) stops the forward from a hook.
                    stopped_by_hook = exc.layer_output
                    break
                if result is not None:
                    out = result
            tracer.context = None
            if x._hw_version > 0:
                tracer.write_site(index, x, "inplace")
            if out is not x:
                out = _token_layout(out, x, hp)
                _check_replacement(out, x, site.name)
                tracer.write_site(index, out, "replace")
            if stopping or stopped_by_hook is not None:
                tracer.save("__stop__", out if stopped_by_hook is None else stopped_by_hook)
                return True  # later hook points never fire: the forward stops here
            del x, out
    missing = hooked - covered
    if missing:
        # Hook points the server knows but that never fire in a forward (e.g. a fused qkv
        # input on GPT-2) are no-ops, as they are locally. Unknown ones are an error.
        names = [n for n, hp in hook_dict.items()
                 if id(hp) in missing and n not in info.hook_names]
        if names:
            raise HookwireError(f"hooks on {names[:5]} cannot run remotely: the server's "
                                "model has no such hook point (is it the same architecture?)")
    return False


def stamp_token_shape(hook_dict: dict, batch: int, seq: int) -> None:
    """Some TL hook conversions need the live (batch, seq) to show a hook the shape it sees
    locally: OPT's blocks flatten tokens to (batch*seq, d) around the MLP, and TL's block
    forward stamps (batch, seq) on those hook points' conversions so hooks get
    (batch, seq, d). Here the block's forward runs on the server, so the stamp is made
    before tracing, as the block would make it."""
    for hp in hook_dict.values():
        conversion = getattr(hp, "hook_conversion", None)
        if conversion is not None and hasattr(conversion, "batch_seq"):
            conversion.batch_seq = (batch, seq)


def check_served(hook_dict: dict, info: RemoteModelInfo) -> None:
    """Refuse, before anything is sent, hooks on hook points that fire in the server's forward
    but that it cannot run hooks on as they run locally (the manifest says why)."""
    for name, hp in hook_dict.items():
        if not (hp._forward_hooks or hp._backward_hooks):
            continue
        reason = info.unserved_reason(getattr(hp, "name", None) or name) or \
            info.unserved_reason(name)
        if reason is not None:
            raise SiteNotServed(f"a hook on {name!r} cannot run remotely: {reason}. Hook a "
                                "neighbouring site instead, or run this model locally",
                                site=name)


def trace_backward_hooks(backward_sites: list, batch: int, seq: int, tracer: Tracer) -> None:
    """Call every backward hook on the gradient of its site, latest site first (the order a
    backward pass reaches them). Hooks that read gradients are supported; hooks that change
    them are refused (the server's backward pass does not run graph nodes mid-way)."""
    with tracing(tracer):
        for index, site, hp in reversed(backward_sites):
            if hp._backward_pre_hooks:
                raise HookwireError(f"backward pre-hooks on {site.name!r} cannot run remotely")
            grad = tracer.read_grad(index, site.concrete_shape(batch, seq), site.dtype)
            for key, fn in list(hp._backward_hooks.items()):
                tracer.context = (_bwd_hook_label(hp, key), site.name)
                # TL's backward wrapper takes (module, grad_input, grad_output); for a hook
                # point both are the gradient of its output.
                result = fn(hp, (grad,), (grad,))
                if not gradient_unchanged(result, grad) or grad._hw_version > 0:
                    raise TraceError(f"a backward hook on {site.name!r} changes the gradient; "
                                     "remote backward hooks can read gradients (cache, "
                                     "attribute, reduce them) but not replace them")
            tracer.context = None
            del grad


def _bwd_hook_label(hp, key) -> str:
    for handle in getattr(hp, "bwd_hooks", []):
        if handle.user_hook is not None:
            fn = handle.user_hook
            return getattr(getattr(fn, "func", fn), "__qualname__", None) or repr(fn)
    return "backward hook"


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


_HOOK_POINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cached_hook_points(model) -> dict:
    """name -> HookPoint, computed once per model: TL 4 rebuilds ``hook_dict`` (with its
    aliases) on every access, which costs more than tracing a typical hook."""
    points = _HOOK_POINTS.get(model)
    if points is None:
        points = {name: hp for name, hp in model.hook_dict.items()
                  if hasattr(hp, "_forward_hooks")}
        _HOOK_POINTS[model] = points
    return points


def _token_layout(out, x, hp):
    """TL's OPT conversion reverts what a hook returns to the flattened (batch*seq, d) layout
    even at hook points whose activation is (batch, seq, d), and locally torch then carries
    the flattened tensor on (the values are the same). On the server the write keeps the
    site's own layout: the same elements, reshaped."""
    if getattr(hp, "hook_conversion", None) is None or not isinstance(out, torch.Tensor) or \
            out.dtype != x.dtype or out.dim() == x.dim():
        return out
    shape, got = tuple(x.shape), tuple(out.shape)
    flat = (shape[0] * shape[1],) + shape[2:] if len(shape) >= 2 else None
    if got == flat or (len(got) >= 2 and (got[0] * got[1],) + got[2:] == shape):
        return out.reshape(shape)
    return out


def _check_replacement(out, x, site_name):
    if not isinstance(out, torch.Tensor):
        raise TraceError(f"a hook on {site_name!r} returned a {type(out).__name__}; return a "
                         "tensor or None")
    if type(out) is Proxy and out._hw_key[1:3] == x._hw_key[1:3]:
        return  # same shape and dtype (read from the proxy's cached key: no torch dispatch)
    if tuple(out.shape) != tuple(x.shape) or out.dtype != x.dtype:
        raise TraceError(f"a hook on {site_name!r} returned a tensor of shape "
                         f"{tuple(out.shape)} {out.dtype}; the activation is {tuple(x.shape)} "
                         f"{x.dtype}")


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
    # The call as given, for a backward pass asked for later (see ``deferred`` below).
    again = functools.partial(
        remote_forward, model, RemoteTarget(target.url, target.api_key, target.model,
                                            target.progress),
        input, return_type=return_type, loss_per_token=loss_per_token,
        prepend_bos=prepend_bos, padding_side=padding_side, attention_mask=attention_mask,
        stop_at_layer=stop_at_layer, start_at_layer=start_at_layer, progress=progress,
        output_attentions=output_attentions, **kwargs)
    from hookwire.transformerlens import legacy  # lazy: legacy.py imports this module
    check_remote_capable(model)
    position_ids = kwargs.pop("position_ids", None)
    unsupported = {k: v for k, v in kwargs.items() if v is not None}
    if unsupported:
        raise HookwireError(f"not supported in remote runs yet: {sorted(unsupported)}")
    conn = get_connection(target.url, target.api_key)
    name = target.model or model_name_of(model, None)
    is_legacy = legacy.is_legacy(model)
    flags = hook_flags(model)
    info = conn.model_info(name, flags)
    if info.tl_refused is not None:
        raise UnsupportedModel(f"model {name!r}: TransformerLens hook points are not served: "
                               f"{info.tl_refused}", architecture=info.architecture)
    if not is_legacy:
        check_bridge_compatible(model, info)
    start = None
    if start_at_layer is not None:
        if return_type in ("loss", "both"):  # as TL's forward says (it has no tokens)
            raise ValueError("Cannot compute loss with inputs_embeds — token IDs required "
                             "for labels.")
        start, residual = start_input(model, info, input, start_at_layer)
        batch, seq = residual.shape[:2]
        tokens = torch.zeros((batch, seq), dtype=torch.int64)  # sizes only: see build_request
    else:
        texts = input if isinstance(input, list) else None
        if isinstance(input, (str, list)):
            input = model.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        tokens = tokens_of(model, input)
        batch, seq = tokens.shape
        if attention_mask is None and texts is not None:
            attention_mask = implicit_attention_mask(model, texts, tokens, padding_side)
            if attention_mask is not None and position_ids is None:
                position_ids = implicit_position_ids(model, attention_mask)
    mask = padding_mask(attention_mask, tokens) if attention_mask is not None else None
    positions = position_ids_input(position_ids, tokens, getattr(model.cfg, "n_ctx", None)) \
        if position_ids is not None else None
    tracer = Tracer()
    backward_sites: list = []
    if is_legacy:  # TL 2.x names and semantics, mapped onto the TL 4 sites
        trace, stop_site, trace_bwd = (legacy.trace_hook_points, legacy.stop_site,
                                       legacy.trace_backward_hooks)
    else:
        trace, stop_site, trace_bwd = trace_hook_points, _stop_site, trace_backward_hooks
    with call_lock(model):  # no other call adds or removes TL hooks while they are traced
        stopped = trace(model, info, batch, seq, tracer,
                        stop_site(model, info, stop_at_layer),
                        backward_sites, skip=start_skip(model, start, is_legacy))
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
        send_output = True
        exclude = ()
        if differentiate or metric is not None:
            scalar = trace_backward_target(tracer, info, model, batch, seq, return_type,
                                           loss_per_token, metric)
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
                trace_bwd(backward_sites, batch, seq, tracer)
            exclude = (id(scalar),)
            del scalar
        escaped = tracer.escaped(exclude_ids=exclude)
        # Values that are whole views of one another locally (a cache keyed by every alias
        # of a hook point) travel once; the client makes the views (hookwire.aliases).
        aliases = plan_aliases(escaped)
        for k, root in enumerate(aliases.roots):
            tracer.save(f"__escaped_{k}", root)
        graph, tensors = build_request(tracer, name, tokens, return_type, loss_per_token,
                                       send_output)
        graph["forward"]["output_attentions"] = bool(output_attentions)
        if flags:
            graph["forward"]["tl_flags"] = sorted(flags)
        if mask is not None:
            graph["inputs"]["attention_mask"] = "attention_mask"
            tensors["attention_mask"] = mask
        if positions is not None:
            graph["inputs"]["position_ids"] = "position_ids"
            tensors["position_ids"] = positions
        if start is not None:
            graph["forward"]["start_at_layer"] = start
            graph["inputs"]["residual"] = "residual"
            tensors["residual"] = residual
        show = target.progress if progress is None else progress
        run = target.run
        released = _traced(model, target)
    arrived: dict[int, torch.Tensor] = {}

    def on_value(value_name, value):
        if value_name.startswith("__escaped_"):
            made = aliases.values_for(int(value_name[10:]), value)
            if run is not None:  # non-blocking: put each value in place the moment it arrives
                rebind([escaped[i] for i, _ in made], [v for _, v in made])
            else:  # blocking: one heap walk at the end for all of them
                arrived.update(made)
        if run is not None:
            run.emit(SavedValue(value_name, value))
    on_submit = None if run is None else (lambda request_id: run.submitted(conn, request_id))
    # If this very model object is also hosted by a server in this process (tests do that),
    # the traced hooks must not fire on the server's real forward: park them meanwhile.
    parked = _hooks_parked(model) if getattr(model, "_hookwire_hosted", False) else \
        contextlib.nullcontext()
    try:
        with parked, ProgressBar(name, len(tracer.sites), show) as bar:
            def events(msg):
                bar.on_event(msg)
                if run is not None:
                    run.emit(msg)
            try:
                result = conn.run(graph, tensors, on_event=events, on_value=on_value,
                                  on_submit=on_submit,
                                  progress=bar.shows or run is not None)
            except BaseException:
                # As after a local failure: what was stored before the failing point holds
                # its value; proxies stored by later hooks can never get one and refuse to
                # be used.
                if arrived:
                    rebind([escaped[i] for i in arrived], list(arrived.values()))
                tracer.closed = True
                raise
    finally:
        if released:  # TL's own clean-up of this call runs under the model's lock again
            target.lock.acquire()
    if run is None:
        # Where the hooks (and the metric) can reach is searched first (hookwire.rebind).
        roots = tuple(hp for hp in cached_hook_points(model).values()
                      if hp._forward_hooks or hp._backward_hooks) + \
            ((metric,) if metric is not None else ())
        made = dict(arrived)
        for k in range(len(aliases.roots)):
            made.update(aliases.values_for(k, result.values[f"__escaped_{k}"]))
        rebind(escaped, [made[i] for i in range(len(escaped))], roots=roots,
               expected=tracer.user_refs)
    # With autograd on and trainable weights, a local output has a grad_fn; a remote one
    # that ran no backward pass gets one that says why it cannot differentiate.
    local_grad = torch.is_grad_enabled() and not _all_frozen(model)
    plain = gradient_stays_remote if local_grad else (lambda value: value)
    if stopped:
        # What a TL forward with stop_at_layer returns (TL 2.x and TL 4 alike): the residual.
        return plain(result.values["__stop__"])
    done = backward_ran_on_server if differentiate else plain
    if metric is not None:  # hookwire's own argument: its value pretends no backward
        return done(result.values["__metric__"]) if differentiate else \
            result.values["__metric__"]
    if return_type == "logits":
        if deferred:
            return backward_on_demand(result.values["__logits__"],
                                      lambda grad: _backward_later(again, grad))
        return plain(result.values["__logits__"])
    if return_type == "loss":
        return done(result.values["__loss__"])
    if return_type == "both":
        return plain(result.values["__logits__"]), done(result.values["__loss__"])
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


def _stop_site(model, info: RemoteModelInfo, stop_at_layer) -> str | None:
    """The site where a forward with ``stop_at_layer`` stops: the input hook of that block
    (TL raises there, after the hook ran). None when no block stops it."""
    if stop_at_layer is None:
        return None
    n_layers = model.cfg.n_layers
    k = n_layers + stop_at_layer if stop_at_layer < 0 else stop_at_layer
    if not 0 <= k < n_layers:
        return None
    name = f"blocks.{k}.hook_in"
    if (name, 0) not in info.site_index:
        raise HookwireError(f"stop_at_layer={stop_at_layer}: the server's model has no site "
                            f"{name!r}")
    return name


@contextlib.contextmanager
def _hooks_parked(model):
    parked = []
    for hp in cached_hook_points(model).values():
        for attr in ("_forward_hooks", "_backward_hooks"):
            hooks = getattr(hp, attr)
            if hooks:
                parked.append((hp, attr, hooks))
                setattr(hp, attr, type(hooks)())
    try:
        yield
    finally:
        for hp, attr, hooks in parked:
            setattr(hp, attr, hooks)


__all__ = ["remote_forward", "forward_goes_remote", "RemoteTarget", "trace_hook_points",
           "build_request", "cached_hook_points", "Proxy", "DTYPE_NAMES"]
