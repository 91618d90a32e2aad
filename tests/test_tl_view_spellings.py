"""Hook spellings whose local meaning rests on torch's aliasing (views, in-place edits of
captured tensors, named result tuples), remote against local TL: equal, or a ``TraceError``
before anything is sent, naming the hook -- never a silently different answer. Each case was
a silent mismatch found by a differential test of everyday spellings (seventeenth session).
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from conftest import MODEL_NAMES
from hookwire.errors import TraceError
from strided_sites import strided_hook_points

R0, R1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"


@pytest.fixture(params=MODEL_NAMES)
def name(request):
    return request.param


def both(local_models, remote_models, name, tokens, make):
    """Run the hooks ``make()`` builds locally and remotely: (local, remote) results, each
    (logits, the state the hooks kept)."""
    out = []
    for model, kw in ((local_models[name], {}), (remote_models[name], {"progress": False})):
        hooks, state = make()
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks, **kw)
        out.append((logits, state))
    return out


def test_an_edit_through_a_diagonal_view_raises_before_sending(local_models, remote_models,
                                                               name, tokens):
    """``x[:, :8, :8].diagonal(...)`` is a view: locally ``fill_`` on it edits the
    activation. Remote, the edit cannot be carried back through it: it used to be dropped
    silently (logits off by up to 0.98); now it is refused, naming the hook."""
    def diagonal_fill(x, hook):
        x[:, :8, :8].diagonal(dim1=1, dim2=2).fill_(3.0)

    with torch.no_grad():
        local = local_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, diagonal_fill)])
        plain = local_models[name](tokens)
    assert not torch.equal(local, plain)  # locally the edit does reach the activation
    with pytest.raises(TraceError, match="diagonal") as err:
        remote_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, diagonal_fill)],
                                           progress=False)
    assert "diagonal_fill" in str(err.value)


@pytest.mark.parametrize("spelling", ["expand", "diagonal"])
def test_a_view_made_before_an_edit_of_its_base_shows_the_edit(local_models, remote_models,
                                                               name, tokens, spelling):
    """A view taken (``expand``, ``diagonal``), then its base edited in place, then the view
    kept: locally the kept view shows the edit. Remote it used to keep the value from before
    the edit (off by ~5)."""
    def make():
        state = {}

        def hook(x, hook):
            view = x[:, :1].expand(-1, 4, -1) if spelling == "expand" else \
                x.diagonal(dim1=1, dim2=2)
            x[:, 0] = 5.0
            state["view"] = view
        return [(R1, hook)], state

    (ll, ls), (rl, rs) = both(local_models, remote_models, name, tokens, make)
    assert_close(rl, ll)
    assert_close(rs["view"], ls["view"])


def test_an_edit_through_a_conversion_that_changes_nothing_reaches_the_activation(
        local_models, remote_models, name, tokens):
    """``x.float()`` of a float32 activation is ``x`` itself: an edit through it is an edit
    of the activation, carried back."""
    def make():
        def hook(x, hook):
            y = x.float()
            y[:, 1] = 0.0
        return [(R1, hook)], {}

    (ll, _), (rl, _) = both(local_models, remote_models, name, tokens, make)
    assert_close(rl, ll)


def test_a_captured_tensor_edited_in_place_after_a_hook_used_it_raises(remote_models, name,
                                                                       tokens):
    """A hook adds ``vec``; a later hook of the same run edits ``vec`` in place. Locally the
    first hook computed with ``vec`` as it was then; a request sends ``vec`` once, as it is
    at the end: the remote answer used to be the one with the edited ``vec`` (off by 0.83 on
    tiny-llama). Now it is refused, naming the hook that used it."""
    d_model = remote_models[name].cfg.d_model
    vec = torch.zeros(d_model)

    def add_vec(x, hook):
        return x + vec

    def bump_vec(x, hook):
        vec.add_(1.0)

    with pytest.raises(TraceError, match="edited in place") as err:
        remote_models[name].run_with_hooks(tokens, fwd_hooks=[(R0, add_vec), (R1, bump_vec)],
                                           progress=False)
    assert "add_vec" in str(err.value)
    # Used again by a later hook after the edit: refused at that hook's line.
    vec.zero_()

    def fill_vec(x, hook):
        vec.fill_(1.0)
    with pytest.raises(TraceError, match="edited in place"):
        remote_models[name].run_with_hooks(
            tokens, fwd_hooks=[(R0, add_vec), ("blocks.0.hook_resid_mid", fill_vec),
                               (R1, add_vec)], progress=False)


def test_a_captured_tensor_that_no_hook_edits_is_sent_as_it_is(local_models, remote_models,
                                                               name, tokens):
    """(The check above must not refuse the everyday case: a steering vector used on two
    layers, edited before the call, never during it.)"""
    d_model = remote_models[name].cfg.d_model
    vec = torch.linspace(-1, 1, d_model)
    vec.mul_(0.5)  # before the run: what every hook sees

    def make():
        def add_vec(x, hook):
            return x + vec
        return [(R0, add_vec), (R1, add_vec)], {}

    (ll, _), (rl, _) = both(local_models, remote_models, name, tokens, make)
    assert_close(rl, ll)


def test_named_result_tuples_kept_by_a_hook_hold_tensors(local_models, remote_models, name,
                                                         tokens):
    """``torch.topk`` and ``x.max(dim)`` return torch's named tuples: kept by a hook, they
    must hold the values after a remote run as after a local one (they used to keep the
    tracer's placeholders)."""
    def make():
        state = {}

        def hook(x, hook):
            state["topk"] = torch.topk(x, 5, dim=-1)
            state["max"] = x.max(-1)
        return [(R1, hook)], state

    (ll, ls), (rl, rs) = both(local_models, remote_models, name, tokens, make)
    assert_close(rl, ll)
    for key in ("topk", "max"):
        assert type(rs[key]) is type(ls[key])
        assert_close(rs[key].values, ls[key].values)
        assert torch.equal(rs[key].indices, ls[key].indices)


def test_a_copy_from_an_overlapping_part_of_the_same_tensor_raises(remote_models, local_models,
                                                                  name, tokens):
    """``x[:, 1:] = x[:, :-1]``: locally torch copies element by element in memory order and
    reads positions it has already overwritten (position 0 smeared along the sequence);
    remote used to give the clean shift (off by ~1). Refused now, with the clone that says
    what was meant; copies between disjoint parts, or of a part onto itself, still run
    equal to local."""
    def shift(x, hook):
        x[:, 1:] = x[:, :-1]

    def shift_through_copy(x, hook):
        x[:, 1:].copy_(x[:, :-1])

    for fn in (shift, shift_through_copy):
        with pytest.raises(TraceError, match="overlaps") as err:
            remote_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, fn)], progress=False)
        assert fn.__name__ in str(err.value) and ".clone()" in str(err.value)

    def make():
        def disjoint(x, hook):
            x[:, 0] = x[:, 1]
            x[:, 2] = x[:, 2]
            x[:, 1:].copy_(x[:, :-1].clone())
        return [(R1, disjoint)], {}

    (ll, _), (rl, _) = both(local_models, remote_models, name, tokens, make)
    assert_close(rl, ll)


PIECE_EDITS = {
    "for row in x": lambda x: [row.__setitem__((slice(None), 0), 0.0) for row in x],
    "unbind": lambda x: x.unbind(0)[0].mul_(2),
    "chunk": lambda x: x.chunk(2, dim=-1)[0].zero_(),
    "split": lambda x: x.split([10, x.shape[-1] - 10], dim=-1)[1].mul_(0),
    "unbind, then a slice of the piece": lambda x: x.unbind(0)[0][1:].zero_(),
}


@pytest.mark.parametrize("spelling", PIECE_EDITS)
def test_an_in_place_edit_of_a_piece_raises_where_autograd_refuses_it_locally(
        local_models, remote_models, name, tokens, spelling):
    """Pieces of ``unbind``/``split``/``chunk`` (and the rows ``for row in x`` yields) are
    views torch refuses to edit in place while autograd records: locally, with grad on and
    trainable weights, the hook raises ``RuntimeError``. Remote used to run the edit and
    return logits. Now it raises before sending, naming the hook; under ``torch.no_grad()``
    both run it, equal."""
    edit = PIECE_EDITS[spelling]

    def piece_edit(x, hook):
        edit(x)

    assert torch.is_grad_enabled()
    with pytest.raises(RuntimeError, match="modified inplace"):
        local_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, piece_edit)])
    with pytest.raises(TraceError, match="torch.no_grad") as err:
        remote_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, piece_edit)],
                                           progress=False)
    assert "piece_edit" in str(err.value)

    (ll, _), (rl, _) = both(local_models, remote_models, name, tokens,
                            lambda: ([(R1, piece_edit)], {}))
    with torch.no_grad():
        plain = local_models[name](tokens)
    assert not torch.equal(ll, plain)  # the edit reaches the activation
    assert_close(rl, ll)


EVERYDAY_OPS = {
    "x.lerp_(target, 0.3)": lambda x: x.lerp_(x.flip(1), 0.3),
    "torch.lerp with a tensor weight": lambda x: torch.lerp(x, torch.zeros_like(x),
                                                            x.sigmoid()),
    "x.clamp_min_(0)": lambda x: x.clamp_min_(0.0),
    "x.clamp_max(0.0)": lambda x: x.copy_(x.clamp_max(0.0)),
    "x.addcmul_(a, b, value=0.5)": lambda x: x.addcmul_(x, x.flip(1), value=0.5),
    "torch.addcdiv": lambda x: torch.addcdiv(x, x, x.abs() + 1.0, value=2.0),
    "broadcast_to, then edit its base": lambda x: _broadcast_then_edit(x),
}


def _broadcast_then_edit(x):
    view = x[:, :1].broadcast_to(x.shape[0], 3, x.shape[-1])
    x[:, 0] = 2.0
    return x + view.sum(1, keepdim=True)


@pytest.mark.parametrize("spelling", EVERYDAY_OPS)
def test_everyday_ops_that_had_no_remote_spelling_equal_local(local_models, remote_models,
                                                              name, tokens, spelling):
    """``lerp``, ``clamp_min``/``clamp_max``, ``addcmul``/``addcdiv`` (and their in-place
    forms) and ``broadcast_to`` used to be refused as outside the registry; they run now,
    with torch's own kernels on the server, equal to local TL. A view made by
    ``broadcast_to`` shows a later edit of its base, as locally."""
    op = EVERYDAY_OPS[spelling]

    def make():
        def everyday_op(x, hook):
            out = op(x)
            return out if out is not None and out is not x else None
        return [(R1, everyday_op)], {}

    (ll, _), (rl, _) = both(local_models, remote_models, name, tokens, make)
    with torch.no_grad():
        plain = local_models[name](tokens)
    assert not torch.equal(ll, plain)
    assert_close(rl, ll)


def test_an_edit_through_dot_data_reaches_the_activation(local_models, remote_models, name,
                                                         tokens):
    """``x.data[:, 1] = 9.0`` (older code's spelling of an edit outside autograd) edits the
    activation locally. It used to be refused as an op outside the registry: torch hands
    the tracer a new method-wrapper for ``Tensor.data`` each time, so the check that maps it
    to ``detach`` never matched."""
    def make():
        state = {}

        def data_edit(x, hook):
            x.data[:, 1] = 9.0
            state["row"] = x.data[:, 1]
        return [(R1, data_edit)], state

    (ll, ls), (rl, rs) = both(local_models, remote_models, name, tokens, make)
    with torch.no_grad():
        plain = local_models[name](tokens)
    assert not torch.equal(ll, plain)
    assert_close(rl, ll)
    assert_close(rs["row"], ls["row"])


@pytest.mark.parametrize("spelling", [
    "mT_contiguous_setitem", "transpose_contiguous_setitem", "contiguous_setitem",
    "transpose_contiguous_view", "contiguous_view_inplace"])
def test_contiguous_copies_only_where_torch_does(local_models, remote_models, name, tokens,
                                                 spelling):
    """``x.mT.contiguous()`` is a copy (the view is not contiguous): locally an edit of it
    leaves the activation alone. The tracer treated ``contiguous()`` as the tensor itself
    everywhere, so the edit reached the activation remotely (logits off by 0.8; found by the
    co-batching differential, nineteenth session). Of a contiguous tensor it is the tensor
    itself: an edit of it does reach the activation, remotely as locally."""
    def make():
        state = {}

        def hook(x, hook):
            if spelling == "mT_contiguous_setitem":
                x.mT.contiguous()[0] = 5.0
            elif spelling == "transpose_contiguous_setitem":
                y = x.transpose(1, 2).contiguous()
                y[..., 0] = 5.0
                state["y"] = y
            elif spelling == "contiguous_setitem":
                x.contiguous()[:, 1] *= -2.0
            elif spelling == "transpose_contiguous_view":
                state["flat"] = x.transpose(1, 2).contiguous().view(x.shape[0], -1)
            else:
                x.contiguous().view(-1)[x.shape[-1] + 1:x.shape[-1] + 8].mul_(-3.0)
        return [(R1, hook)], state

    (local, lstate), (remote, rstate) = both(local_models, remote_models, name, tokens, make)
    assert_close(remote, local)
    assert rstate.keys() == lstate.keys()
    for key in lstate:
        assert_close(rstate[key], lstate[key])
    if spelling in ("contiguous_setitem", "contiguous_view_inplace"):
        with torch.no_grad():
            assert not torch.equal(local, local_models[name](tokens))  # the edit did reach it


@pytest.mark.parametrize("spelling", ["contiguous_view_inplace", "view_flat"])
def test_sites_that_are_not_contiguous_trace_with_their_strides(local_models, remote_models,
                                                                name, tokens, spelling):
    """Some activations are not contiguous: Llama's ``attn.hook_rot_q``/``hook_rot_k`` (heads
    and positions swapped in memory), GPT-2's ``hook_pos_embed`` (one row broadcast over the
    batch). The trace treated every site as contiguous: after TL's conversion ``rot_k`` looked
    transposed, so ``rot_k.contiguous()`` became a copy where locally it is the tensor itself
    (the edit after it was lost remotely, logits off by 1e-3), and
    ``pos_embed.contiguous().view(-1)`` failed on the server where it works locally. The
    server now describes each site's layout and proxies carry its strides."""
    sites = strided_hook_points(local_models[name], tokens)
    assert sites, "no site of this model has a non-contiguous activation to check"
    with torch.no_grad():
        plain = local_models[name](tokens)
    for site in sites:
        def make():
            state = {}

            def hook(x, hook):
                state["contiguous"] = x.is_contiguous()
                if spelling == "contiguous_view_inplace":
                    x.contiguous().view(-1)[1::3].mul_(-3.0)
                else:
                    x.view(-1)
            return [(site, hook)], state
        if spelling == "view_flat" and not local_models[name].hook_dict[site].hook_conversion:
            # Locally a view of the raw strided activation fails: remotely it must fail at
            # trace time, before anything is sent (saying it would fail locally).
            with pytest.raises(RuntimeError, match="view size is not compatible"):
                both(local_models, {name: local_models[name]}, name, tokens, make)
            with pytest.raises(TraceError, match="view size is not compatible"):
                remote_models[name].run_with_hooks(tokens, fwd_hooks=make()[0],
                                                   progress=False)
            continue
        (local, lstate), (remote, rstate) = both(local_models, remote_models, name, tokens,
                                                 make)
        assert_close(remote, local, msg=site)
        assert rstate == lstate, site  # (what the hook saw, remotely: the proxy's layout)
        if spelling == "contiguous_view_inplace":
            # The edit reaches the activation where contiguous() is the tensor itself.
            assert torch.equal(local, plain) != lstate["contiguous"], site


@pytest.mark.parametrize("spelling", ["unbind_row_edit", "row_setitem"])
def test_an_edit_of_part_of_a_broadcast_activation_raises_before_sending(
        local_models, remote_models, tokens, spelling):
    """GPT-2's ``hook_pos_embed`` is one row broadcast over the batch: locally editing one
    batch row of it edits the one row every batch row shares. A trace edits values, not
    memory: remotely the server failed the request. It is refused at trace time now, with
    the way out (build the value out of place and return it)."""
    name = "tiny-gpt2"
    sites = [s for s, (_, strides) in strided_hook_points(local_models[name], tokens).items()
             if 0 in strides]
    assert sites and tokens.shape[0] > 1

    def hook(x, hook):
        if spelling == "unbind_row_edit":
            x.unbind(0)[1].mul_(-3.0)
        else:
            x[1] = 0.0
    for site in sites:
        with torch.no_grad():
            local_models[name].run_with_hooks(tokens, fwd_hooks=[(site, hook)])  # runs
        with torch.no_grad(), \
                pytest.raises(TraceError, match="broadcast over a dim.*return it from the hook"):
            remote_models[name].run_with_hooks(tokens, fwd_hooks=[(site, hook)],
                                               progress=False)
