"""Review: piece edits under autograd, remote against local TL (grad on, trainable weights)."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hookwire.errors import TraceError

R1 = "blocks.1.hook_resid_pre"


def nograd_unbind(x):
    with torch.no_grad():
        return x.unbind(0)


SPELLINGS = {
    "torch.split": lambda x: torch.split(x, 3, -1)[0].zero_(),
    "split_with_sizes": lambda x: x.split_with_sizes([2, x.shape[-1] - 2], -1)[0].zero_(),
    "tensor_split": lambda x: x.tensor_split(2, -1)[0].zero_(),
    "hsplit": lambda x: x.hsplit(2)[0].zero_(),
    "unsafe_chunk": lambda x: x.unsafe_chunk(2, -1)[0].zero_(),
    "unsafe_split": lambda x: x.unsafe_split(3, -1)[0].zero_(),
    "piece.detach": lambda x: x.unbind(0)[0].detach().zero_(),
    "detach.unbind": lambda x: x.detach().unbind(0)[0].zero_(),
    "nograd unbind": lambda x: nograd_unbind(x)[0].zero_(),
    "list(x)": lambda x: list(x)[0].zero_(),
    "chunk(1)": lambda x: x.chunk(1, -1)[0].zero_(),
    "movedim.unbind": lambda x: x.movedim(-1, 0).unbind(0)[0].zero_(),
    "torch.unbind": lambda x: torch.unbind(x, 1)[0].zero_(),
    "torch.chunk": lambda x: torch.chunk(x, 2, -1)[0].zero_(),
    "detach, scale, unbind": lambda x: (x.detach() * 2).unbind(0)[0].zero_(),
    "scale, unbind": lambda x: (x * 2).unbind(0)[0].zero_(),
    "row of detach": lambda x: [row.zero_() for row in x.detach()],
    "detach of a row": lambda x: [row.detach().mul_(0.5) for row in x],
    "view of a piece": lambda x: x.unbind(0)[0].view(-1)[:3].zero_(),
    "piece += 1": lambda x: [p.__iadd__(1.0) for p in x.chunk(2, -1)],
    "piece.clamp_": lambda x: x.split(4, -1)[1].clamp_(max=0.0),
    "piece.masked_fill_": lambda x: x.unbind(1)[0].masked_fill_(x.unbind(1)[0] > 0, 0.0),
    "float() of a piece": lambda x: x.unbind(0)[0].float().zero_(),
    "piece of float()": lambda x: x.float().unbind(0)[0].zero_(),
}
UNSUPPORTED = {"tensor_split", "hsplit", "unsafe_chunk", "unsafe_split"}  # refused: no op


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_piece_edit(local_models, remote_models, tokens, spelling):
    edit = SPELLINGS[spelling]

    def piece_edit(x, hook):
        edit(x)
    name = "tiny-gpt2"
    try:
        local = local_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, piece_edit)])
        local_err = None
    except RuntimeError as exc:
        local_err = exc
    try:
        remote = remote_models[name].run_with_hooks(tokens, fwd_hooks=[(R1, piece_edit)],
                                                    progress=False)
        remote_err = None
    except TraceError as exc:
        remote_err = exc
    if spelling in UNSUPPORTED:  # not in the registry: refused before sending
        assert remote_err is not None and "registry" in str(remote_err)
        return
    assert (local_err is None) == (remote_err is None), (local_err, remote_err)
    if local_err is None:
        assert_close(remote, local.detach())


def test_a_piece_of_token_ids_may_be_edited_in_place(local_models, remote_models, tokens):
    """Token ids (embed.hook_in) are integers: they never require grad, so locally editing
    a row of them in place runs under grad mode too; remote must not refuse it."""
    def first_token_zero(x, hook):
        for row in x:
            row[0] = 0
    name = "tiny-gpt2"
    local = local_models[name].run_with_hooks(tokens, fwd_hooks=[("embed.hook_in",
                                                                   first_token_zero)])
    remote = remote_models[name].run_with_hooks(tokens, fwd_hooks=[("embed.hook_in",
                                                                    first_token_zero)],
                                                progress=False)
    assert_close(remote, local.detach())
