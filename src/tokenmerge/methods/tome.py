"""ToMeSD (Bolya & Hoffman, 2023) as the ``tomesd`` 0.1.3 package defines it.

Destinations: one token per ``sy x sx`` cell (random, or the top-left one). Every other token is a
source; the ``r = int(N * ratio)`` sources most similar (cosine) to their best destination are averaged
into it, the rest stay independent. The plan is computed per batch element from the block input.

Where we differ from tomesd, on purpose:

* placement: ``max_downsample`` counts from the highest-resolution level *that has attention*
  (on SD 1.x/2.x that is tomesd's meaning; on SDXL tomesd's default patches nothing);
* a ratio above ``1 - 1/(sx*sy)`` raises instead of being clamped silently;
* randomness comes from a private generator seeded from ``seed`` and reset at each pipeline call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import MergePlan, cell_destinations, complement, plan_from_matching, shape_constant
from .base import MethodConfig, PlanContext
from .matching import check_match, check_match_window, nearest, nearest_in_window, window_covers


class CellMethod:
    """What the methods with one destination per ``sx x sy`` cell share (ToMe, ToFu)."""

    sx: int
    sy: int
    use_rand: bool

    def max_ratio(self) -> float:
        return 1.0 - 1.0 / (self.sx * self.sy)

    @property
    def uses_rng(self) -> bool:
        return self.use_rand

    @property
    def uses_clock(self) -> bool:
        return self.uses_rng  # a new run reseeds the generator; nothing else depends on the step


@dataclass(frozen=True, kw_only=True)
class ToMe(CellMethod, MethodConfig):
    """Token Merging for Stable Diffusion (ToMeSD).

    Args:
        ratio: fraction of a block's tokens merged away, in ``[0, 1 - 1/(sx*sy)]`` (0.75 for 2x2).
        sx: horizontal stride of the destination cells.
        sy: vertical stride of the destination cells.
        use_rand: draw each cell's destination at random (True) or use its top-left token. As in
            tomesd, odd batch sizes (no CFG pair) always use the top-left token.
        match: ``"features"`` (cosine similarity, tomesd) or ``"grid"`` (nearest destination on the token
            grid; the importance paper's setting on PixArt, which the PixArt preset uses).
        match_window: None (default; tomesd): every source is compared with every destination, ``O(N^2)``. An
            int ``w``: only with the destinations of the cells within ``w`` cells of its own in each direction
            (``(2w+1)^2`` candidates, ``O(N)``; outputs change unless the window covers the whole cell grid).

    The placement and the other shared fields are :class:`MethodConfig`'s; their defaults are tomesd's.
    """

    name = "tome"

    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    match: str = "features"
    match_window: int | None = None

    def check_fields(self) -> None:
        check_cells(self)

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:
        matching = cell_matching(x, ctx, self.ratio, self.sx, self.sy, self.use_rand, self.match, self.match_window)
        return None if matching is None else plan_from_matching(*matching, x.shape[1])


def check_cells(config: MethodConfig) -> None:
    """Check the fields of a cell-matching config: the ``sx``/``sy`` strides, ``use_rand``, the matching."""
    name = type(config).__name__
    for field_name in ("sx", "sy"):
        value = getattr(config, field_name)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 8:
            raise ValueError(f"{name}.{field_name} must be an int in [1, 8], got {value!r}")
    if config.sx * config.sy == 1:
        raise ValueError(f"{name}: sx * sy must be at least 2 (a 1x1 cell leaves no token to merge); use sx=2, sy=2")
    if not isinstance(config.use_rand, bool):
        raise ValueError(f"{name}.use_rand must be True or False, got {config.use_rand!r}")
    check_match(config)
    check_match_window(config)


def cell_matching(x: torch.Tensor, ctx: PlanContext, ratio: float, sx: int, sy: int, use_rand: bool,
                  match: str = "features", match_window: int | None = None):
    """ToMeSD's bipartite matching: ``(dst, kept_src, src, nearest)`` for plan_from_matching, or None.

    One destination per ``sy x sx`` cell; the ``int(N * ratio)`` sources most similar to their best
    destination are reduced, the others kept (``kept_src``, positions within ``src``). ``match="grid"``
    matches by distance on the grid instead of cosine similarity. ``match_window`` restricts each source's
    candidates to the destinations of the cells around its own (a window covering the grid is the global matching).
    """
    batch, num_tokens, _ = x.shape
    height, width = ctx.grid
    reduced = int(num_tokens * ratio)
    if reduced <= 0 or height < sy or width < sx:
        return None
    # tomesd: an odd batch holds no [uncond; cond] pair, and random cells then cause artifacts.
    use_rand = use_rand and batch % 2 == 0
    dst = cell_destinations(height, width, sy, sx, generator=ctx.generator if use_rand else None,
                            device=x.device).expand(batch, -1)
    if use_rand:
        src = complement(dst[:1], num_tokens)
    else:  # the top-left tokens: the same sources at every call
        src = shape_constant(("cell sources", height, width, sy, sx, x.device), lambda: complement(dst[:1], num_tokens))
    src = src.expand(batch, -1)
    if window_covers(ctx.grid, sy, sx, match_window):
        similarity, closest = nearest(x, src, dst, ctx.grid, match)
    else:
        similarity, closest = nearest_in_window(x, src, dst, ctx.grid, sy, sx, match_window, match)
    order = similarity.argsort(dim=-1, descending=True)
    return dst, order[:, reduced:], src, closest
