"""hookwire.hf against a real server on both families: module-path hooks with torch's
signatures, run_with_cache, generation with interventions (greedy and seeded sampling, KV
cache on the server, tokens streamed) -- each compared with plain torch hooks / HF's own
``generate`` on a local HF model that shares the server's weights."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import hookwire.hf as hhf
from hookwire.client import get_connection
from hookwire.errors import HookwireError, LimitExceeded, TraceError
from hookwire.hf.generate_request import TokenEvent
from hookwire.protocol import Done
from hookwire.runs import SavedValue
from hookwire.server.hf_modules import plain_hf_model

PROMPT = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
PATHS = {  # (mlp, attention, a linear inside the mlp, a decoder block)
    "tiny-gpt2": ("transformer.h.1.mlp", "transformer.h.0.attn", "transformer.h.1.mlp.c_proj",
                  "transformer.h.0"),
    "tiny-llama": ("model.layers.1.mlp", "model.layers.0.self_attn",
                   "model.layers.1.mlp.down_proj", "model.layers.0"),
}
FAMILIES = list(PATHS)


@pytest.fixture(scope="module")
def plain(hosted, server):
    """name -> a plain HF model whose tensors are the served model's own."""
    return {name: plain_hf_model(h.bridge) for name, h in hosted.items()}


def torch_hooks_run(model, hooks: dict, ids):
    """The reference: the same functions (one, or a list, per key) registered with torch, one
    forward. A key's "@k" is dropped: torch's hooks run at every call (tests pass "@0" only
    for modules called once)."""
    handles = []
    for key, fns in hooks.items():
        path, _, kind = key.partition("@")[0].partition(":")
        module = model.get_submodule(path)
        for fn in fns if isinstance(fns, list) else [fns]:
            handles.append(module.register_forward_pre_hook(fn) if kind == "input"
                           else module.register_forward_hook(fn))
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def make_hooks(name, store):
    mlp, attn, linear, block = PATHS[name]

    def scale_mlp(module, args, output):           # returns a replacement
        store["mlp"] = output
        return output * 0.5

    def attn_tuple(module, args, output):           # a tuple, as torch hands it over
        hidden, weights = output
        store["attn_len"] = len(output)
        store["attn_rest"] = output[1:]
        return (hidden + 0.25,) + output[1:]

    def pre_double(module, args):                   # pre-hook: replaces the args
        store["pre_args"] = args
        return (args[0] * 2,) + args[1:]

    def block_in_place(module, args, output):       # in place, returns None
        output[:, -1] = 0.0
        store["block_args0"] = args[0].clone()
    return {mlp: scale_mlp, attn: attn_tuple, f"{linear}:input": pre_double,
            block: block_in_place}


@pytest.mark.parametrize("name", FAMILIES)
def test_run_with_hooks_equals_torch_hooks(server, plain, name):
    remote_store, local_store = {}, {}
    remote = hhf.RemoteModel(name)
    out = remote.run_with_hooks(PROMPT, make_hooks(name, remote_store))
    expected = torch_hooks_run(plain[name], make_hooks(name, local_store), PROMPT)
    assert_close(out.logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(expected, torch_hooks_run(plain[name], {}, PROMPT))  # hooks bite
    assert set(remote_store) == set(local_store)
    for key in local_store:  # stored tensors (and tuples with None) came back as torch's
        assert_close(remote_store[key], local_store[key], rtol=1e-5, atol=1e-5)
    assert remote_store["attn_len"] == 2 and remote_store["attn_rest"] == (None,)
    local = hhf.LocalModel(plain[name]).run_with_hooks(PROMPT, make_hooks(name, {}))
    assert_close(local.logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_run_with_cache_tuples_and_args(server, plain, name):
    mlp, attn, linear, block = PATHS[name]
    modules = [mlp, attn, f"{linear}:input", f"{mlp}@0"]
    hooks = {mlp: lambda m, a, o: o + 1.0}
    out, cache = hhf.RemoteModel(name).run_with_cache(PROMPT, modules, hooks)
    lout, lcache = hhf.LocalModel(plain[name]).run_with_cache(PROMPT, modules, hooks)
    assert_close(out.logits, lout.logits, rtol=1e-5, atol=1e-5)
    assert set(cache) == set(modules)
    for key in modules:
        assert type(cache[key]) is type(lcache[key])
        assert_close(cache[key], lcache[key], rtol=1e-5, atol=1e-5)
    assert isinstance(cache[attn], tuple) and cache[attn][1] is None
    assert_close(cache[mlp], cache[f"{mlp}@0"])  # a cache hook sees the edited output


def test_rotary_tuple_elements_are_sites(server, plain):
    """Element 1 of a tuple output (Llama's rotary (cos, sin)) is readable and writable."""
    def swap(module, args, output):
        cos, sin = output
        return (cos, sin * 0.5)
    hooks = {"model.rotary_emb": swap}
    out = hhf.RemoteModel("tiny-llama").run_with_hooks(PROMPT, hooks)
    assert_close(out.logits, torch_hooks_run(plain["tiny-llama"], hooks, PROMPT),
                 rtol=1e-5, atol=1e-5)


def test_errors_before_anything_is_sent(server):
    remote = hhf.RemoteModel("tiny-gpt2")
    with pytest.raises(HookwireError, match="no module"):
        remote.run_with_hooks(PROMPT, {"transformer.h.9.mlp": lambda m, a, o: o})
    with pytest.raises(HookwireError, match="runs 1 time"):
        remote.run_with_hooks(PROMPT, {"transformer.h.0.mlp@1": lambda m, a, o: o})
    with pytest.raises(TraceError, match="tuple of 2"):
        remote.run_with_hooks(PROMPT, {"transformer.h.0.attn": lambda m, a, o: o[0]})
    with pytest.raises(TraceError, match="shape"):
        remote.run_with_hooks(PROMPT, {"transformer.h.0.mlp": lambda m, a, o: o[:, :2]})
    with pytest.raises(TraceError):  # values are not known while tracing
        remote.run_with_hooks(PROMPT, {"transformer.h.0.mlp": lambda m, a, o: float(o.sum())})
    assert remote.run_with_hooks(PROMPT).logits.shape == (2, 7, 257)  # still serving


# ---- generation --------------------------------------------------------------------------

def steering(name, store):
    mlp, attn, linear, block = PATHS[name]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))

    def steer(module, args, output):
        store.append(output[:, -1].clone())
        return output + 0.3 * vector
    return {mlp: steer}


def hf_generate(model, ids, hooks: dict, **kw):
    """HF's own generate with the hooks registered by torch (the reference)."""
    handles = [model.get_submodule(p).register_forward_hook(fn) for p, fn in hooks.items()]
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), eos_token_id=None,
                                  pad_token_id=0, **kw)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_equals_local_and_hf_generate(server, plain, name, do_sample):
    mlp = PATHS[name][0]
    remote_steps, local_steps, hf_steps = [], [], []
    kw = dict(max_new_tokens=6, do_sample=do_sample, top_k=20, temperature=0.8)
    out = hhf.RemoteModel(name).generate(PROMPT, hooks=steering(name, remote_steps),
                                         intervene_on="all", seed=11, modules=[mlp], **kw)
    local = hhf.LocalModel(plain[name]).generate(PROMPT, hooks=steering(name, local_steps),
                                                 intervene_on="all", seed=11, modules=[mlp],
                                                 **kw)
    torch.manual_seed(11)  # HF samples from the global generator
    reference = hf_generate(plain[name], PROMPT, steering(name, hf_steps), **kw)
    assert torch.equal(out.sequences, reference)
    assert torch.equal(local.sequences, reference)
    assert len(remote_steps) == len(hf_steps) == 6  # the hook ran once per forward
    for a, b in zip(remote_steps, hf_steps):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(out.cache[mlp]) == 6
    assert out.cache[mlp][0].shape == (2, 7, 64) and out.cache[mlp][1].shape == (2, 1, 64)
    for a, b in zip(out.cache[mlp], local.cache[mlp]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def noisy(name):
    """A hook that adds torch.randn_like noise (from torch's global generator) at each step."""
    mlp = PATHS[name][0]

    def add_noise(module, args, output):
        return output + 0.5 * torch.randn_like(output)
    return {mlp: add_noise}


def test_generate_with_torch_noise_in_hooks(server, plain):
    """torch.randn_like in a hook, greedy: drawn on the caller's machine step by step in
    local order -- the same tokens as HF's generate after the same torch.manual_seed. Sampled:
    locally the noise and the sampling share one generator, which the server cannot replay,
    so it is refused before anything is sent (and the server goes on)."""
    name = "tiny-gpt2"
    torch.manual_seed(5)
    out = hhf.RemoteModel(name).generate(PROMPT, 5, noisy(name))
    torch.manual_seed(5)
    reference = hf_generate(plain[name], PROMPT, noisy(name), max_new_tokens=5)
    assert torch.equal(out.sequences, reference)
    torch.manual_seed(6)
    assert not torch.equal(hhf.RemoteModel(name).generate(PROMPT, 5, noisy(name)).sequences,
                           reference), "the noise must matter, or this proves nothing"
    with pytest.raises(TraceError, match="hookwire.randn_like"):
        hhf.RemoteModel(name).generate(PROMPT, 5, noisy(name), do_sample=True, seed=3)
    assert hhf.RemoteModel(name).generate(PROMPT, 2).sequences.shape == (2, 9)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_intervene_on_prompt_only(server, plain, name):
    remote_steps, local_steps = [], []
    out = hhf.RemoteModel(name).generate(PROMPT, 5, steering(name, remote_steps),
                                         intervene_on="prompt")
    local = hhf.LocalModel(plain[name]).generate(PROMPT, 5, steering(name, local_steps),
                                                 intervene_on="prompt")
    assert torch.equal(out.sequences, local.sequences)
    assert len(remote_steps) == len(local_steps) == 1
    assert_close(remote_steps[0], local_steps[0], rtol=1e-5, atol=1e-5)
    plain_run = hhf.RemoteModel(name).generate(PROMPT, 5)
    assert not torch.equal(plain_run.sequences, out.sequences)  # the steering mattered


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_defaults_are_hf_generates(server, plain, name):
    """Called as one would call HF's generate with torch hooks registered: the hooks run at
    every forward (they are torch hooks) and the model's EOS ends generation, as in HF."""
    remote_steps, hf_steps = [], []
    out = hhf.RemoteModel(name).generate(PROMPT, 6, steering(name, remote_steps))
    reference = hf_generate(plain[name], PROMPT, steering(name, hf_steps), max_new_tokens=6)
    assert torch.equal(out.sequences, reference)
    assert len(remote_steps) == len(hf_steps) == 6


def _hf_generate_eos(model, ids, hooks: dict, **kw):
    handles = [model.get_submodule(p).register_forward_hook(fn) for p, fn in hooks.items()]
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    finally:
        for h in handles:
            h.remove()


def _eos_plan(tokens: torch.Tensor):
    """EOS ids that end row 0 at some step i and row 1 at a later step j < 5, given the
    tokens (2, 6) a run without EOS chose; None if these tokens allow no such plan."""
    t0, t1 = tokens[0].tolist(), tokens[1].tolist()
    for j in range(2, 5):
        for i in range(1, j):
            e0, e1 = t0[i], t1[j]
            if e0 != e1 and e0 not in t0[:i] and e1 not in t0[:i] and \
                    e0 not in t1[:j] and e1 not in t1[:j]:
                return [e0, e1]
    return None


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_stops_at_eos_as_hf_generate(server, plain, name):
    """Row 0 reaches an EOS token first (then gets pad tokens), row 1 later, and generation
    ends there -- as HF's generate does; hooks that stored a value per step stored one per
    forward that ran."""
    remote = hhf.RemoteModel(name)
    kw = dict(do_sample=True, temperature=3.0, top_k=0)
    for seed in range(40):  # sampling hot: varied tokens, so a plan exists for some seed
        free = remote.generate(PROMPT, 6, steering(name, []), eos_token_id=None, seed=seed,
                               **kw).sequences[:, PROMPT.shape[1]:]
        eos = _eos_plan(free)
        if eos is not None:
            break
    assert eos is not None
    remote_steps, local_steps, hf_steps = [], [], []
    out = remote.generate(PROMPT, 6, steering(name, remote_steps), eos_token_id=eos,
                          pad_token_id=0, modules=[PATHS[name][0]], seed=seed, **kw)
    local = hhf.LocalModel(plain[name]).generate(PROMPT, 6, steering(name, local_steps),
                                                 eos_token_id=eos, pad_token_id=0, seed=seed,
                                                 **kw)
    torch.manual_seed(seed)  # HF samples from the global generator
    reference = _hf_generate_eos(plain[name], PROMPT, steering(name, hf_steps),
                                 max_new_tokens=6, eos_token_id=eos, pad_token_id=0, **kw)
    assert torch.equal(out.sequences, reference) and torch.equal(local.sequences, reference)
    steps = reference.shape[1] - PROMPT.shape[1]
    assert steps < 6 and int(reference[0, -1]) == 0  # stopped early; row 0 was padded
    assert len(remote_steps) == len(local_steps) == len(hf_steps) == steps
    assert len(out.cache[PATHS[name][0]]) == steps
    for a, b in zip(remote_steps, hf_steps):
        assert type(a) is torch.Tensor
        assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_generate_streams_each_token(server, plain):
    """Each token arrives as its own event, before the next step's progress and the end."""
    seen = []
    run = hhf.RemoteModel("tiny-gpt2").generate(PROMPT, 4, on_token=lambda k, t: seen.append(k),
                                                blocking=False)
    order = []
    for event in run.events():
        if isinstance(event, TokenEvent):
            order.append(("token", event.step))
        elif getattr(event, "stage", None) == "site":
            order.append(("step", event.site))
        elif isinstance(event, Done):
            order.append(("done", None))
    out = run.result()
    assert [e for e in order if e[0] == "token"] == [("token", k) for k in range(4)]
    for k in range(3):  # token k is out before forward k+1 is over
        assert order.index(("token", k)) < order.index(("step", k + 2))
    assert seen == [0, 1, 2, 3] and out.sequences.shape == (2, 11)
    assert all(not isinstance(e, SavedValue) for e in order)


def test_generate_limits_are_typed_and_server_goes_on(server):
    remote = hhf.RemoteModel("tiny-gpt2")
    with pytest.raises(LimitExceeded, match="positions|max_new_tokens"):
        remote.generate(PROMPT, 1000)
    conn = get_connection()
    assert conn.model_info("tiny-gpt2").name == "tiny-gpt2"
    assert remote.generate(PROMPT, 2).sequences.shape == (2, 9)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("do_sample", [False, True])
def test_tl_generate_remote_equals_local(server, local_models, remote_models, name, do_sample):
    model = local_models[name]
    vector = torch.randn(64, generator=torch.Generator().manual_seed(2))

    def steer(act, hook):
        return act + 0.5 * vector
    hooks = [("blocks.0.hook_resid_post", steer)]
    # What remote TL generate equals: local TL without a KV cache (the server keeps none for
    # TL's loop; test_tl_generate_without_kv_cache_is_never_silent covers the default).
    kw = dict(max_new_tokens=5, do_sample=do_sample, verbose=False, stop_at_eos=False,
              use_past_kv_cache=False)
    with model.hooks(fwd_hooks=hooks):
        torch.manual_seed(4)
        local = model.generate(PROMPT, **kw)
    with model.hooks(fwd_hooks=hooks):
        torch.manual_seed(4)
        remote = model.generate(PROMPT, remote=True, **kw)
    with remote_models[name].hooks(fwd_hooks=hooks):
        torch.manual_seed(4)
        stand_in = remote_models[name].generate(PROMPT, **kw)
    assert torch.equal(remote, local) and torch.equal(stand_in, local)
    if not do_sample:  # (a near-uniform tiny model samples alike either way)
        assert not torch.equal(model.generate(PROMPT, **kw), local)  # the hook mattered


@pytest.mark.parametrize("name", FAMILIES)
def test_tl_generate_without_kv_cache_is_never_silent(server, local_models, name):
    """Remote TL generate keeps no KV cache: with hooks, asking for one raises, leaving it at
    TL's default warns, and use_past_kv_cache=False equals local TL with the same setting --
    hooks see the same shapes at every step."""
    import warnings

    import hookwire.transformerlens as htl

    model = local_models[name]
    kw = dict(max_new_tokens=3, verbose=False, stop_at_eos=False, do_sample=False)
    seen: dict = {"remote": [], "local": []}

    def spy(key):
        def hook(act, hook):
            seen[key].append(tuple(act.shape))
            return act + 0.25
        return hook
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", spy("remote"))]):
        with pytest.raises(HookwireError, match="use_past_kv_cache"):
            model.generate(PROMPT, remote=True, use_past_kv_cache=True, **kw)
        with pytest.warns(htl.GenerateWithoutKVCache):
            model.generate(PROMPT, remote=True, **kw)
    seen["remote"].clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", htl.GenerateWithoutKVCache)
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", spy("remote"))]):
            remote = model.generate(PROMPT, remote=True, use_past_kv_cache=False, **kw)
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", spy("local"))]):
        local = model.generate(PROMPT, use_past_kv_cache=False, **kw)
    assert torch.equal(remote, local)
    assert seen["remote"] == seen["local"] == [(2, 7 + k, 64) for k in range(3)]


LEFT_PADDED_MASK = torch.tensor([[1] * 7, [0, 0, 0] + [1] * 4])


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_from_left_padded_prompts_equals_hf_generate(server, plain, name, do_sample):
    """Prompts of different lengths, left-padded with their attention_mask, as
    ``model.generate(**tokenizer(prompts, padding=True))`` passes them: each forward gets the
    mask and the positions HF's generate derives from it (the padded row counts from its
    first token), so the tokens and what the hooks saw equal HF's generate with the same mask.
    Refused before this ("generation takes unpadded prompts")."""
    mlp = PATHS[name][0]
    ids = PROMPT.clone()
    ids[1, :3] = 0  # pad ids (masked out)
    remote_steps, local_steps, hf_steps = [], [], []
    kw = dict(max_new_tokens=5, do_sample=do_sample, top_k=20, temperature=0.8)
    out = hhf.RemoteModel(name).generate(ids, hooks=steering(name, remote_steps), seed=5,
                                         attention_mask=LEFT_PADDED_MASK, modules=[mlp], **kw)
    local = hhf.LocalModel(plain[name]).generate(ids, hooks=steering(name, local_steps),
                                                 seed=5, attention_mask=LEFT_PADDED_MASK,
                                                 modules=[mlp], **kw)
    handles = [plain[name].get_submodule(mlp).register_forward_hook(
        steering(name, hf_steps)[mlp])]
    try:
        torch.manual_seed(5)  # HF samples from the global generator
        with torch.no_grad():
            reference = plain[name].generate(ids, attention_mask=LEFT_PADDED_MASK,
                                             eos_token_id=None, pad_token_id=0, **kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out.sequences, reference) and torch.equal(local.sequences, reference)
    assert len(remote_steps) == len(hf_steps) == 5
    for a, b in zip(remote_steps, hf_steps):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.cache[mlp], local.cache[mlp]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The mask reaches the forwards: the padded row's activations change (its positions
    # count from its first token, its padding is masked out); the full row's do not.
    unpadded_steps = []
    hhf.RemoteModel(name).generate(ids, hooks=steering(name, unpadded_steps), seed=5, **kw)
    assert_close(unpadded_steps[0][0], remote_steps[0][0], rtol=1e-5, atol=1e-5)
    assert (unpadded_steps[0][1] - remote_steps[0][1]).abs().max() > 1e-3


def test_generate_refuses_masks_it_cannot_continue(server):
    model = hhf.RemoteModel("tiny-gpt2")
    with pytest.raises(HookwireError, match="no token"):
        model.generate(PROMPT, 2, attention_mask=torch.tensor([[1] * 7, [0] * 7]))
    with pytest.raises(HookwireError, match="shaped like"):
        model.generate(PROMPT, 2, attention_mask=torch.ones(2, 6, dtype=torch.int64))
    with pytest.raises(HookwireError, match="0/1"):
        model.generate(PROMPT, 2, attention_mask=torch.full((2, 7), 2))


def _whole_steering(name, store):
    vector = torch.randn(64, generator=torch.Generator().manual_seed(9))

    def steer(module, args, output):
        store.append(output.clone())
        return output + 0.3 * vector
    return {PATHS[name][0]: steer}


PADDED_MASKS = {
    "right": torch.tensor([[1] * 7, [1] * 4 + [0] * 3]),
    "left_bool": torch.tensor([[1] * 7, [0, 0, 0] + [1] * 4]).bool(),
    "hole": torch.tensor([[1] * 7, [1, 1, 0, 1, 1, 1, 1]]),
    "both_padded": torch.tensor([[0] + [1] * 6, [0, 0, 0] + [1] * 4]),
}


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("kind", list(PADDED_MASKS))
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_from_any_padded_mask_equals_hf_generate(server, plain, name, kind,
                                                          do_sample):
    """Masks HF's generate takes beside left padding (right padding, bool, a hole, every row
    padded): the tokens and every activation the hook saw (padding positions included) equal
    HF's generate with the same mask, on the server and in LocalModel."""
    mask = PADDED_MASKS[kind]
    ids = PROMPT.clone()
    ids[mask == 0] = 0
    remote_steps, local_steps, hf_steps = [], [], []
    kw = dict(max_new_tokens=4, do_sample=do_sample, top_k=20, temperature=0.8)
    out = hhf.RemoteModel(name).generate(ids, hooks=_whole_steering(name, remote_steps),
                                         seed=5, attention_mask=mask, **kw)
    local = hhf.LocalModel(plain[name]).generate(ids, hooks=_whole_steering(name, local_steps),
                                                 seed=5, attention_mask=mask, **kw)
    mlp = PATHS[name][0]
    handles = [plain[name].get_submodule(mlp).register_forward_hook(
        _whole_steering(name, hf_steps)[mlp])]
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            reference = plain[name].generate(ids, attention_mask=mask, eos_token_id=None,
                                             pad_token_id=0, **kw)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(out.sequences, reference), (out.sequences, reference)
    assert torch.equal(local.sequences, reference)
    assert len(remote_steps) == len(hf_steps) == 4
    for a, b, c in zip(remote_steps, hf_steps, local_steps):
        assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert_close(c, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_from_padded_prompts_stops_rows_at_eos_as_hf_generate(server, plain, name):
    """A padded row that reaches EOS early is padded with pad_token_id from then on (its
    mask still grows, as HF's does), the other goes on: tokens equal HF's generate."""
    mask = PADDED_MASKS["right"]
    ids = PROMPT.clone()
    ids[mask == 0] = 0
    first = plain[name].generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)[:, -1]
    eos = int(first[1])
    kw = dict(max_new_tokens=5, do_sample=False)
    out = hhf.RemoteModel(name).generate(ids, attention_mask=mask, eos_token_id=eos,
                                         pad_token_id=3, **kw)
    with torch.no_grad():
        reference = plain[name].generate(ids, attention_mask=mask, eos_token_id=eos,
                                         pad_token_id=3, **kw)
    assert torch.equal(out.sequences, reference), (out.sequences, reference)
