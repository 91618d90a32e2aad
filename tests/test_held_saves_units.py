"""``HeldSaves`` on plain tensors: which tensor each held save follows through a batch mate's
replacement (``moved``), its own replacement copied into the batch (``copied``) and an
in-place write of its site (``written``), and that each lookup concerns only the saves it
names (the index by tensor: a co-tenant holding many saves adds no work to another's)."""
from __future__ import annotations

import torch

from hookwire.held_saves import HeldSaves


def released(held: HeldSaves) -> dict:
    return {name: value.clone() for name, value, _ in held.release()}


def test_saves_follow_their_tensor_through_a_copy_and_show_later_edits():
    a, b = torch.arange(6.0).reshape(2, 3).clone(), torch.ones(2, 3)
    held = HeldSaves(last_write_stage=5)
    held.hold("a", 0, a)
    held.hold("b row", 0, b[0])
    a2 = a.clone()            # the forward goes on with a copy of a
    held.moved(a, a2)
    a2.mul_(2)                # ... and a later site edits it in place
    a.fill_(-1)               # the old tensor is no one's any more
    b.add_(1)
    out = released(held)
    assert torch.equal(out["a"], torch.arange(6.0).reshape(2, 3) * 2)
    assert torch.equal(out["b row"], torch.full((3,), 2.0))


def test_a_save_of_the_written_value_follows_the_site_and_a_read_stays_as_read():
    site = torch.zeros(2, 3)
    held = HeldSaves(last_write_stage=1)
    held.hold("read", 1, site)           # the site as read, before this stage's write
    written = site + 5.0
    held.hold("written", 1, written)     # the very value written in place: the activation
    held.written(1, written, site)
    site.copy_(written)
    site[0] = 7.0                        # edited again later
    out = released(held)
    assert torch.equal(out["read"], torch.zeros(2, 3))
    assert torch.equal(out["written"], site)


def test_a_copied_replacement_is_followed_into_the_batch_but_a_part_of_it_is_not():
    value = torch.full((1, 3), 3.0)
    held = HeldSaves(last_write_stage=4)
    held.hold("whole", 2, value)
    held.hold("part", 2, value[:, :1])
    batch = torch.zeros(2, 3)
    into = batch[1:]
    into.copy_(value)
    held.copied(value, into)
    batch.mul_(2)
    out = released(held)
    assert torch.equal(out["whole"], torch.full((1, 3), 6.0))
    assert torch.equal(out["part"], torch.full((1, 1), 3.0))


def test_a_lookup_concerns_only_the_saves_of_the_tensor_it_names():
    many, one = torch.zeros(4), torch.zeros(4)
    held = HeldSaves(last_write_stage=9)
    for k in range(1000):
        held.hold(f"m{k}", 0, many)
    held.hold("one", 0, one)
    one2 = one.clone()
    held.moved(one, one2)
    assert len(held._by_root[id(many)]) == 1000 and id(one) not in held._by_root
    assert [e.name for e in held._by_root[id(one2)]] == ["one"]
    one2.add_(1)
    out = released(held)
    assert torch.equal(out["one"], torch.ones(4)) and torch.equal(out["m999"], torch.zeros(4))
    assert held._by_root == {} and held.held == []
