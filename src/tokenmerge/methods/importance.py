"""Importance-based token merging (Wu, Xu, Le, Samaras), Sec. 3 and Appendix B.

For ``N`` tokens and ratio ``r``, with ``M = N - int(N * r)`` tokens computed on:

1. pool ``A``: the ``K = min(N, floor(M * (1 + pool)))`` most important tokens;
2. destinations: ``D = int(N * dst)`` tokens drawn at random from ``A``;
3. every other token is matched to its most similar destination (cosine);
4. independent tokens: the ``I = M - D`` pool tokens (not destinations) least similar to their destination;
5. everything else, the tokens outside the pool included, is averaged into its destination.

Appendix B: during the first ``prune_steps`` of the run the destinations are one random token per
2x2 cell and the other tokens are pruned (dropped, then copied back from their destination).
When no importance is known yet (the first step) or the pool holds every token, the destinations are
also drawn per 2x2 cell: the method is then ToMeSD, as the paper states for low ratios.
Both halves of a classifier-free-guidance pair share one plan, matched on the conditional half.

Without CFG (LCM and other guidance-distilled models, or ``guidance_scale <= 1``) ``importance="crossattn"``
takes the cross-attention map of the denoiser's final transformer block instead (Appendix A, Table 11; the
ablation's "averaged attention map from the final model block"): see :mod:`tokenmerge.signals`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..plan import MergePlan, cell_destinations, complement, draw, plan_from_matching
from .base import MethodConfig, PlanContext, check_range
from .matching import check_match, nearest

DST_SELECTIONS = ("random", "topk")
INDEPENDENT_FROM = ("pool", "all")
#: Importance signals computed by tokenmerge: CFG magnitude, or the final block's cross-attention map.
SIGNALS = ("cfg", "crossattn")


@dataclass(frozen=True, kw_only=True)
class ImportanceMerge(MethodConfig):
    """Importance-based token merging.

    Args:
        ratio: fraction of a block's tokens merged away, in ``[0, min(1 - dst, 0.75)]``.
        pool: ``p``: the pool holds ``N (1 - ratio) (1 + p)`` tokens (0.4 for images, 0.6 multi-view,
            0.8 video in the paper).
        dst: ``k``: fraction of tokens that are destinations (0.25, as ToMeSD's 2x2 cells).
        prune_steps: fraction of the first denoising steps that prune instead of merge (paper: 6 of 50).
        importance: ``"cfg"`` for ``|eps_cond - eps_uncond|`` of the previous step (channel mean; needs
            classifier-free guidance), ``"crossattn"`` for the previous step's cross-attention map of the
            denoiser's final transformer block (works without guidance: LCM), or a user map: a tensor
            ``(H, W)`` / ``(B, H, W)`` at any resolution, or a callable ``step -> tensor`` evaluated at every
            denoiser call.
        dst_selection: ``"random"`` (the paper) or ``"topk"`` (the paper's ablation: the most important).
        independent_from: ``"pool"`` (the paper) or ``"all"`` (the ablation "global ind.").
        match: ``"features"`` (cosine similarity, the paper on SD) or ``"grid"`` (nearest on the token grid,
            the paper on PixArt, Appendix B; the PixArt preset's default).
        proportional_attention: size-aware keys (see :class:`MethodConfig`). True by default here, which is
            tokenmerge's choice and not the paper's (one key per merged slot): on the testbed it took fidelity to
            the unpatched images from 38.6 to 53.9 dB at r = 0.5 and from 37.5 to 50.0 dB at 0.75, at the same
            speed (docs/quality.md). ``proportional_attention=False`` is the paper's method exactly.

    The placement and the other shared fields are :class:`MethodConfig`'s (the paper's defaults). There is no
    ``match_window``: ToMe's and ToFu's window relies on one destination per cell, and here the destinations
    are drawn from the importance pool, so a cell neighbourhood can hold none.
    """

    name = "importance"

    ratio: float = field(default=0.7, kw_only=False)
    pool: float = 0.4
    dst: float = 0.25
    prune_steps: float = 0.1
    importance: str | torch.Tensor | Callable[[int], torch.Tensor] = "cfg"
    dst_selection: str = "random"
    independent_from: str = "pool"
    match: str = "features"
    #: tokenmerge's default, not the paper's (one key per slot): size-aware keys, by measurement (docs/quality.md).
    proportional_attention: bool = True

    def check_fields(self) -> None:
        check_range(self, "pool", self.pool, 0.0, 10.0)
        check_range(self, "dst", self.dst, 0.01, 0.75)
        check_range(self, "prune_steps", self.prune_steps, 0.0, 1.0)
        if self.dst_selection not in DST_SELECTIONS:
            raise ValueError(f"ImportanceMerge.dst_selection must be one of {DST_SELECTIONS}, got {self.dst_selection!r}")
        if self.independent_from not in INDEPENDENT_FROM:
            raise ValueError(
                f"ImportanceMerge.independent_from must be one of {INDEPENDENT_FROM}, got {self.independent_from!r}"
            )
        check_match(self)
        imp = self.importance
        is_map = isinstance(imp, torch.Tensor) and imp.ndim in (2, 3)
        if not (is_map or callable(imp) or (isinstance(imp, str) and imp in SIGNALS)):
            raise ValueError(
                "ImportanceMerge.importance must be 'cfg', 'crossattn', a tensor (H, W) or (B, H, W), or a "
                f"callable step -> tensor; got {imp!r}"
            )

    @property
    def signal(self) -> object:
        return self.importance

    def prunes_at(self, progress: float) -> bool:
        return progress < self.prune_steps

    @property
    def always_prunes(self) -> bool:
        return self.prune_steps >= 1.0

    def max_ratio(self) -> float:
        # I = M - D must not be negative; the 2x2-cell phases keep N/4 destinations.
        return min(1.0 - self.dst, 0.75)

    @property
    def uses_rng(self) -> bool:
        # Only the most important tokens as destinations, from a map known at every step, draw nothing.
        known_map = isinstance(self.importance, torch.Tensor)
        return not (self.dst_selection == "topk" and self.prune_steps == 0 and known_map)

    @property
    def uses_clock(self) -> bool:
        return self.uses_rng or self.prune_steps > 0 or not isinstance(self.importance, torch.Tensor)

    def pool_size(self, num_tokens: int) -> int:
        kept = num_tokens - int(num_tokens * self.ratio)
        return min(num_tokens, max(kept, math.floor(kept * (1.0 + self.pool))))

    def num_destinations(self, num_tokens: int) -> int:
        return max(1, int(num_tokens * self.dst))

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:
        batch, num_tokens, _ = x.shape
        height, width = ctx.grid
        num_kept = num_tokens - int(num_tokens * self.ratio)
        if num_kept == num_tokens or height < 2 or width < 2:
            return None
        # One plan per CFG pair, matched on the conditional half [uncond; cond].
        features = ctx.conditional(x)
        groups = features.shape[0]
        pool_size = self.pool_size(num_tokens)
        whole_pool = ctx.importance is None or pool_size >= num_tokens
        pool = None if whole_pool else ctx.importance.topk(pool_size, dim=1).indices

        if ctx.prune_phase or pool is None:
            dst = cell_destinations(height, width, 2, 2, batch=groups, generator=ctx.generator, device=x.device)
        elif self.dst_selection == "topk":
            dst = pool[:, : self.num_destinations(num_tokens)]  # topk is sorted: the most important first
        else:
            order = draw(torch.rand, groups, pool_size, generator=ctx.generator, device=x.device)
            dst = pool.gather(1, order.topk(self.num_destinations(num_tokens), dim=1).indices)

        src = complement(dst, num_tokens)
        similarity, closest = nearest(features, src, dst, ctx.grid, self.match)
        if pool is not None and self.independent_from == "pool":
            in_pool = torch.zeros(groups, num_tokens, dtype=torch.bool, device=x.device).scatter_(1, pool, True)
            similarity = similarity.masked_fill(~in_pool.gather(1, src), math.inf)
        independent = similarity.topk(num_kept - dst.shape[1], dim=1, largest=False).indices

        parts = (dst, independent, src, closest)
        if ctx.groups > 1:  # the parts of a guided batch share the plan: repeated per part (a view for one image)
            parts = tuple(t[None].expand(ctx.groups, *t.shape).flatten(0, 1) for t in parts)
        return plan_from_matching(*parts, num_tokens, prune=ctx.prune_phase)
