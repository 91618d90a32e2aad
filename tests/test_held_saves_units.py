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


def test_a_copied_replacement_and_its_parts_are_followed_into_the_batch():
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
    assert torch.equal(out["part"], torch.full((1, 1), 6.0))


def test_a_part_of_a_replacement_with_no_row_major_layout_stays_as_it_was():
    value = torch.empty_strided((2, 3), (1, 2)).copy_(torch.full((2, 3), 3.0))
    held = HeldSaves(last_write_stage=4)
    held.hold("part", 2, value[:, :1])
    batch = torch.zeros(4, 3)
    into = batch[2:]
    into.copy_(value)
    held.copied(value, into)
    batch.mul_(2)
    assert torch.equal(released(held)["part"], torch.full((2, 1), 3.0))


def _views(value):
    """Views a hook makes of a kept (batch, pos, d) tensor."""
    yield value[:, 1:3]
    yield value[:, 0:7:2, 3:9:3].transpose(1, 2)
    yield value.select(1, 4)
    yield value.select(1, 4).unsqueeze(0).expand(3, -1, -1)
    yield value[:, 2]
    yield value[..., -1]
    yield value.permute(2, 0, 1)[1:4]
    yield value.reshape(-1)[5:20]                # crosses positions: not nameable
    yield value.reshape(-1)[::7]                 # steps across dimensions: not nameable
    yield value.diagonal(dim1=1, dim2=2)          # steps along two dimensions at once
    yield value.unfold(1, 3, 2)
    yield value[:, 3:4, 2:3]


def test_each_part_named_in_the_batch_shows_the_same_elements():
    """same_part_in names a view of the replacement in its rows of the batch (another
    layout: the batch's last dimension is padded here) exactly, or not at all."""
    from hookwire.held_saves import same_part_in

    named = 0
    for shape in ((1, 8, 10), (2, 8, 10), (3, 5, 6)):
        value = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        batch = torch.full((shape[0] + 2, shape[1], shape[2] + 3), -1.0)
        into = batch[1:1 + shape[0], :, :shape[2]]
        into.copy_(value)
        for view in _views(value):
            where = same_part_in(value, into, tuple(view.shape), tuple(view.stride()),
                                  view.storage_offset())
            if where is None:
                continue
            named += 1
            assert torch.equal(torch.as_strided(into, view.shape, *where), view), \
                (shape, view.shape, view.stride())
    assert named == 3 * 10  # all but the two that carry from one dimension into the next


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


def _random_views(seed: int, numel: int, tries: int = 2000):
    """(size, stride, offset) of random as_strided views inside a tensor of ``numel``
    elements."""
    gen = torch.Generator().manual_seed(seed)

    def pick(n):
        return int(torch.randint(0, n, (), generator=gen))
    for _ in range(tries):
        dims = 1 + pick(3)
        size = tuple(1 + pick(4) for _ in range(dims))
        stride = tuple(pick(31) for _ in range(dims))
        offset = pick(numel)
        if offset + sum((n - 1) * st for n, st in zip(size, stride)) < numel:
            yield size, stride, offset


def test_a_part_is_named_in_the_batch_only_where_it_shows_the_same_elements():
    """Any view of the replacement (random as_strided geometries inside it): where
    same_part_in names one in the batch's layout, it shows exactly the same elements."""
    from hookwire.held_saves import same_part_in

    value = torch.arange(60, dtype=torch.float32).reshape(2, 6, 5)
    batch = torch.full((4, 6, 9), -1.0)
    into = batch[1:3, :, 2:7]
    into.copy_(value)
    named = 0
    for size, stride, offset in _random_views(seed=0, numel=60):
        view = torch.as_strided(value, size, stride, offset)
        where = same_part_in(value, into, size, stride, offset)
        if where is not None:
            named += 1
            assert torch.equal(torch.as_strided(into, size, *where), view), \
                (size, stride, offset)
    assert named > 100


def test_a_write_into_a_copy_of_a_broadcast_activation_is_not_mirrored_into_every_row():
    """A batch mate replaced an activation that is one row expanded over the batch (GPT-2's
    position embeddings): the forward goes on with a copy. A member's in-place write into
    its rows of the copy was mirrored into its "rows" of the replaced tensor -- the one row
    every member's rows are -- changing what the others read of it."""
    from hookwire.executor import Interleaver
    shared = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    before = shared.clone()
    old = shared.expand(2, 3, 4)
    new = old.clone()
    il = object.__new__(Interleaver)
    il.held, il.values, il._twins, il._views_of = HeldSaves(last_write_stage=None), {}, {}, {}
    il.moved(old, new)
    mine = new[0:1]
    mine.mul_(-7.0)
    il._write_twins(mine)
    assert torch.equal(shared, before)  # the other member's row of `old` is as it was


def test_any_part_is_named_in_rows_of_the_same_layout():
    """Where the batch rows a replacement was copied into have its very layout (no
    padding), every view of it is named there -- one that runs from a position into the
    next (``y.view(-1)[60:70]``) too -- and shows the same elements."""
    from hookwire.held_saves import same_part_in

    value = torch.arange(60, dtype=torch.float32).reshape(2, 6, 5)
    batch = torch.full((5, 6, 5), -1.0)
    into = batch[2:4]
    into.copy_(value)
    for view in (value.view(-1), value.view(-1)[3:17], value.view(2, -1)[:, 4:9],
                 value.view(-1)[::7]):
        where = same_part_in(value, into, tuple(view.shape), tuple(view.stride()),
                              view.storage_offset())
        assert where is not None and torch.equal(torch.as_strided(into, view.shape, *where),
                                                 view)
    for size, stride, offset in _random_views(seed=1, numel=60):
        where = same_part_in(value, into, size, stride, offset)
        assert where is not None
        assert torch.equal(torch.as_strided(into, size, *where),
                           torch.as_strided(value, size, stride, offset))


class _CountingValues(dict):
    """A graph's values that count how many of them a lookup touches."""
    touched = 0

    def items(self):
        _CountingValues.touched += len(self)
        return super().items()

    def get(self, key, default=None):
        _CountingValues.touched += 1
        return super().get(key, default)


def test_a_batch_mates_replacement_looks_only_at_the_values_that_view_it():
    """Each site a batch mate replaces makes every other member's kept values follow the
    copy: they were found by scanning all of them, so a member keeping many values (50k views
    of one site) beside a mate replacing many sites cost sites x values in the forward's
    hooks (65 ms a site here, a minute and more on a large model's ~1300 site calls), where
    no deadline is checked. Held saves are found by the tensor they view; values are too."""
    from hookwire.executor import Interleaver
    il = object.__new__(Interleaver)
    il.held, il._twins, il._views_of = HeldSaves(last_write_stage=None), {}, {}
    il.values = _CountingValues()
    kept = torch.randn(1, 8, 4)
    for nid in range(5000):
        il.values[nid] = kept[:, nid % 8]
        il._views_of.setdefault(id(kept), []).append(nid)
    site = torch.randn(2, 8, 4)
    il.values[-1] = mine = site[1]
    il._views_of.setdefault(id(site), []).append(-1)
    _CountingValues.touched = 0
    old = site
    for _ in range(100):
        new = old.clone()
        il.moved(old, new)
        old = new
    assert _CountingValues.touched <= 200
    assert il.values[-1]._base is old and torch.equal(il.values[-1], mine)
    assert sum(len(pairs) for pairs in il._twins.values()) <= 2 * len(il._twins)
