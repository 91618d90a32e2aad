"""Server side of a generate request: validation before anything runs, then the token loop.

A generate request (``Submit.generate``, :mod:`hookwire.generation`) runs alone on the plain
HF module tree with the model's KV cache: forward 0 on the prompt (with the submit's graph),
forward k on the k-th new token (with ``steps[k-1]`` when given); between two tokens, light
requests of other users that wait may run (``server/give_way.py``). Every graph is validated as
any graph is -- structure, sites, shapes on the meta device for its own input size, limits --
and ``max_new_tokens`` is bounded by ``Limits.max_new_tokens`` (and the sequence by
``max_seq``). Each chosen token is sent the moment it exists; values a graph saves come back
as ``"<step>/<name>"``. Nothing the client sent is ever run as code: the graphs are data.
"""
from __future__ import annotations

import time

import torch
from transformers import DynamicCache

from hookwire.errors import (Cancelled, DeadlineExceeded, GraphValidationError, LimitExceeded,
                             ProtocolError, UnsupportedModel)
from hookwire.executor import Interleaver
from hookwire.generation import (PaddedPrompts, check_prompt_mask, finish_rows,
                                 make_generator, next_tokens, step_name, token_name)
from hookwire.ir.special import SITE_WRITE
from hookwire.kv_cache import cache_kwargs
from hookwire.ir.wire import is_parameter
from hookwire.module_sites import is_module_site
from hookwire.server import replies
from hookwire.server.constants import graph_constants
from hookwire.server.device_rates import rates_for
from hookwire.server.index_guard import embeddings_guarded
from hookwire.validate import infer_shapes, validate_structure


def _check_graph(graph, model: str, what: str):
    if graph.model != model:
        raise GraphValidationError(f"{what} names model {graph.model!r}, the request "
                                   f"{model!r}", rule="generate_model")
    if graph.forward.return_type is not None or graph.backward is not None:
        raise GraphValidationError(f"{what}: a generation forward returns no output and runs "
                                   "no backward pass (the server picks tokens from the logits)",
                                   rule="generate_forward")
    if any(not is_module_site(s.name) for s in graph.sites):
        raise GraphValidationError(f"{what}: generation graphs use HF module sites "
                                   "('hf:...') only", rule="site_kinds")
    if any(n.op == SITE_WRITE and n.kwargs.get("mode") == "narrow" for n in graph.nodes):
        raise GraphValidationError(f"{what}: narrowing writes cannot change the batch of a "
                                   "KV cache", rule="narrow_site")


def validate_generation(job, entry, limits, input_ids) -> list:
    """[(validated graph, its constants)] for forwards 0 .. max_new_tokens-1 (None: a
    forward without intervention). Raises a typed error before anything runs."""
    submit = job.submit
    spec = submit.generate
    if entry.hf_model is None:
        raise ProtocolError(f"model {submit.graph.model!r} has no HF module tree here: "
                            "it cannot generate")
    if entry.generate_refused is not None:
        raise UnsupportedModel(f"model {submit.graph.model!r} cannot generate on this server: "
                               f"{entry.generate_refused}")
    if spec.max_new_tokens > limits.max_new_tokens:
        raise LimitExceeded(f"max_new_tokens={spec.max_new_tokens}; limit "
                            f"{limits.max_new_tokens}", rule="max_new_tokens")
    batch, seq = input_ids.shape
    if seq < 1:
        raise ProtocolError("generation needs a prompt of at least one token")
    if seq + spec.max_new_tokens > limits.max_seq:
        raise LimitExceeded(f"prompt of {seq} + {spec.max_new_tokens} new tokens exceeds "
                            f"max_seq {limits.max_seq}", rule="max_seq")
    n_positions = getattr(entry.hf_model.config, "n_positions", None) or getattr(
        entry.hf_model.config, "max_position_embeddings", None)
    if n_positions and seq + spec.max_new_tokens > n_positions:
        raise LimitExceeded(f"prompt of {seq} + {spec.max_new_tokens} new tokens exceeds the "
                            f"model's {n_positions} positions", rule="max_positions")
    if spec.steps and len(spec.steps) != spec.max_new_tokens - 1:
        raise GraphValidationError(f"{len(spec.steps)} step graphs for {spec.max_new_tokens} "
                                   f"new tokens: give none or {spec.max_new_tokens - 1}",
                                   rule="generate_steps")
    positions = job.tensors.get(submit.graph.inputs.get("position_ids", ""))
    if n_positions and positions is not None and positions.numel() and \
            int(positions[:, -1].max()) + spec.max_new_tokens - 1 >= n_positions:
        # (each new token takes the next position after the prompt's last)
        raise LimitExceeded(f"the prompt's last position {int(positions[:, -1].max())} + "
                            f"{spec.max_new_tokens} new tokens exceeds the model's "
                            f"{n_positions} positions", rule="max_positions")
    mask = job.tensors.get(submit.graph.inputs.get("attention_mask", ""))
    if mask is not None:
        try:
            check_prompt_mask(mask, input_ids)
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
    if sum(len(g.nodes) for g in spec.steps) + len(submit.graph.nodes) > limits.max_nodes:
        raise LimitExceeded(f"the generation's graphs hold more than {limits.max_nodes} nodes",
                            rule="max_nodes")
    out = []
    for k, graph in enumerate([submit.graph] + list(spec.steps)):
        what = "the prompt's graph" if k == 0 else f"step graph {k}"
        _check_graph(graph, submit.graph.model, what)
        if k and graph.inputs:
            raise GraphValidationError(f"{what}: step inputs are the generated tokens",
                                       rule="generate_inputs")
        constants = graph_constants(job, graph, entry, limits, what)
        if not graph.sites and not graph.nodes:
            out.append(None)
            continue
        vg = validate_structure(graph, entry.site_table, entry.site_order, limits)
        infer_shapes(vg, batch, seq if k == 0 else 1, constants, limits,
                     rates=rates_for(entry.hosted.device))
        out.append((vg, constants))
    return out


class _Watch:
    """Stops a generation that was cancelled, lost its client, or ran out of time."""

    def __init__(self, job, t_start: float, limit: float):
        self.job, self.t_start, self.limit = job, t_start, limit

    def __call__(self, *_):
        rid = self.job.request_id
        if rid in self.job.conn.cancelled or self.job.conn.closed:
            raise Cancelled(f"request {rid} was cancelled during generation")
        if time.perf_counter() - self.t_start > self.limit:
            raise DeadlineExceeded(f"request {rid} ran longer than {self.limit:g} s",
                                   rule="max_request_seconds")


def run_generation(worker, p, forwards: list) -> None:
    """The token loop; ``forwards`` is what :func:`validate_generation` returned."""
    job, entry = p.job, p.entry
    spec = job.submit.generate
    model = entry.hf_model
    device = entry.hosted.device
    watch = _Watch(job, p.t_start, worker.limits.max_request_seconds)
    generator = make_generator(spec, device)
    kv = DynamicCache(config=model.config)
    step_input = p.tokens
    forward = type(model).forward  # the class's forward, not an attribute set on the object
    # Padded prompts: each forward's mask and positions, as HF's generate makes them.
    padded = PaddedPrompts.of(p.mask, forward, p.positions)
    sent = [0]

    def saver(k):
        def on_save(name, value, snapshot=True, keep=True):
            sent[0] += worker._send_tensor(job, step_name(k, name), value, snapshot, keep)
        return on_save

    unfinished = torch.ones(p.tokens.shape[0], dtype=torch.bool, device=device)
    steps = spec.max_new_tokens
    with torch.no_grad():
        for k in range(spec.max_new_tokens):
            if k:
                # Between two tokens the model is not in use (the KV cache is this request's
                # own): light requests of other users that wait run here, instead of after
                # every token (a co-tenant's 1 x 8 read waited a whole 240-token generation,
                # 2.4 s). Their time does not count against this request's deadline.
                with worker.give_way.allowed(job.conn.user):
                    watch.t_start += worker.give_way()
            watch()
            inputs = step_input
            extra = {} if padded is None else padded.prompt() if k == 0 else padded.step()

            def run_forward():
                with embeddings_guarded(model):  # ids out of range never reach a kernel
                    return forward(model, input_ids=inputs, use_cache=True,
                                   **cache_kwargs(forward, kv), **extra).logits
            planned = forwards[k] if k < len(forwards) else None
            if planned is None:
                logits = run_forward()
            else:
                vg, constants = planned
                ranges = getattr(entry, "value_ranges", {})
                il = Interleaver(vg, {t: c if is_parameter(t) else c.to(device)
                                      for t, c in constants.items()},
                                 saver(k), watch, watch,
                                 {i: ranges[s.name] for i, s in enumerate(vg.site_infos)
                                  if s.name in ranges},
                                 weights=getattr(entry, "weight_storages", frozenset()),
                                 hold_bytes=worker._hold_bytes(job))
                try:
                    logits = il.run(entry.site_modules, run_forward, need_output=True)
                    il.finish({})
                finally:
                    il.release()
            token = next_tokens(logits[:, -1], spec, generator)
            token, unfinished = finish_rows(token, unfinished, spec)
            sent[0] += worker._send_tensor(job, token_name(k), token, snapshot=False,
                                           keep=False)
            if job.submit.progress:
                job.conn.send_threadsafe(replies.progress(job.request_id, "site", site=k + 1,
                                                          of=spec.max_new_tokens))
            step_input = token[:, None]
            if not bool(unfinished.any()):  # every row chose EOS: as HF's generate, stop
                steps = k + 1
                break
    t_done = time.perf_counter()
    job.answered()
    job.conn.send_threadsafe(replies.done(
        job.request_id, sent[0], job.received_bytes,
        timings=p.timings(t_done, batch_size=1.0, tokens=float(steps))))


__all__ = ["validate_generation", "run_generation"]
