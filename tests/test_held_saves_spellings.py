"""Review: more kept-value spellings, remote against local TL."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

E, R0, R1 = "hook_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
P0, P1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


def keep(state, key):
    def keep_value(x, hook):
        state[key] = x
    return keep_value


def halve(x, hook):
    x.mul_(0.5)


def edit_and_return(x, hook):
    x[:, 1] = 0.0
    return x


def keep_and_return_edited(state):
    def h(x, hook):
        state["k"] = x
        x[:, 0] = 3.0
        return x
    return h


def keep_y_then_copy_into_x(state):
    def h(x, hook):
        y = x * 2.0
        state["y"] = y
        x.copy_(y)
    return h


def keep_y_then_assign_into_x(state):
    def h(x, hook):
        y = x * 2.0
        state["y"] = y
        x[:] = y
    return h


SPELLINGS = {
    "two hooks on one point: keep a view, then halve":
        lambda st: [(R1, lambda x, hook: st.__setitem__("v", x[:, 1:3])), (R1, halve)],
    "keep a view of P0, then edit that view's region at R1":
        lambda st: [(P0, lambda x, hook: st.__setitem__("v", x[:, 1:3])),
                    (R1, edit_and_return)],
    "keep y, x.copy_(y) at P0, halve R1":
        lambda st: [(P0, keep_y_then_copy_into_x(st)), (R1, halve)],
    "keep y, x[:] = y at P0, halve R1":
        lambda st: [(P0, keep_y_then_assign_into_x(st)), (R1, halve)],
    "keep y, x.copy_(y) at R1":
        lambda st: [(P0, keep(st, "p0")), (R1, keep_y_then_copy_into_x(st))],
    "two hooks on one point: keep, then halve":
        lambda st: [(R1, keep(st, "r1")), (R1, halve)],
    "edit and return x at P0, keep P0 after, halve R1":
        lambda st: [(P0, edit_and_return), (P0, keep(st, "p0")), (R1, halve)],
    "keep and return edited at P0, halve R1":
        lambda st: [(P0, keep_and_return_edited(st)), (R1, halve)],
    "keep embed, edit-and-return resid_pre(0)":
        lambda st: [(E, keep(st, "e")), (R0, edit_and_return)],
    "keep a view of P0, halve R1":
        lambda st: [(P0, lambda x, hook: st.__setitem__("v", x[:, 1:3])), (R1, halve)],
    "keep a transpose of P0, halve R1":
        lambda st: [(P0, lambda x, hook: st.__setitem__("t", x.transpose(1, 2))),
                    (R1, halve)],
    "keep P0 and R1, halve R1 then P1":
        lambda st: [(P0, keep(st, "p0")), (R1, keep(st, "r1")), (R1, halve),
                    (P1, halve)],
}


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spelling(local_models, remote_models, tokens, spelling):
    name = "tiny-gpt2"
    ls, rs = {}, {}
    with torch.no_grad():
        local = local_models[name].run_with_hooks(tokens, fwd_hooks=SPELLINGS[spelling](ls))
        remote = remote_models[name].run_with_hooks(tokens,
                                                    fwd_hooks=SPELLINGS[spelling](rs),
                                                    progress=False)
    assert_close(remote, local)
    assert ls.keys() == rs.keys()
    for k in ls:
        assert_close(rs[k], ls[k], msg=k)
