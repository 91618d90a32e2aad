"""NNsight code on a hookwire server (hookwire.nnsight), each feature equal to nnsight run
locally on the same weights.

A real server on 127.0.0.1 hosts tiny-gpt2 and tiny-llama (built from configs with fixed seeds,
hosted with the checkpoint's own tokenizer). Each test runs one block of nnsight code three
ways -- nnsight's ``LanguageModel`` with its weights locally, ``hnn.RemoteLanguageModel`` (no
weights) and ``hnn.LanguageModel`` (the user's own model with weights, ``remote=True``) -- and
compares what the block saved.
"""
from __future__ import annotations

import inspect
import os
import tempfile
import warnings

import nnsight
import pytest
import torch
from nnsight import LanguageModel

import hookwire
import hookwire.nnsight as hnn
import hookwire.server as hs
from hookwire.client import close_connections, get_connection
from hookwire.errors import GraphValidationError, HookwireError, TraceError
from hookwire.families import build_hf_model
from hookwire.server.models import BUILTIN_MODELS, load_model
from hookwire.validate import Limits

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

MODELS = ("tiny-gpt2", "tiny-llama")
PROMPT = "The Eiffel Tower is in"
KINDS = ("remote", "own")   # weightless RemoteLanguageModel; own LanguageModel, remote=True


def weights(name: str):
    """An HF model with the weights the server builds for ``name`` (same config and seed)."""
    spec = BUILTIN_MODELS[name]
    return build_hf_model(spec.architecture, spec.config, seed=spec.seed)[0]


@pytest.fixture(scope="module")
def served():
    # HostedModel objects: the server describes the checkpoint's own tokenizer (a TL bridge
    # would describe TL's, which prepends BOS).
    hosted = {name: load_model(name) for name in MODELS}
    srv = hs.start(models=hosted, port=0)
    hookwire.configure(url=srv.url)
    yield srv, hosted
    try:
        close_connections()
    finally:
        srv.stop()
        hookwire.configure(url=None)


class Trio:
    def __init__(self, name, tokenizer):
        self.name = name
        self.local = LanguageModel(weights(name), tokenizer=tokenizer)
        self.remote = hnn.RemoteLanguageModel(name)
        self.own = hnn.LanguageModel(weights(name), tokenizer=tokenizer)

    def run(self, kind: str, block, **kwargs):
        """``block(model, trace_kwargs)`` on the local model, then remotely as ``kind``."""
        local = block(self.local, dict(kwargs))
        model = self.remote if kind == "remote" else self.own
        extra = {} if kind == "remote" else {"remote": True}
        return local, block(model, {**kwargs, **extra})


@pytest.fixture(scope="module")
def trios(served):
    _, hosted = served
    return {name: Trio(name, hosted[name].tokenizer) for name in MODELS}


def layers(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def attention(block):
    return block.attn if hasattr(block, "attn") else block.self_attn


def same(local, remote):
    torch.testing.assert_close(remote, local)


def requests():
    return get_connection().stats.requests


# ---- reads, writes, saves ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_reads_and_saves(trios, name, kind):
    def block(model, kw):
        kept = {}                                   # a container from outside the block
        with model.trace(PROMPT, **kw) as tracer:
            first = layers(model)[0].input.save()
            args, kwargs = layers(model)[1].inputs
            hidden_in = (args[0] if args else next(iter(kwargs.values()))).save()
            attn = attention(layers(model)[1]).output
            attn_out = attn[0].save()
            mlp_in = layers(model)[1].mlp.input
            mlp_out = layers(model)[1].mlp.output
            kept["ratio"] = mlp_out.norm(dim=-1) / mlp_in.norm(dim=-1)   # two modules
            both = nnsight.save([layers(model)[1].output, {"attn": attn_out[:, -1]}])
            logits = model.lm_head.output.save()
            out = model.output.logits.save()
            result = tracer.result.logits.save()
        return first, hidden_in, attn_out, kept, both, logits, out, result

    local, remote = trios[name].run(kind, block)
    same(local, remote)
    assert all(isinstance(x, torch.Tensor) and not isinstance(x, hookwire.trace.Proxy)
               for x in (remote[0], remote[5], remote[3]["ratio"], remote[4][0]))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_in_place_and_replacing_writes(trios, name, kind):
    def block(model, kw):
        with model.trace(PROMPT, **kw):
            blocks = layers(model)
            blocks[0].mlp.output *= 0.5                           # in place, arithmetic
            blocks[0].output[:, 2:4] = 0                          # in place, a slice
            h = blocks[1].input
            blocks[1].input = h * 2                               # replacing an input
            attention(blocks[1]).output[0][:, -1] += 1.0          # a tuple element in place
            mlp = blocks[1].mlp.output
            blocks[1].mlp.output = mlp + h.mean(dim=-1, keepdim=True)   # replacing an output
            saved = blocks[1].output.save()
            logits = model.lm_head.output.save()
        return saved, logits

    local, remote = trios[name].run(kind, block)
    same(local, remote)


@pytest.mark.parametrize("name", MODELS)
def test_replacing_a_tuple_output(trios, name):
    def block(model, kw):
        with model.trace(PROMPT, **kw):
            attn = attention(layers(model)[0])
            out = attn.output
            attn.output = (out[0] * 0.25, out[1])
            logits = model.lm_head.output.save()
        return logits

    same(*trios[name].run("remote", block))


# ---- several invokes, stop, skip, cache -------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_several_invokes_padded_and_batched(trios, name, kind):
    """Prompts of different lengths: nnsight pads them on the left and counts positions from
    each row's first token; every invoke reads and writes its own rows."""
    def block(model, kw):
        with model.trace(**kw) as tracer:
            with tracer.invoke("The cat sat on the mat"):
                a = layers(model)[0].output.save()
                layers(model)[1].output[:, -1] = 0
            with tracer.invoke(["Hi", "A much longer prompt than the rest"]):
                b = layers(model)[0].output[:, -1].save()
                c = model.lm_head.output.save()
            with tracer.invoke():                   # the whole batch
                d = layers(model)[1].output.save()
        return a, b, c, d

    local, remote = trios[name].run(kind, block)
    same(local, remote)
    assert remote[3].shape[0] == 3


@pytest.mark.parametrize("name", MODELS)
def test_stop_keeps_what_came_before(trios, name):
    def block(model, kw):
        with model.trace(PROMPT, **kw) as tracer:
            h = layers(model)[0].output.save()
            tracer.stop()
            never = model.lm_head.output.save()   # noqa: F841  (the forward stopped)
        return h

    same(*trios[name].run("remote", block))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_skip(trios, name, kind):
    def block(model, kw):
        with model.trace(PROMPT, **kw):
            blocks = layers(model)
            blocks[0].skip(blocks[0].input)             # the whole block: identity
            mlp = blocks[1].mlp
            mlp.skip(torch.zeros_like(mlp.input))       # a module inside a block
            logits = model.lm_head.output.save()
        return logits

    same(*trios[name].run(kind, block))


def test_skip_with_the_wrong_structure_raises(trios):
    model = trios["tiny-gpt2"].remote
    before = requests()
    with pytest.raises(TraceError, match="tuple of 2"):
        with model.trace(PROMPT):
            attn = model.transformer.h[0].attn
            attn.skip(attn.input)          # attn returns (hidden, weights)
    assert requests() == before


@pytest.mark.parametrize("name", MODELS)
def test_cache(trios, name):
    def block(model, kw):
        with model.trace(PROMPT, **kw) as tracer:
            cache = tracer.cache(modules=[layers(model)[0], layers(model)[1].mlp])
        return [cache[layers(model)[0].path].output, cache[layers(model)[1].mlp.path].output]

    same(*trios[name].run("remote", block))


# ---- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_gradients(trios, name, kind):
    def block(model, kw):
        with model.trace(PROMPT, **kw):
            blocks = layers(model)
            acts = [blocks[i].input for i in range(len(blocks))]
            attn_out = attention(blocks[1]).output[0]
            logits = model.output.logits
            metric = (logits[:, -1, 5] - logits[:, -1, 7]).sum()
            with metric.backward():
                g_attn = attn_out.grad.save()
                grads = nnsight.save([acts[i].grad for i in reversed(range(len(acts)))])
            value = metric.save()
        return g_attn, grads, value

    local, remote = trios[name].run(kind, block)
    same(local, remote)


def test_gradients_of_invokes(trios):
    def block(model, kw):
        with model.trace(**kw) as tracer:
            with tracer.invoke("The cat sat"):     # nnsight hands each invoke its rows
                h = model.transformer.h[0].output
                loss = model.lm_head.output[:, -1].sum()
                with loss.backward():
                    g = h.grad.save()
            with tracer.invoke(["A dog ran", "Hi"]):
                k = model.transformer.h[0].output.save()
        return g, k

    same(*trios["tiny-gpt2"].run("remote", block))


# ---- generation -------------------------------------------------------------------------------

@pytest.fixture
def no_eos(trios):
    """Both sides generate every token (the server always does; see test_eos_stops_ids)."""
    saved = []
    for trio in trios.values():
        for model in (trio.local, trio.remote, trio.own):
            config = model._module.generation_config
            saved.append((config, config.eos_token_id))
            config.eos_token_id = None
    yield
    for config, eos in saved:
        config.eos_token_id = eos


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_generation_per_step(trios, name, kind, no_eos):
    def block(model, kw):
        with model.generate(PROMPT, max_new_tokens=5, **kw) as tracer:
            logits, hidden = nnsight.save([]), nnsight.save([])
            for step in tracer.all():
                layers(model)[0].output[:, -1] += 0.25        # steer at every step
                hidden.append(layers(model)[1].output[:, -1])
                logits.append(model.output.logits[:, -1])
        with model.generate(PROMPT, max_new_tokens=5, **kw) as tracer:
            h2 = layers(model)[1].output.save()              # the prompt's forward
            for step in tracer.iter[2:4]:
                layers(model)[0].mlp.output[:] = 0
            ids = tracer.result.save()
        with model.generate(PROMPT, max_new_tokens=4, **kw) as tracer:
            tokens = nnsight.save([])
            for step in tracer.iter[:5]:                     # the prompt, then each token
                tokens.append(model.generator.streamer.output)
        with model.generate(PROMPT, max_new_tokens=3, **kw) as tracer:
            final = model.generator.output.save()
        return logits, hidden, h2, ids, tokens, final

    local, remote = trios[name].run(kind, block)
    same(local, remote)
    assert remote[3].shape == (1, len(PROMPT) + 5)


@pytest.mark.parametrize("name", MODELS)
def test_generation_from_prompts_of_different_lengths(trios, name, no_eos):
    """Several prompts (a list, or one invoke each) are left-padded into one batch with their
    attention_mask: the server gives each forward the mask and positions HF's generate
    derives from it. Refused before this ("a remote generation from padded prompts")."""
    prompts = ["a", "The Eiffel Tower is in the city of"]

    def block(model, kw):
        with model.generate(prompts, max_new_tokens=4, **kw) as tracer:
            hidden = nnsight.save([])
            for step in tracer.all():
                layers(model)[0].output[:, -1] += 0.25
                hidden.append(layers(model)[1].output[:, -1])
        with model.generate(prompts, max_new_tokens=4, **kw) as tracer:
            layers(model)[0].output[:, -1] += 0.25       # the prompt's forward only
            ids = tracer.result.save()
        with model.generate(max_new_tokens=3, **kw) as tracer:
            with tracer.invoke(prompts[0]):
                first = model.lm_head.output.save()
            with tracer.invoke(prompts[1]):
                second = model.lm_head.output.save()
        return hidden, ids, first, second

    local, remote = trios[name].run("remote", block)
    same(local, remote)
    ids = remote[1]
    assert ids.shape[0] == 2 and int(ids[0, 0]) == int(ids[0, 1])  # row 0 was padded


@pytest.mark.parametrize("name", MODELS)
def test_generation_sampling_with_a_seed(trios, name, no_eos):
    def block(model, kw):
        with model.generate(PROMPT, max_new_tokens=6, do_sample=True, top_k=20,
                            temperature=0.8, **kw) as tracer:
            ids = tracer.result.save()
        return ids

    torch.manual_seed(11)           # HF samples from torch's generator
    local = block(trios[name].local, {})
    remote = block(trios[name].remote, {"seed": 11})
    same(local, remote)


def test_open_iteration_ends_as_locally(trios, no_eos):
    """``tracer.iter[:]`` outruns the generation: nnsight warns, the lines after the loop do not
    run, the values from every step are kept -- remotely as locally."""
    def block(model, kw):
        with model.generate(PROMPT, max_new_tokens=3, **kw) as tracer:
            outs = nnsight.save([])
            for step in tracer.iter[:]:
                outs.append(model.lm_head.output[:, -1])
            after = nnsight.save([1])   # noqa: F841  never runs
        return outs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        local, remote = trios["tiny-gpt2"].run("remote", block)
    same(local, remote)
    assert len(remote) == 3
    assert sum("never reached" in str(w.message) for w in caught) == 2


def test_eos_stops_ids(trios):
    """The server generates every token; the ids come back as HF returns them when it stops at
    EOS (here every token counts as an end, so the run ends after one step)."""
    trio = trios["tiny-gpt2"]
    results = []
    for model, kw in ((trio.local, {}), (trio.remote, {})):
        with model.generate(PROMPT, max_new_tokens=4, **kw) as tracer:
            first = model.lm_head.output.save()
        eos = int(first[0, -1].argmax())
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            with model.generate(PROMPT, max_new_tokens=4, eos_token_id=eos, **kw) as tracer:
                ids = tracer.result.save()
        results.append(ids)
    same(*results)
    assert results[1].shape == (1, len(PROMPT) + 1)


def test_generation_refuses_what_it_cannot_do(trios):
    model = trios["tiny-gpt2"].remote
    before = requests()
    with pytest.raises(TraceError, match="repetition_penalty"):
        with model.generate(PROMPT, max_new_tokens=2, repetition_penalty=1.3):
            pass_ = model.lm_head.output.save()   # noqa: F841
    with pytest.raises(TraceError, match="generated tokens cannot be edited"):
        with model.generate(PROMPT, max_new_tokens=2):
            model.generator.output = torch.zeros(1, len(PROMPT) + 2, dtype=torch.long)
    assert requests() == before


# ---- module calls (logit lens) -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_module_calls_in_the_block(trios, name, kind):
    """``model.lm_head(model.transformer.ln_f(h))``: the weightless model computes with the
    server's own weights ("@" parameters), the user's own model sends its weights."""
    def block(model, kw):
        norm = model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm
        with model.trace(PROMPT, **kw):
            lens = nnsight.save([model.lm_head(norm(layer.output)).softmax(-1)
                                 for layer in layers(model)])
        return lens

    same(*trios[name].run(kind, block))


def test_a_server_may_refuse_parameter_reads(served):
    hosted = {"tiny-gpt2": load_model("tiny-gpt2")}
    srv = hs.start(models=hosted, port=0, limits=Limits(allow_parameter_reads=False))
    try:
        model = hnn.RemoteLanguageModel("tiny-gpt2", url=srv.url)
        with pytest.raises(GraphValidationError, match="does not allow"):
            with model.trace(PROMPT):
                lens = model.lm_head(model.transformer.h[0].output).save()   # noqa: F841
        with model.trace(PROMPT):       # everything else still runs
            h = model.transformer.h[0].output.save()
        assert h.shape == (1, len(PROMPT), 64)
    finally:
        close_connections()
        srv.stop()
        hookwire.configure(url=served[0].url)


# ---- a user's own nnsight model ---------------------------------------------------------------

def test_nnsight_wrapper_of_a_module(served, trios):
    """``hnn.NNsight(hf_model)`` (nnsight's NNsight) with remote= a URL; nnsight's own
    ``LanguageModel`` with ``backend=hnn.RemoteBackend(...)``."""
    srv, hosted = served
    ids = torch.tensor([[5, 17, 99, 3, 42]])
    local = nnsight.NNsight(weights("tiny-llama"))
    with local.trace(ids):
        expected = nnsight.save([local.model.layers[1].output, local.lm_head.output])
    own = hnn.NNsight(weights("tiny-llama"))
    with own.trace(ids, remote=srv.url):
        got = nnsight.save([own.model.layers[1].output, own.lm_head.output])
    same(expected, got)

    theirs = LanguageModel(weights("tiny-gpt2"), tokenizer=hosted["tiny-gpt2"].tokenizer)
    trio = trios["tiny-gpt2"]
    with trio.local.trace(PROMPT):
        expected = trio.local.transformer.h[1].output.save()
    with theirs.trace(PROMPT, backend=hnn.RemoteBackend("tiny-gpt2")):
        got = theirs.transformer.h[1].output.save()
    same(expected, got)


def test_a_model_of_another_architecture_is_refused(served):
    spec = BUILTIN_MODELS["tiny-gpt2"]
    other = build_hf_model(spec.architecture, {**spec.config, "n_layer": 3}, seed=0)[0]
    model = hnn.NNsight(other)
    with pytest.raises(HookwireError, match="which served model"):
        with model.trace(torch.tensor([[1, 2, 3]]), remote=True):
            h = model.transformer.h[0].output.save()   # noqa: F841
    with pytest.raises(HookwireError, match="config differs"):
        with model.trace(torch.tensor([[1, 2, 3]]), remote=True, remote_model="tiny-gpt2"):
            h = model.transformer.h[0].output.save()   # noqa: F841
    with pytest.raises(HookwireError, match="runs remotely only"):
        hnn.RemoteLanguageModel("tiny-gpt2").trace(PROMPT, remote=False)


# ---- progress, non-blocking -------------------------------------------------------------------

def test_progress_bar(trios, capsys):
    model = trios["tiny-gpt2"].remote
    with model.trace(PROMPT, progress=True):
        h = model.transformer.h[1].output.save()
    assert h.shape == (1, len(PROMPT), 64)
    assert "hookwire tiny-gpt2" in capsys.readouterr().err


def test_non_blocking(trios):
    trio = trios["tiny-gpt2"]
    with trio.local.trace(PROMPT):
        expected = trio.local.transformer.h[1].output.save()
    model = trio.remote
    kept = []
    with model.trace(PROMPT, blocking=False) as tracer:
        h = model.transformer.h[1].output.save()
        kept.append(model.lm_head.output)
    backend = tracer.backend
    events = list(backend.events())          # progress, then the saved values, then the end
    assert any(isinstance(e, hookwire.runs.SavedValue) for e in events)
    values = backend.result()
    same(expected, values["h"])
    same(expected, h)                        # the caller's variable (same thread)
    assert isinstance(kept[0], torch.Tensor) and kept[0].shape == (1, len(PROMPT), 257)
    assert backend() is not None              # nnsight's poll spelling: done


# ---- what cannot become a graph raises before anything is sent --------------------------------

class _ItemModule(torch.nn.Module):
    def forward(self, x):
        return x * x.abs().max().item()      # <- here: a custom module reading a value


def _item(model):
    with model.trace(PROMPT):
        scale = model.transformer.h[0].output.norm().item()   # <- here


def _branch(model):
    with model.trace(PROMPT):
        h = model.transformer.h[0].output
        if h.mean() > 0:                                       # <- here
            h[:] = 0


def _print(model):
    with model.trace(PROMPT):
        print(model.transformer.h[0].output)                   # <- here


def _file(model):
    path = os.path.join(tempfile.gettempdir(), "hookwire-nnsight-io.txt")
    with model.trace(PROMPT):
        h = model.transformer.h[0].output
        with open(path, "w") as fh:                            # <- here
            fh.write("x")


def _unregistered_op(model):
    with model.trace(PROMPT):
        u = torch.kron(model.transformer.h[0].output[0], torch.ones(2, 2))   # <- here


def _custom_module(model):
    with model.trace(PROMPT):
        model.transformer.h[0].output = _ItemModule()(model.transformer.h[0].output)


def _function(model):
    def normalize(x):
        return x / float(x.std())                              # <- here
    with model.trace(PROMPT):
        h = normalize(model.transformer.h[0].output)


def _tokens(model):
    with model.generate(PROMPT, max_new_tokens=2) as tracer:
        first = model.generator.output[:, -1] + 1              # <- here


def _model_output_of_a_module(model):
    with model.trace(PROMPT):
        h = model.transformer.output.last_hidden_state         # <- here


def _edit_gradient(model):
    with model.trace(PROMPT):
        h = model.transformer.h[0].output
        loss = model.output.logits.sum()
        with loss.backward():                                  # <- here (the block)
            h.grad = h.grad * 2


def _bare_backward(model):
    with model.trace(PROMPT):
        loss = model.output.logits.sum()
        loss.backward()                                        # <- here


def _grad_of_a_computed_value(model):
    with model.trace(PROMPT):
        h = model.transformer.h[0].output * 2
        loss = model.output.logits.sum()
        with loss.backward():
            g = h.grad.save()                                  # <- here


def _source(model):
    with model.trace(PROMPT):
        out = model.transformer.h[0].attn.source.attention_interface_0.output.save()  # <- here


UNTRACEABLE = [(_item, "`.item()`"), (_branch, "truth value"), (_print, "printing"),
               (_file, "file or network I/O"), (_unregistered_op, "registry"),
               (_custom_module, "`.item()`"), (_function, "`float(tensor)`"),
               (_tokens, "generated ids"), (_model_output_of_a_module, "model.transformer"),
               (_edit_gradient, "editing the gradient of transformer.h.0.output"),
               (_bare_backward, "outside a `with"),
               (_grad_of_a_computed_value, "computed in the trace block"),
               (_source, "`.source`")]


def _marked_line(fn) -> int:
    target = _ItemModule.forward if fn is _custom_module else fn
    source, start = inspect.getsourcelines(target)
    return start + next(i for i, line in enumerate(source) if "# <- here" in line)


@pytest.mark.parametrize("fn, what", UNTRACEABLE, ids=[f.__name__ for f, _ in UNTRACEABLE])
def test_untraceable_code_raises_naming_the_line(trios, fn, what):
    model = trios["tiny-gpt2"].remote
    before = requests()
    with pytest.raises(TraceError) as info:
        fn(model)
    err = info.value
    assert what in str(err)
    assert err.details["line"] == _marked_line(fn) and err.details["file"] == __file__, str(err)
    assert f"{__file__}:{err.details['line']}" in str(err)
    assert requests() == before             # nothing was sent
    with model.trace(PROMPT):               # and the model still works
        h = model.transformer.h[0].output.save()
    assert h.shape == (1, len(PROMPT), 64)


def test_scan_runs_without_the_server(trios):
    """nnsight's scan (shapes on fake tensors) needs no weights: it runs on the stand-in."""
    model = trios["tiny-llama"].remote
    before = requests()
    with model.scan(PROMPT):
        shape = nnsight.save(model.model.layers[0].output.shape)
    assert tuple(shape) == (1, len(PROMPT), 64) and requests() == before


def test_a_custom_module_of_traceable_ops_runs_remotely(trios):
    """A user's own module (an SAE with its own weights) runs on the activations as data."""
    torch.manual_seed(0)
    sae = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 64))

    def block(model, kw):
        with model.trace(PROMPT, **kw):
            h = model.transformer.h[0].output
            model.transformer.h[0].output = sae(h)
            logits = model.lm_head.output.save()
        return logits

    same(*trios["tiny-gpt2"].run("remote", block))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_an_in_place_edit_of_a_piece_raises_where_nnsight_raises(trios, name, kind):
    """``a, b = h.chunk(2, -1); a.zero_()`` in a trace: locally (grad on, trainable weights)
    torch refuses to edit a piece of a multi-output view in place. The remote trace used to
    run it; it raises before sending now, naming the line. Under ``torch.no_grad()`` both
    run it, equal."""
    def block(model, kw):
        with model.trace(PROMPT, **kw):
            first, _ = layers(model)[0].output.chunk(2, dim=-1)
            first.zero_()
            logits = model.lm_head.output.save()
        return logits

    trio = trios[name]
    with pytest.raises(Exception, match="modified inplace"):
        block(trio.local, {})
    model = trio.remote if kind == "remote" else trio.own
    extra = {} if kind == "remote" else {"remote": True}
    with pytest.raises(TraceError, match="no_grad") as err:
        block(model, extra)
    assert "test_nnsight_remote.py" in str(err.value)
    with torch.no_grad():
        local, remote = trio.run(kind, block)
    same(local, remote)


@pytest.mark.parametrize("name", MODELS)
def test_generation_from_padded_prompts_sampling_with_a_seed(trios, name, no_eos):
    """Padded prompts (a list of different lengths), sampled with a seed: the tokens, and
    the full hidden states of every step (padding positions included)."""
    prompts = ["a", "The Eiffel Tower is in the city of", "xy"]
    kw = dict(max_new_tokens=5, do_sample=True, top_k=20, temperature=0.8)

    def ids_of(model, seed):
        with model.generate(prompts, **kw, **seed) as tracer:
            ids = tracer.result.save()
        return ids

    def hidden_of(model, seed):
        with model.generate(prompts, **kw, **seed) as tracer:
            hidden = nnsight.save([])
            for step in tracer.all():
                hidden.append(layers(model)[1].output)
        return hidden

    for block in (ids_of, hidden_of):
        torch.manual_seed(11)
        local = block(trios[name].local, {})
        remote = block(trios[name].remote, {"seed": 11})
        same(local, remote)
