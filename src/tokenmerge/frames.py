"""Video tokens in one sequence (Wan: ``F x H x W`` tokens, frame-major): plans per frame or per group of frames.

The methods plan on a 2-D grid. A video transformer's sequence is therefore folded into batch rows, each method
plans the rows as it plans images, and the plans are joined into one :class:`~tokenmerge.plan.MergePlan` over the
whole sequence, so merging, unmerging and the rotary rows of the kept tokens work on the sequence as it is.

* ``frames_per_cell = 1``: every frame is a batch row on its own ``(H, W)`` grid: merging is spatial, per frame
  (attention still sees the kept tokens of every frame).
* ``k > 1``: ``k`` consecutive frames are one row on an ``(H * k, W)`` grid whose row ``h * k + t`` is row ``h``
  of the group's frame ``t``: a method's cells of two grid rows span two frames (1 row x 2 columns x 2 frames for
  2x2 cells, the same share of destinations), its grid distance counts a frame as a row, and its matching runs over
  the ``k`` frames, so a static region merges across time. Frames are grouped from the last; the first ``F mod k``
  are planned one by one (Wan's ``F = 1 + 4n`` latent frames with ``k = 2``: the first, which its causal VAE
  encodes alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .plan import MergePlan, arange_of, shape_constant


@dataclass(frozen=True)
class FrameGroup:
    """``groups`` groups of ``frames`` consecutive frames from frame ``first``, one batch row each."""

    first: int
    groups: int
    frames: int


@dataclass(frozen=True)
class FrameLayout:
    """The ``frames x height x width`` token grid of a video block and how its plans are folded."""

    frames: int
    height: int
    width: int
    frames_per_cell: int = 1

    @property
    def parts(self) -> tuple[FrameGroup, ...]:
        k = min(self.frames_per_cell, self.frames)
        alone, groups = self.frames % k, self.frames // k
        parts = (FrameGroup(0, alone, 1),) if alone else ()
        return (*parts, FrameGroup(alone, groups, k))

    def grid(self, part: FrameGroup) -> tuple[int, int]:
        return self.height * part.frames, self.width

    def fold(self, x: torch.Tensor, part: FrameGroup) -> torch.Tensor:
        """``(B, F * H * W, C) -> (B * groups, H * k * W, C)``: the part's frames as rows of its grid."""
        batch, channels = x.shape[0], x.shape[-1]
        frames = x.view(batch, self.frames, self.height, self.width, channels)
        frames = frames[:, part.first: part.first + part.groups * part.frames]
        rows = frames.reshape(batch, part.groups, part.frames, self.height, self.width, channels).transpose(2, 3)
        return rows.reshape(batch * part.groups, self.height * part.frames * self.width, channels)

    def positions(self, part: FrameGroup, device: torch.device) -> torch.Tensor:
        """``(groups, H * k * W)``: each folded token's index in the sequence."""
        def build() -> torch.Tensor:
            tokens = self.frames * self.height * self.width
            return self.fold(torch.arange(tokens, device=device).view(1, tokens, 1), part).view(part.groups, -1)

        return shape_constant(("frame positions", self, part, torch.device(device)), build)

    def plan(self, x: torch.Tensor,
             plan_part: Callable[[torch.Tensor, FrameGroup], MergePlan | None]) -> MergePlan | None:
        """One plan over the sequence ``x (B, F * H * W, C)`` from ``plan_part(folded tokens, part)`` for each part;
        None when no part merges (a part that does not is kept whole)."""
        planned = [(part, plan_part(folded, part)) for part in self.parts for folded in [self.fold(x, part)]]
        if all(plan is None for _, plan in planned):
            return None
        whole = [(part, plan or keep_all(x.shape[0] * part.groups, self.height * part.frames * self.width, x.device))
                 for part, plan in planned]
        return self.join(whole, x.shape[0])

    def join(self, planned: list[tuple[FrameGroup, MergePlan]], batch: int) -> MergePlan:
        """The parts' plans as one plan over the sequence: every group's destinations first, then the independent
        tokens, so ``num_dst`` keeps its meaning."""
        device = planned[0][1].kept.device
        tokens = self.frames * self.height * self.width
        dst_total = sum(part.groups * plan.num_dst for part, plan in planned)
        assign = torch.empty(batch, tokens, dtype=torch.long, device=device)
        prune = any(plan.prune for _, plan in planned)
        weighted = [plan.merge_weight for _, plan in planned if plan.merge_weight is not None]  # ReToM's alpha
        weight = weighted[0].new_empty(batch, tokens) if weighted and not prune else None
        dst, ind = [], []
        dst_at, ind_at = 0, dst_total
        for part, plan in planned:
            positions = self.positions(part, device)  # (G, n)
            groups, kept, d = part.groups, plan.num_kept, plan.num_dst
            where = positions.expand(batch, -1, -1).gather(2, plan.kept.reshape(batch, groups, kept))  # (B, G, m)
            dst.append(where[:, :, :d].reshape(batch, -1))
            ind.append(where[:, :, d:].reshape(batch, -1))
            slots = shape_constant(("frame slots", groups, kept, d, dst_at, ind_at, torch.device(device)),
                                   lambda: _slot_table(groups, kept, d, dst_at, ind_at, device))  # (G, m)
            local = plan.assign.reshape(batch, groups, -1)
            assign.scatter_(1, positions.reshape(1, -1).expand(batch, -1),
                            slots.expand(batch, -1, -1).gather(2, local).reshape(batch, -1))
            if weight is not None:  # a part's plain mean, as weights: 1 / its slot's members
                own = plan.merge_weight if plan.merge_weight is not None else plan.sizes().gather(
                    1, plan.assign).reciprocal().reshape(-1, 1)
                weight.scatter_(1, positions.reshape(1, -1).expand(batch, -1), own.reshape(batch, -1).to(weight.dtype))
            dst_at += groups * d
            ind_at += groups * (kept - d)
        return MergePlan(kept=torch.cat(dst + ind, dim=1), assign=assign, num_dst=dst_total, prune=prune,
                         merge_weight=None if weight is None else weight.reshape(-1, 1))


def _slot_table(groups: int, kept: int, num_dst: int, dst_at: int, ind_at: int, device) -> torch.Tensor:
    """``(G, m)``: the joined plan's slot of group ``g``'s local slot ``s`` (destinations, then independents)."""
    local = arange_of(kept, device).expand(groups, -1)
    group = torch.arange(groups, device=device)[:, None]
    return torch.where(local < num_dst, dst_at + group * num_dst + local,
                       ind_at + group * (kept - num_dst) + local - num_dst)


def keep_all(batch: int, tokens: int, device: torch.device) -> MergePlan:
    """The plan that keeps every token (each its own independent slot)."""
    every = arange_of(tokens, device).expand(batch, -1)
    return MergePlan(kept=every, assign=every, num_dst=0)
