"""Site layouts (hookwire.site_layout): what the server fits to its probes reproduces the
strides torch gives the same activation at other sizes -- permuted, broadcast and sliced
layouts alike; what it cannot describe stays contiguous; a malformed description from a server
is refused."""
from __future__ import annotations

import itertools

import pytest
import torch

from hookwire.client import _site_infos
from hookwire.errors import ProtocolError
from hookwire.protocol import SiteDescription
from hookwire.site_layout import check_layout, layout_of, strides_for

PROBES = ((3, 11), (5, 13))


def _made(perm, broadcast, batch, seq, widen=1):
    """A (batch, seq, 2, 5) activation laid out in memory in the dim order ``perm``, its
    ``broadcast`` dims expanded from size 1, and (``widen`` > 1) the first ``1/widen`` of
    each innermost row of a wider buffer: as a model's code makes them."""
    shape = (batch, seq, 2, 5)
    inverse = [perm.index(d) for d in range(4)]
    sizes = [1 if d in broadcast else shape[d] for d in perm]
    sizes[-1] *= widen
    base = torch.empty(sizes)[..., :sizes[-1] // widen] if widen > 1 else torch.empty(sizes)
    return base.permute(inverse).expand(shape)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(4))))
@pytest.mark.parametrize("broadcast,widen", [((), 1), ((0,), 1), ((2,), 1), ((), 3)])
def test_a_layout_fitted_to_two_probes_gives_torchs_strides_at_other_sizes(perm, broadcast,
                                                                           widen):
    probes = [(size, t.shape, t.stride()) for size in PROBES
              for t in [_made(perm, broadcast, *size, widen=widen)]]
    layout = layout_of(probes)
    if perm == (0, 1, 2, 3) and not broadcast and widen == 1:
        assert layout is None  # contiguous: described as before
        return
    assert layout is not None
    for batch, seq in ((1, 7), (2, 1), (4, 9), (1, 1), (7, 30)):
        real = _made(perm, broadcast, batch, seq, widen=widen)
        made = torch.empty_strided(real.shape, strides_for(layout, batch, seq),
                                   device="meta")
        assert made.is_contiguous() == real.is_contiguous()
        assert all(n == 1 or a == b for n, a, b in zip(real.shape, made.stride(),
                                                        real.stride()))


def test_what_no_layout_fits_stays_contiguous():
    # a row padded by one more than the sequence (attention sinks): not coef * B^b * S^s
    probes = [(size, t.shape, t.stride()) for size in PROBES
              for t in [torch.empty(size[0], size[1], size[1] + 1)[..., :size[1]]]]
    assert layout_of(probes) is None
    # probes that disagree in rank
    assert layout_of([((3, 11), (3, 11), (11, 1)), ((5, 13), (5, 13, 2), (26, 2, 1))]) is None


@pytest.mark.parametrize("layout", [[(1, 0, 0)] * 2, [(1, 0, 0), (1, 2, 0), (1, 0, 0)],
                                    [(1, 0, 3)] * 3, [(-1, 0, 0)] * 3, [(1, 0)] * 3])
def test_a_malformed_layout_from_a_server_is_refused(layout):
    with pytest.raises(ValueError):
        check_layout(layout, 3)


@pytest.mark.parametrize("layout", [[[2, 0, 0]] * 3, [[1, 2, 0]] * 4, [[1 << 41, 0, 0]] * 4])
def test_a_site_described_with_a_malformed_layout_is_refused(layout):
    with pytest.raises(ProtocolError, match="hook_rot_k"):
        _site_infos([SiteDescription.model_construct(
            name="blocks.0.attn.hook_rot_k", call=0, shape=["B", 2, "S", 16],
            dtype="float32", grad=False, eager=False, layout=layout)])


def test_a_described_layout_reaches_the_site():
    real = torch.empty(3, 7, 2, 16).transpose(1, 2)
    layout = [(32, 0, 1), (16, 0, 0), (32, 0, 0), (1, 0, 0)]
    desc = SiteDescription(name="blocks.0.attn.hook_rot_k", shape=["B", 2, "S", 16],
                           dtype="float32", layout=layout)
    (site,) = _site_infos([desc])
    assert site.concrete_strides(3, 7) == real.stride()
    assert site.meta_value(3, 7).stride() == real.stride()
