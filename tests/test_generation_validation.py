"""Generate requests are validated like every request: crafted ones (wrong step counts, TL
sites, inputs or outputs where a generation forward has none, shapes traced for the wrong
length, limits) get a typed error before anything runs, and the connection keeps serving."""
from __future__ import annotations

import pytest
import torch

import hookwire.hf as hhf
from hookwire.client import get_connection
from hookwire.errors import GraphValidationError, LimitExceeded, ProtocolError
from hookwire.trace import Tracer, tracing
from hookwire.validate import Limits
from serving import serving

PROMPT = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(1))
MLP = "hf:transformer.h.0.mlp:output"


@pytest.fixture(scope="module")
def small_server(hosted):
    with serving(models={"tiny-gpt2": hosted["tiny-gpt2"].bridge},
                 limits=Limits(max_new_tokens=8)) as srv:
        yield srv


CONSTANTS: dict = {}


def graph(seq: int, *, site=MLP, inputs=True, return_type=None, scale=2.0, shift=False):
    """A graph doubling one site for a forward of ``seq`` new tokens (``shift``: plus a
    constant of the site's shape at that length)."""
    info = get_connection().model_info("tiny-gpt2")
    tracer = Tracer()
    with tracing(tracer):
        s = info.sites[info.site_index[(site, 0)]]
        x = tracer.read_site(site, 0, s.concrete_shape(1, seq), s.dtype)
        y = x * scale
        if shift:
            y = y + torch.ones(s.concrete_shape(1, seq))
        tracer.write_site(0, y, "replace")
    renamed = {}
    for tid, t in tracer.constants.items():
        renamed[tid] = f"k{len(CONSTANTS)}"
        CONSTANTS[renamed[tid]] = t
    for node in tracer.nodes:
        node["args"] = [{"const": renamed[a["const"]]} if isinstance(a, dict) and "const" in a
                        else a for a in node["args"]]
    return {"version": 1, "model": "tiny-gpt2",
            "inputs": {"input_ids": "input_ids"} if inputs else {},
            "constants": list(renamed.values()), "sites": tracer.sites, "nodes": tracer.nodes, "saves": {},
            "forward": {"return_type": return_type}}


def submit(first, steps, n=3, **options):
    spec = {"max_new_tokens": n, "steps": steps, **options}
    used = {c for g in [first] + steps for c in g["constants"]}
    tensors = {"input_ids": PROMPT, **{c: CONSTANTS[c] for c in used}}
    return get_connection().run(first, tensors, submit_extra={"generate": spec})


def served_ok():
    assert hhf.RemoteModel("tiny-gpt2").generate(PROMPT, 2).sequences.shape == (1, 7)


@pytest.mark.parametrize("case,error,rule", [
    ("step count", GraphValidationError, "generate_steps"),
    ("step inputs", GraphValidationError, "generate_inputs"),
    ("logits out", GraphValidationError, "generate_forward"),
    ("tl site", GraphValidationError, "site_kinds"),
    ("traced for the prompt length", GraphValidationError, "write_shape"),
    ("too many tokens", LimitExceeded, "max_new_tokens"),
])
def test_bad_generate_requests_are_refused(small_server, case, error, rule):
    ok_step = graph(1, inputs=False)
    first, steps, n = graph(5), [ok_step, ok_step], 3
    if case == "step count":
        steps = [ok_step]
    elif case == "step inputs":
        steps = [ok_step, graph(1)]
    elif case == "logits out":
        first = graph(5, return_type="logits")
    elif case == "tl site":
        steps = [ok_step, graph(1, site="blocks.0.hook_out", inputs=False)]
    elif case == "traced for the prompt length":
        steps = [ok_step, graph(5, inputs=False, shift=True)]
    elif case == "too many tokens":
        steps, n = [], 9
    with pytest.raises(error) as info:
        submit(first, steps, n)
    assert info.value.details.get("rule") == rule, info.value
    served_ok()


def test_malformed_options_are_protocol_errors(small_server):
    for bad in ({"max_new_tokens": 0}, {"max_new_tokens": 2, "temperature": -1.0},
                {"max_new_tokens": 2, "eval": "x"}):
        with pytest.raises(ProtocolError):
            get_connection().run(graph(5), {"input_ids": PROMPT},
                                 submit_extra={"generate": {"steps": [], **bad}})
        served_ok()


def test_a_valid_crafted_request_runs(small_server, hosted):
    """The same crafted graphs, valid this time, do what the HF adapter's would."""
    result = submit(graph(5), [graph(1, inputs=False)] * 2, 3)
    tokens = [result.values[f"__token__{k}"] for k in range(3)]
    def double(module, args, output):
        return output * 2.0
    want = hhf.RemoteModel("tiny-gpt2").generate(PROMPT, 3, {"transformer.h.0.mlp": double},
                                                 intervene_on="all")
    assert torch.equal(torch.stack(tokens, 1), want.sequences[:, 5:])


@pytest.mark.parametrize("mask, match", [
    (torch.tensor([[0, 0, 0, 0, 0]]), "no token"),
    (torch.tensor([[1, 1, 2, 1, 1]]), "0/1"),
    (torch.ones(1, 4, dtype=torch.int64), "shaped like"),
])
def test_a_crafted_generation_mask_is_refused_before_it_runs(small_server, mask, match):
    """The client checks a padded generation's attention_mask; the server checks it again
    (a crafted request skips the client): refused with a typed error, nothing runs."""
    first = graph(5)
    first["inputs"]["attention_mask"] = "attention_mask"
    with pytest.raises(ProtocolError, match=match):
        get_connection().run(first, {"input_ids": PROMPT, "attention_mask": mask,
                                     **{c: CONSTANTS[c] for c in first["constants"]}},
                             submit_extra={"generate": {"max_new_tokens": 2, "steps": [
                                 graph(1, inputs=False)]}})
    served_ok()
    # Given positions (nnsight passes a padded batch's): each new token takes the next one,
    # so the last must leave room for them, checked before anything runs.
    first["inputs"]["position_ids"] = "position_ids"
    late = torch.tensor([[0, 1, 2, 3, 255]])  # tiny-gpt2 has 256 positions
    with pytest.raises(LimitExceeded, match="positions"):
        get_connection().run(first, {"input_ids": PROMPT,
                                     "attention_mask": torch.ones(1, 5, dtype=torch.int64),
                                     "position_ids": late,
                                     **{c: CONSTANTS[c] for c in first["constants"]}},
                             submit_extra={"generate": {"max_new_tokens": 2, "steps": [
                                 graph(1, inputs=False)]}})
    served_ok()
