"""ReToM: Local Representative Token Guided Merging (Lee, Kim, Lee), Sec. III and Algorithm 1.

The block's token grid is tiled by square windows (the "local boundaries"), whose size depends on the
U-Net level (Sec. III-A). In every window ``W`` of ``N_W`` tokens:

1. ``sim(x_i, W)``: the mean cosine similarity of each token to the other tokens of its window (Eq. 1);
2. the destination ``D`` is the representative token, the one with the highest ``sim`` (Sec. III-B);
3. the sources ``S``: the ``r = floor(N_W * ratio)`` tokens ranked next by ``sim`` (Algorithm 1, line 14,
   ``S <- sim(x_i, W)[1:r]``, and Fig. 1: "the top-r source tokens"); ``sources="nearest"`` takes instead the
   ``r`` tokens most similar (cosine) to ``D``. The remaining tokens of the window stay independent;
4. ``D``'s slot computes on ``alpha * D + (1 - alpha) * mean(S)`` (Eq. 2); every source receives its result.

Similarities never leave a window: each window size is one batched ``(B, windows, N_W, N_W)`` matmul,
never an ``N x N`` matrix. The selection (representatives, sources), i.e. the plan, is computed every
``period`` denoiser calls and reused in between (Sec. III-C, "similarity computation caching"): the hooks hold
it, as they hold any method's plans for ``plan_every`` (:attr:`ReToM.hold_steps`). The selection is per batch
element, as ToMeSD's matching (no CFG pair sharing: the paper mentions none); only ``destination="random"``
draws one token per window for the whole batch, as ToMeSD draws its cells.

Values the paper does not give, chosen here (all are config fields):

* window sizes: 2x2 at U-Net levels 0 and 1, 4x4 at level 2 and deeper down/up levels, 8x8 at the
  bottleneck (the lowest-resolution level). The paper only says "small in the down/up blocks, larger at the
  bottleneck", following the receptive field; 2 is ToMeSD's cell and the best fixed size of Table I, and
  at 512x512 an 8x8 window covers SD 1.x's whole 8x8 bottleneck grid ("global context").
* ``alpha``: None, i.e. the plain mean of ``D`` and its sources (``alpha = 1 / (r + 1)``), which is how
  Sec. III-B describes the merge ("computing the mean of the representative token and the source tokens").
  A float gives Eq. 2 with that fixed weight.
* ``period``: 5 denoiser calls (10 similarity computations in a 50-step run; Sec. IV-E only shows that
  the in-window similarity changes slowly across steps).
* ``ratio``: 0.5, ToMeSD's default.

Partial windows: a grid that the window size does not divide is tiled from the top-left corner and the
windows of the last column/row are cropped to the grid (a grid smaller than the window is one window). A
cropped window follows the same rule with its own ``N_W``, so e.g. at ratio 0.5 a 1x2 edge window merges one
token into the other and a 1x1 corner window stays independent. ``r`` depends only on a window's shape, so every
batch row keeps the same number of tokens ``M = N - sum_W floor(N_W * ratio)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import MergePlan, draw, gather_tokens
from .base import MethodConfig, PlanContext, check_range

DESTINATIONS = ("representative", "random", "least")
SOURCES = ("nearest", "mean")
#: Largest window side: a window of ``w x w`` tokens costs ``N * w^2`` similarity entries per batch row.
MAX_WINDOW = 32


@dataclass(frozen=True, kw_only=True)
class ReToM(MethodConfig):
    """Local Representative Token Guided Merging.

    Args:
        ratio: fraction of each window merged away: a window of ``N_W`` tokens merges
            ``r = floor(N_W * ratio)`` of them into its destination (Algorithm 1, line 4), so the ratio is
            quantized per window (with 2x2 windows: 0, 1, 2 or 3 tokens of 4). In
            ``[0, 1 - 1/w_min^2]`` where ``w_min`` is the smallest window side in use (0.75 for 2x2).
        window_sizes: window side at U-Net levels 0, 1, 2, ... (level 0 = full latent resolution) for the
            down/up blocks; levels past the end use the last entry. Default ``(2, 2, 4)``.
        bottleneck_window: window side at a U-Net's bottleneck, its lowest-resolution level
            (``PlanContext.bottleneck``: the mid block, and on SDXL the deepest down/up blocks too). A
            transformer has no bottleneck: its blocks use ``window_sizes[0]``.
        window: if set, this window side everywhere (Table I's "fixed window" rows: 2, 8, 16), overriding
            ``window_sizes`` and ``bottleneck_window``.
        alpha: weight of the destination in its slot, ``alpha * D + (1 - alpha) * mean(S)`` (Eq. 2), in
            ``[0, 1]``; None (default) is the plain mean of ``D`` and its sources (``alpha = 1/(r+1)``).
        period: ``p``: the window selection is computed at every ``p``-th denoiser call of a run and reused in
            between (Sec. III-C); 1 recomputes at every call. With ``plan_every`` too, the longer of the two holds.
        destination: ``"representative"`` (highest mean in-window similarity, the paper),
            ``"random"`` (one token per window drawn from the private generator, shared by the batch rows:
            Table I's "Adaptive / Random" row) or ``"least"`` (lowest mean similarity: Table II).
        sources: ``"mean"`` (default, the paper: Algorithm 1, line 14, ``S <- sim(x_i, W)[1:r]``): the ``r``
            tokens ranked next by mean in-window similarity; ``"nearest"``: the ``r`` tokens most similar
            (cosine) to the destination.
        max_downsample: as :class:`MethodConfig`'s, but 8 by default: every transformer block of a U-Net, as the
            paper (Sec. IV-A).

    The other shared fields are :class:`MethodConfig`'s.
    """

    name = "retom"

    window_sizes: tuple[int, ...] = (2, 2, 4)
    bottleneck_window: int = 8
    window: int | None = None
    alpha: float | None = None
    period: int = 5
    destination: str = "representative"
    sources: str = "mean"
    max_downsample: int = 8

    def check_fields(self) -> None:
        sizes = self.window_sizes
        if isinstance(sizes, list):
            sizes = tuple(sizes)
            object.__setattr__(self, "window_sizes", sizes)
        if not isinstance(sizes, tuple) or not sizes or not all(_is_window(s) for s in sizes):
            raise ValueError(
                f"ReToM.window_sizes must be a non-empty tuple of ints in [2, {MAX_WINDOW}] (window side per "
                f"U-Net level from the top), got {self.window_sizes!r}"
            )
        if not _is_window(self.bottleneck_window):
            raise ValueError(
                f"ReToM.bottleneck_window must be an int in [2, {MAX_WINDOW}], got {self.bottleneck_window!r}"
            )
        if self.window is not None and not _is_window(self.window):
            raise ValueError(f"ReToM.window must be None or an int in [2, {MAX_WINDOW}], got {self.window!r}")
        if self.alpha is not None:
            check_range(self, "alpha", self.alpha, 0.0, 1.0)
        if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
            raise ValueError(f"ReToM.period must be an int >= 1 (denoiser calls), got {self.period!r}")
        if self.destination not in DESTINATIONS:
            raise ValueError(f"ReToM.destination must be one of {DESTINATIONS}, got {self.destination!r}")
        if self.sources not in SOURCES:
            raise ValueError(f"ReToM.sources must be one of {SOURCES}, got {self.sources!r}")

    def max_ratio(self) -> float:
        # A full w x w window must keep its destination: r = floor(w^2 * ratio) <= w^2 - 1.
        smallest = self.window if self.window is not None else min(*self.window_sizes, self.bottleneck_window)
        return 1.0 - 1.0 / (smallest * smallest)

    @property
    def uses_rng(self) -> bool:
        return self.destination == "random"

    @property
    def hold_steps(self) -> int:
        return max(self.period, self.plan_every)

    def window_size(self, level: int, bottleneck: bool = False) -> int:
        """The window side at ``level``, or at a U-Net's bottleneck."""
        if self.window is not None:
            return self.window
        if bottleneck:
            return self.bottleneck_window
        return self.window_sizes[min(level, len(self.window_sizes) - 1)]

    def tokens_merged(self, window_tokens: int) -> int:
        """``r`` for a window of ``window_tokens`` tokens (Algorithm 1, line 4); never the whole window."""
        return min(math.floor(window_tokens * self.ratio), window_tokens - 1)

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:
        height, width = ctx.grid
        size = self.window_size(ctx.level, ctx.bottleneck)
        shapes = window_shapes(height, width, size)
        if all(self.tokens_merged(span_y * span_x) == 0 for _, span_y, _, span_x in shapes):
            return None
        kept, assign, num_dst, weight = self._select(x, window_groups(height, width, size, x.device), ctx)
        return MergePlan(kept=kept, assign=assign, num_dst=num_dst, merge_weight=weight)

    def _select(self, x: torch.Tensor, groups: list[torch.Tensor], ctx: PlanContext):
        """Choose destinations and sources in every window; the plan's index and weight tensors."""
        batch, num_tokens, channels = x.shape
        device = x.device
        features = x if x.dtype == torch.float64 else x.float()
        dsts, srcs, src_slots, dst_weights, src_weights, independents = [], [], [], [], [], []
        num_dst = 0
        for idx in groups:  # at most 4 window shapes: full, right edge, bottom edge, corner
            windows, k = idx.shape
            r = self.tokens_merged(k)
            if r == 0:
                independents.append(idx.reshape(1, -1).expand(batch, -1))
                continue
            tokens = gather_tokens(features, idx.reshape(1, -1).expand(batch, -1)).view(batch, windows, k, channels)
            unit = F.normalize(tokens, dim=-1)
            sim = unit @ unit.transpose(-1, -2)  # (B, windows, k, k)
            mean = (sim.sum(-1) - sim.diagonal(dim1=-2, dim2=-1)) / (k - 1)  # Eq. 1
            if self.destination == "representative":
                dst = mean.argmax(dim=-1)
            elif self.destination == "least":
                dst = mean.argmin(dim=-1)
            else:
                dst = draw(torch.randint, k, (1, windows), generator=ctx.generator, device=device).expand(batch, -1)
            if self.sources == "nearest":
                score = sim.gather(2, dst[:, :, None, None].expand(-1, -1, 1, k)).squeeze(2)
            else:  # Algorithm 1 ranks by sim; the least-representative ablation ranks the other way
                score = -mean if self.destination == "least" else mean.clone()
            # The destination ranks first, then its sources, then the window's independent tokens.
            score.scatter_(2, dst[:, :, None], math.inf)
            order = score.sort(dim=-1, descending=True, stable=True).indices
            members = idx.expand(batch, -1, -1).gather(2, order)  # (B, windows, k) token indices
            dsts.append(members[:, :, 0])
            srcs.append(members[:, :, 1 : 1 + r].reshape(batch, -1))
            independents.append(members[:, :, 1 + r :].reshape(batch, -1))
            slots = torch.arange(num_dst, num_dst + windows, device=device)
            src_slots.append(slots.repeat_interleave(r))
            a = 1.0 / (r + 1) if self.alpha is None else float(self.alpha)
            dst_weights.append(torch.full((windows,), a, device=device))
            src_weights.append(torch.full((windows * r,), (1.0 - a) / r, device=device))
            num_dst += windows

        dst = torch.cat(dsts, dim=1)
        src = torch.cat(srcs, dim=1)
        kept = torch.cat([dst, *independents], dim=1)
        num_kept = kept.shape[1]
        assign = torch.empty(batch, num_tokens, dtype=torch.long, device=device)
        assign.scatter_(1, kept, torch.arange(num_kept, device=device).expand(batch, -1))
        assign.scatter_(1, src, torch.cat(src_slots).expand(batch, -1))
        weight = torch.ones(batch, num_tokens, dtype=torch.float32, device=device)
        weight.scatter_(1, dst, torch.cat(dst_weights).expand(batch, -1))
        weight.scatter_(1, src, torch.cat(src_weights).expand(batch, -1))
        return kept, assign, num_dst, weight.reshape(-1, 1)


def window_shapes(height: int, width: int, size: int) -> list[tuple[int, int, int, int]]:
    """``(windows down, rows per window, windows across, columns per window)`` of each window shape.

    The grid is tiled with ``size x size`` windows from the top-left corner; the windows of the last
    column/row are cropped to the grid. Shapes in the order full, right edge, bottom edge, corner; a shape
    with no window is left out.
    """
    full_y, rest_y = divmod(height, size)
    full_x, rest_x = divmod(width, size)
    rows = [(full_y, size)] + ([(1, rest_y)] if rest_y else [])
    cols = [(full_x, size)] + ([(1, rest_x)] if rest_x else [])
    return [(ny, span_y, nx, span_x) for ny, span_y in rows for nx, span_x in cols if ny and nx]


def window_groups(height: int, width: int, size: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The windows of :func:`window_shapes` as token indices, built on ``device``.

    One ``(windows, tokens per window)`` tensor of raster token indices per window shape; windows in
    raster order within a shape, tokens in raster order within a window.
    """
    groups = []
    for windows_y, span_y, windows_x, span_x in window_shapes(height, width, size):
        # A cropped shape (span < size) is the single row/column of windows after the full ones.
        first_y = 0 if span_y == size else height - span_y
        first_x = 0 if span_x == size else width - span_x
        y = first_y + torch.arange(windows_y, device=device) * size
        x = first_x + torch.arange(windows_x, device=device) * size
        y = y[:, None, None, None] + torch.arange(span_y, device=device)[None, None, :, None]
        x = x[None, :, None, None] + torch.arange(span_x, device=device)[None, None, None, :]
        groups.append((y * width + x).reshape(windows_y * windows_x, span_y * span_x))
    return groups


def _is_window(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and 2 <= value <= MAX_WINDOW
