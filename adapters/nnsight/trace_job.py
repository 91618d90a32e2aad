"""One remote ``with model.trace(...)`` block: its graph, its request, its values.

The block runs through nnsight's own tracer (``tracer.execute``) with the model's forward
replaced by :class:`hookwire.nnsight.forward.ForwardDriver`; the graph is what the block's code
recorded, with every proxy the block left somewhere (a saved variable, a list, a cache) saved
as ``__escaped_<i>``.
"""
from __future__ import annotations

import torch

from hookwire.ir.special import OUTPUT_READ
from hookwire.nnsight.forward import ForwardDriver
from hookwire.nnsight.gradients import Backward
from hookwire.trace import Tracer, trace_error, tracing

# Model inputs a remote forward takes; a left-padded batch of invokes brings all three.
INPUTS = ("input_ids", "attention_mask", "position_ids")
_NEUTRAL = {"use_cache": (False, True, None), "return_dict": (True, None),
            "output_attentions": (False, None), "output_hidden_states": (False, None)}


def real_inputs(envoy, original_fn, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The forward's inputs as nnsight assembled them, on the CPU (a weightless stand-in's
    ``interleave`` moved them to the meta device: assemble them again, which is pure)."""
    batcher = envoy.interleaver.batcher
    if batcher is not None and batcher.invokes:
        args, kwargs = batcher.assemble(original_fn)

    def cpu(v):
        return v.detach().to("cpu") if isinstance(v, torch.Tensor) else v
    return tuple(cpu(a) for a in args), {k: cpu(v) for k, v in kwargs.items()}


def model_inputs(args: tuple, kwargs: dict, what: str = "forward") -> dict[str, torch.Tensor]:
    """``input_ids`` (and ``attention_mask`` / ``position_ids`` where they change anything)
    from a forward's call; anything else the server could not pass on raises."""
    given = dict(kwargs)
    if args:
        if "input_ids" in given or len(args) > 1:
            raise trace_error(f"positional inputs to a remote {what} beyond the token ids",
                              "pass input_ids (and attention_mask) only")
        given["input_ids"] = args[0]
    for key, value in given.items():
        if key in INPUTS or (key in _NEUTRAL and value in _NEUTRAL[key]):
            continue
        raise trace_error(f"the model input {key}={type(value).__name__} of a remote {what}",
                          "the server runs the forward on input_ids (with attention_mask and "
                          "position_ids for padded batches): pass token ids or text only")
    ids = given.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32) or \
            ids.dim() not in (1, 2):
        raise trace_error("a remote forward without token ids",
                          "trace text, or a (batch, seq) tensor of token ids")
    ids = ids.to(torch.int64)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    out = {"input_ids": ids}
    mask = given.get("attention_mask")
    if isinstance(mask, torch.Tensor) and not bool(mask.all()):
        out["attention_mask"] = mask.to(torch.int64).reshape(ids.shape)
    positions = given.get("position_ids")
    if isinstance(positions, torch.Tensor):
        plain = torch.arange(ids.shape[1]).expand_as(ids)
        positions = positions.to(torch.int64).expand_as(ids)
        if not torch.equal(positions, plain):
            out["position_ids"] = positions.contiguous()
    return out


class ForwardJob:
    """A ``model.trace`` block traced into one graph."""

    def __init__(self, envoy, target):
        self.envoy, self.target, self.info = envoy, target, target.info
        self.tracer = Tracer()
        self.inputs: dict | None = None
        self.graph: dict | None = None
        self.escaped: list = []

    def trace(self, nn_tracer) -> None:
        hw, target = self.tracer, self.target
        hw.track_grad = torch.is_grad_enabled()
        # Locally the block's activations require grad (grad on, trainable weights): torch
        # then refuses in-place edits of unbind/split/chunk pieces, and so does the trace.
        hw.activations_require_grad = hw.track_grad and any(
            p.requires_grad for p in self.envoy._module.parameters())
        hw.parameters = target.parameters
        backward = Backward(hw, self.info)
        original = nn_tracer.fn

        def forward(*args, **kwargs):
            args, kwargs = real_inputs(self.envoy, original, args, kwargs)
            self.inputs = model_inputs(args, kwargs)
            batch, seq = self.inputs["input_ids"].shape
            # Locally HF makes a KV cache (and hands it to every layer) unless told not to.
            config = getattr(self.envoy._module, "config", None)
            local_cache = kwargs.get("use_cache", getattr(config, "use_cache", False))
            driver = ForwardDriver(self.info, self.envoy.interleaver, hw, target.events,
                                   batch, seq, root=target.root, output_cls=target.output_cls,
                                   lm_head=target.lm_head, local_cache=bool(local_cache))
            return driver.run(args, kwargs)

        forward.__name__ = getattr(original, "__name__", "forward")
        forward._hookwire = True
        nn_tracer.fn = forward
        try:
            with tracing(hw):
                nn_tracer.execute(nn_tracer.info.code)
        except BaseException:
            hw.closed = True   # proxies the block kept from a failed trace must never run
            raise
        finally:
            backward.close()
        self.escaped = hw.escaped()
        for i, proxy in enumerate(self.escaped):
            hw.save(f"__escaped_{i}", proxy)
        if self.inputs is None or not (hw.saves or hw.backward is not None):
            return   # the block stopped before the forward, or keeps nothing: no request
        reads_output = any(n["op"] == OUTPUT_READ for n in hw.nodes)
        self.graph = {"version": 1, "model": self.info.name,
                      "inputs": {k: k for k in self.inputs},
                      "constants": hw.constant_ids(), "sites": hw.sites, "nodes": hw.nodes,
                      "saves": hw.saves, "backward": hw.backward,
                      "forward": {"return_type": "logits" if reads_output else None,
                                  "send_output": False}}

    def pending_ids(self) -> set[int]:
        return {id(p) for p in self.escaped}

    def user_refs(self) -> dict[int, int]:
        """id -> references the caller's code holds, for each proxy left behind."""
        return dict(self.tracer.user_refs)

    def progress_total(self) -> int:
        return len(self.tracer.sites)

    @property
    def tracers(self) -> list[Tracer]:
        return [self.tracer]

    def request(self) -> tuple[dict, dict, dict | None] | None:
        """(graph, tensors, further submit fields) to send, or None: nothing to run."""
        if self.graph is None:
            return None
        return self.graph, {**self.inputs, **self.tracer.constants}, None

    def replacements(self, values: dict) -> tuple[list, list]:
        olds = self.escaped
        news = [values[f"__escaped_{i}"] for i in range(len(olds))]
        self.escaped = []
        return olds, news


__all__ = ["ForwardJob", "real_inputs", "model_inputs"]
