"""Site layouts (hookwire.site_layout): what the server derives from its probes reproduces the
strides torch gives the same activation at other sizes; what it cannot describe stays
contiguous; a malformed description from a server is refused."""
from __future__ import annotations

import itertools

import pytest
import torch

from hookwire.client import _site_infos
from hookwire.errors import ProtocolError
from hookwire.protocol import SiteDescription
from hookwire.site_layout import check_layout, layout_of, strides_for


def _made(perm, broadcast, shape):
    """A tensor of ``shape`` laid out in memory in the dim order ``perm``, with the
    ``broadcast`` dims expanded from size 1, as a model's code would make it."""
    inverse = [perm.index(d) for d in range(len(shape))]
    sizes = [1 if d in broadcast else shape[d] for d in perm]
    return torch.empty(sizes).permute(inverse).expand(shape)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
@pytest.mark.parametrize("broadcast", [(), (0,), (2,)])
def test_a_layout_from_two_probes_gives_torchs_strides_at_other_sizes(perm, broadcast):
    probes = [_made(perm, broadcast, shape) for shape in ((3, 11, 2, 5), (5, 13, 2, 5))]
    layout = layout_of([(p.shape, p.stride()) for p in probes])
    if perm == (0, 1, 2, 3) and not broadcast:
        assert layout is None  # contiguous: described as before
        return
    assert layout is not None
    for shape in ((1, 7, 2, 5), (2, 1, 2, 5), (4, 9, 2, 5), (1, 1, 2, 5)):
        real = _made(perm, broadcast, shape)
        made = torch.empty_strided(shape, strides_for(shape, layout), device="meta")
        assert made.is_contiguous() == real.is_contiguous()
        assert all(n == 1 or a == b for n, a, b in zip(shape, made.stride(), real.stride()))


def test_what_no_layout_describes_stays_contiguous():
    q = torch.empty(3, 11, 192)[..., :64]  # a slice of a fused buffer: a gap in each row
    assert layout_of([(q.shape, q.stride())]) is None
    # probes that disagree (a layout that follows the size) are not described either
    a, b = torch.empty(3, 11, 4).transpose(0, 1), torch.empty(5, 13, 4)
    assert layout_of([(a.shape, a.stride()), (b.shape, b.stride())]) is None


@pytest.mark.parametrize("layout", [([0, 1], [1]), ([0, 0, 1], []), ([0, 1, 5], []),
                                    ([0, 1], [])])
def test_a_malformed_layout_from_a_server_is_refused(layout):
    with pytest.raises(ValueError):
        check_layout(layout, 3)
    desc = SiteDescription(name="blocks.0.attn.hook_rot_k", shape=["B", 2, "S", 16],
                           dtype="float32", layout=(layout[0], layout[1]))
    with pytest.raises(ProtocolError, match="hook_rot_k"):
        _site_infos([desc])


def test_a_described_layout_reaches_the_site():
    desc = SiteDescription(name="blocks.0.attn.hook_rot_k", shape=["B", 2, "S", 16],
                           dtype="float32", layout=([0, 2, 1, 3], []))
    (site,) = _site_infos([desc])
    real = torch.empty(3, 7, 2, 16).transpose(1, 2)
    assert site.concrete_strides(3, 7) == real.stride()
    assert site.meta_value(3, 7).stride() == real.stride()
