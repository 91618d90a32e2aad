"""HF hook spellings that used to give a silently different answer remotely (found by a
differential test of everyday spellings, seventeenth session): each now equals the local run
with plain torch hooks, or raises before anything is sent, naming the hook and what to do."""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

import hookwire.hf as hhf
from hookwire.errors import HookwireError, TraceError
from hookwire.hf import LocalModel
from hookwire.server.hf_modules import plain_hf_model
from test_hf_remote import torch_hooks_run

IDS = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
LN1 = {"tiny-gpt2": "transformer.h.0.ln_1", "tiny-llama": "model.layers.0.input_layernorm"}
BLOCKS = {"tiny-gpt2": ["transformer.h.0", "transformer.h.1"],
          "tiny-llama": ["model.layers.0", "model.layers.1"]}


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def name(request):
    return request.param


@pytest.fixture(scope="module")
def plain(hosted, server):
    return {name: plain_hf_model(h.bridge) for name, h in hosted.items()}


def local_logits(model, hooks: dict):
    return torch_hooks_run(model, hooks, IDS)


def test_an_in_place_edit_of_a_modules_input_in_its_forward_hook_raises(plain, name):
    """In a forward hook (after the module ran), ``args[0].mul_(0)`` on a block's first
    norm edits the block's residual stream locally (the norm's input is that tensor): the
    local answer changes. Remote, the edit used to be dropped (logits off by up to 0.97);
    now it is refused, naming the hook and saying where to edit instead."""
    def zero_input(module, args, output):
        args[0].mul_(0)

    hooks = {LN1[name]: zero_input}
    assert not torch.equal(local_logits(plain[name], hooks), local_logits(plain[name], {}))
    with pytest.raises(TraceError, match="pre-hook") as err:
        hhf.RemoteModel(name).run_with_hooks(IDS, hooks)
    assert "zero_input" in str(err.value)


def test_a_hook_registered_on_the_stand_in_raises_instead_of_being_ignored(plain, name):
    """``remote.get_submodule(p).register_forward_hook(f)`` then ``run_with_hooks(ids)``: the
    stand-in never runs a forward, so the hook used to be ignored silently (logits off by
    0.21). Now the call refuses, naming the module and the spelling that works; without
    the hook the model runs."""
    remote = hhf.RemoteModel(name)
    block = BLOCKS[name][0]

    def double(module, args, output):
        return (output[0] * 2.0,) + tuple(output[1:]) if isinstance(output, tuple) \
            else output * 2.0

    handle = remote.get_submodule(block).register_forward_hook(double)
    try:
        with pytest.raises(HookwireError, match=block):
            remote.run_with_hooks(IDS)
    finally:
        handle.remove()
    assert_close(remote.run_with_hooks(IDS, {block: double}).logits,
                 local_logits(plain[name], {block: double}))


def test_the_local_reference_refuses_what_it_does_not_take(plain, name):
    """``LocalModel.run_with_hooks(ids, output_hidden_states=True)`` (a keyword neither
    takes) used to be dropped silently (``**_``), so a comparison with it was of another
    computation; it raises now, as ``RemoteModel`` does. (``progress`` is accepted by
    both.)"""
    local = LocalModel(plain[name])
    with pytest.raises(TypeError):
        local.run_with_hooks(IDS, output_hidden_states=True)
    with pytest.raises(TypeError):
        hhf.RemoteModel(name).run_with_hooks(IDS, output_hidden_states=True)
    assert_close(local.run_with_hooks(IDS, progress=False).logits,
                 local_logits(plain[name], {}))


@pytest.mark.parametrize("padding", ["left", "right"])
def test_a_padded_batch_runs_with_its_attention_mask(plain, name, padding):
    """``run_with_hooks(ids, hooks, attention_mask=mask)`` / ``run_with_cache``: a padded
    batch, as HF's forward takes it (it used to be a ``TypeError``; the server took masks
    only from nnsight's front). Equal to the same hooks on the local model with the same
    mask; the mask changes the answer; a mask of the wrong shape or values raises before
    sending."""
    mask = torch.ones_like(IDS)
    if padding == "left":
        mask[0, :3] = 0
    else:
        mask[0, -3:] = 0
    block = BLOCKS[name][1]

    def steer(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden[:, -1] += 0.5

    hooks = {block: steer}
    local = LocalModel(plain[name])
    remote = hhf.RemoteModel(name)
    expected = local.run_with_hooks(IDS, hooks, attention_mask=mask).logits
    assert not torch.equal(expected, local.run_with_hooks(IDS, hooks).logits)
    assert_close(remote.run_with_hooks(IDS, hooks, attention_mask=mask).logits, expected)
    # With no hook at all, too: the server runs the plain HF forward (TL's would derive the
    # positions from the mask; it did, off by up to 0.7 with left padding)
    assert_close(remote.run_with_hooks(IDS, attention_mask=mask).logits,
                 local.run_with_hooks(IDS, attention_mask=mask).logits)
    out, cache = remote.run_with_cache(IDS, [BLOCKS[name][0]], attention_mask=mask)
    local_out, local_cache = local.run_with_cache(IDS, [BLOCKS[name][0]],
                                                  attention_mask=mask)
    assert_close(out.logits, local_out.logits)
    first = local_cache[BLOCKS[name][0]]
    got = cache[BLOCKS[name][0]]
    if isinstance(first, tuple):
        first, got = first[0], got[0]
    assert_close(got, first)
    for bad in (mask[:, 1:], mask * 2, mask.float()):
        with pytest.raises(HookwireError, match="attention_mask"):
            remote.run_with_hooks(IDS, hooks, attention_mask=bad)


def test_a_partial_hook_whose_bound_store_holds_a_traced_value_runs(plain, name):
    """The same ``functools.partial`` on every block, appending what it sees to a bound
    list: its label for errors was its ``repr``, which printed the list -- holding a value
    this trace made -- and the call was refused ("printing a tensor's values"). It runs,
    equal to local."""
    def store(kept, module, args, output):
        kept.append(output[0] if isinstance(output, tuple) else output)

    def run(model_call):
        kept: list = []
        hooks = {block: functools.partial(store, kept) for block in BLOCKS[name]}
        return model_call(hooks), kept

    local, local_kept = run(lambda hooks: local_logits(plain[name], hooks))
    remote, remote_kept = run(lambda hooks: hhf.RemoteModel(name).run_with_hooks(IDS, hooks)
                              .logits)
    assert_close(remote, local)
    assert len(remote_kept) == len(local_kept) == 2
    for got, exp in zip(remote_kept, local_kept):
        assert_close(got, exp)


def test_a_hook_with_a_kwargs_signature_raises_naming_it(plain, name):
    """A ``with_kwargs=True`` pre-hook's function, ``fn(module, args, kwargs)``, given as an
    ``":input"`` hook (or a forward hook taking ``kwargs``): locally torch would call it with
    ``(module, args)`` and fail with a bare ``TypeError``; remote, it is refused before
    sending, naming the hook and what hooks are called with."""
    block = BLOCKS[name][1]

    def pre_with_kwargs(module, args, kwargs):
        return (args[0] * 2.0,) + args[1:], kwargs

    def post_with_kwargs(module, args, kwargs, output):
        return output

    for key, fn in ((f"{block}:input", pre_with_kwargs), (block, post_with_kwargs)):
        with pytest.raises(TraceError, match=r"with_kwargs=True") as err:
            hhf.RemoteModel(name).run_with_hooks(IDS, {key: fn})
        assert fn.__name__ in str(err.value)


def test_the_plain_hf_forward_is_refused_for_tl_hook_points(server, name):
    """``forward.hf_forward`` (what the HF front sends) with a TL hook point in the graph is
    refused before anything runs, naming the rule: TL hook points fire in TL's forward."""
    from graphs import read_graph
    from pipelined import PipelinedClient

    g = read_graph(name, sites=["blocks.0.hook_resid_post"])
    g["forward"]["hf_forward"] = True
    client = PipelinedClient(server.url)
    try:
        rid = client.send(g, {"input_ids": IDS})
        error = client.collect([rid])[rid].error
    finally:
        client.close()
    assert error is not None and error.details.get("rule") == "site_kinds", error
