"""match="grid": nearest destination by distance on the token grid."""

from __future__ import annotations

import pytest
import torch

from tokenmerge import ImportanceMerge, ReToM, ToFu, ToMe
from tokenmerge.methods.matching import nearest, nearest_on_grid


def test_nearest_on_grid_is_the_closest_destination_in_any_chunking():
    gen = torch.Generator().manual_seed(0)
    width = 7
    perm = torch.randperm(42, generator=gen)
    dst, src = perm[:9].sort().values[None], perm[9:][None]
    ys, xs = torch.arange(42) // width, torch.arange(42) % width
    distance = (ys[src][..., None] - ys[dst][:, None]) ** 2 + (xs[src][..., None] - xs[dst][:, None]) ** 2
    for max_elements in (1 << 26, 9 * 4):
        similarity, where = nearest_on_grid(src, dst, width, max_elements=max_elements)
        assert torch.equal(-similarity, distance.min(dim=-1).values.float())
        assert torch.equal(distance.gather(2, where[..., None])[..., 0], distance.min(dim=-1).values)


def test_grid_matching_ignores_the_features_and_broadcasts_over_the_batch():
    src, dst = torch.tensor([[1, 2]]), torch.tensor([[0, 3]])
    a, b = nearest(torch.randn(3, 4, 8), src, dst, (2, 2), "grid"), nearest(torch.zeros(3, 4, 8), src, dst, (2, 2), "grid")
    assert torch.equal(a[1], b[1]) and a[1].shape == (3, 2)


@pytest.mark.parametrize("cls", [ToMe, ToFu, ImportanceMerge])
def test_match_is_validated(cls):
    with pytest.raises(ValueError, match="match must be one of .'features', 'grid'."):
        cls(match="pixel")
    assert not hasattr(ReToM(), "match")  # ReToM's windows are ranked by feature similarity only
