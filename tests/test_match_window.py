"""match_window: each source is compared only with the destinations of the cells around its own."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToFu, ToMe
from tokenmerge.methods.base import PlanContext
from tokenmerge.methods.matching import nearest, nearest_in_window
from tokenmerge.plan import cell_destinations, complement

from .conftest import run, unet_inputs

GRIDS = [(16, 16, 2, 2), (13, 18, 2, 2), (15, 17, 2, 4), (12, 9, 3, 2)]


def layout(height, width, sy, sx, seed=1):
    dst = cell_destinations(height, width, sy, sx, generator=torch.Generator().manual_seed(seed))
    return dst, complement(dst, height * width)


@pytest.mark.parametrize("height,width,sy,sx", GRIDS)
@pytest.mark.parametrize("match", ["features", "grid"])
def test_a_covering_window_is_the_global_matching(height, width, sy, sx, match):
    x = torch.randn(2, height * width, 16, generator=torch.Generator().manual_seed(0))
    dst, src = layout(height, width, sy, sx)
    expected = nearest(x, src, dst, (height, width), match)
    for max_elements in (1 << 26, 50):  # one chunk, and many
        similarity, where = nearest_in_window(x, src, dst, (height, width), sy, sx, 20, match, max_elements)
        assert torch.equal(where, expected[1])
        torch.testing.assert_close(similarity, expected[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("height,width,sy,sx", GRIDS)
@pytest.mark.parametrize("window", [0, 1, 2])
def test_every_source_gets_its_best_destination_inside_its_window(height, width, sy, sx, window):
    """Brute force: the full similarity matrix, masked to each source's window of cells."""
    x = torch.randn(2, height * width, 8, generator=torch.Generator().manual_seed(window))
    dst, src = layout(height, width, sy, sx, seed=window)
    similarity, where = nearest_in_window(x, src, dst, (height, width), sy, sx, window)
    cells_y, cells_x = height // sy, width // sx

    def cell(tokens):
        return (tokens // width // sy).clamp_max(cells_y - 1), (tokens % width // sx).clamp_max(cells_x - 1)

    (src_y, src_x), (dst_y, dst_x) = cell(src[0]), cell(dst[0])
    inside = ((src_y[:, None] - dst_y[None]).abs() <= window) & ((src_x[:, None] - dst_x[None]).abs() <= window)
    normed = torch.nn.functional.normalize(x, dim=-1)
    full = normed[:, src[0]] @ normed[:, dst[0]].transpose(1, 2)
    best = full.masked_fill(~inside, -torch.inf).max(dim=-1)
    assert inside.gather(1, where[0][:, None]).all() and inside.gather(1, where[1][:, None]).all()
    assert torch.equal(where, best.indices)
    torch.testing.assert_close(similarity, best.values, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cls", [ToMe, ToFu])
@pytest.mark.parametrize("grid", [(16, 16), (13, 18)])
def test_plans_keep_the_counts_and_a_covering_window_gives_the_same_plan(cls, grid):
    x = torch.randn(2, grid[0] * grid[1], 32, generator=torch.Generator().manual_seed(3))
    ctx = PlanContext(grid=grid)
    plans = {w: cls(ratio=0.5, use_rand=False, match_window=w).make_plan(x, ctx) for w in (None, 1, 8, 100)}
    for w in (8, 100):  # 8 covers the 8 x 9 cells of both grids (window >= cells - 1)
        assert torch.equal(plans[w].kept, plans[None].kept) and torch.equal(plans[w].assign, plans[None].assign)
    assert plans[1].kept.shape == plans[None].kept.shape and plans[1].num_dst == plans[None].num_dst
    assert torch.equal(plans[1].kept[:, : plans[1].num_dst], plans[None].kept[:, : plans[None].num_dst])
    assert not torch.equal(plans[1].assign, plans[None].assign)  # the window does restrict the matching


@pytest.mark.parametrize("config", [ToMe(ratio=0.5, match_window=1, min_tokens=0),
                                    ToFu(ratio=0.5, match_window=2, min_tokens=0),
                                    ToMe(ratio=0.5, match_window=1, match="grid", min_tokens=0)])
def test_works_on_a_tiny_unet_and_remove_restores_it(any_unet, config):
    args, kwargs = unet_inputs(any_unet, 2, 16, 16)
    before = run(any_unet, args, kwargs)
    tokenmerge.apply(any_unet, config)
    merged = run(any_unet, args, kwargs)
    tokenmerge.remove(any_unet)
    assert torch.isfinite(merged).all() and not torch.equal(merged, before)
    assert torch.equal(run(any_unet, args, kwargs), before)


@pytest.mark.parametrize("cls", [ToMe, ToFu])
@pytest.mark.parametrize("value", [-1, 1.5, True, "1"])
def test_bad_windows_name_the_field(cls, value):
    with pytest.raises(ValueError, match="match_window must be None"):
        cls(match_window=value)


def test_importance_merge_has_no_window():
    # Its destinations come from the importance pool, not one per cell: a neighbourhood may hold none.
    with pytest.raises(TypeError, match="match_window"):
        ImportanceMerge(match_window=1)
    assert not hasattr(ImportanceMerge(), "match_window")
