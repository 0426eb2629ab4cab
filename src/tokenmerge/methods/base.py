"""What every method config shares: where to merge, validation helpers, and the context a plan sees."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..plan import MergePlan

SHARE_PLAN = ("block", "level")
#: Default ``min_tokens``: the smallest block (tokens) where merging its self-attention was measured to pay at
#: every ratio (benchmarks/merge_floor.py, CPU; docs/benchmarks.md).
MIN_TOKENS = 64


@dataclass
class PlanContext:
    """Everything a method may use to build a plan for one block call, besides the tokens.

    Attributes:
        grid: ``(height, width)`` of the block's token grid.
        generator: the patch's private RNG on the tokens' device (never the global one); None for a method
            that draws nothing (:attr:`MethodConfig.uses_rng` is False), so no generator is made per call.
        cfg_pairs: True when the batch is ``[uncond; cond]`` and both halves must share one plan.
        prune_phase: True during the first steps where the method prunes instead of merging.
        importance: ``(pairs_or_batch, N)`` importance of each token, or None when none is known yet.
        step: denoiser call index within the current pipeline run.
        block: name of the patched block (a key for per-block caches).
        level: the block's U-Net level (0 = full latent resolution).
        num_levels: how many levels the U-Net has (``level == num_levels - 1`` is the bottleneck).
        cache: a dict the method may keep things in across steps; emptied at every new pipeline run.
    """

    grid: tuple[int, int]
    generator: torch.Generator | None = None
    cfg_pairs: bool = False
    prune_phase: bool = False
    importance: torch.Tensor | None = None
    step: int = 0
    block: str = ""
    level: int = 0
    num_levels: int = 1
    cache: dict = field(default_factory=dict)


class MethodConfig:
    """Mixin for method configs: placement fields and the ``make_plan`` contract."""

    ratio: float
    max_downsample: int
    merge_attn: bool
    merge_crossattn: bool
    merge_mlp: bool
    seed: int | None

    #: Whether the method needs the per-token importance signal (so the denoiser hook computes it).
    uses_importance = False
    #: Default of the ``share_plan`` field where a method has one; methods without it plan per block.
    share_plan = "block"
    min_tokens: int

    @property
    def uses_rng(self) -> bool:
        """Whether plans draw from the private generator (False: none is created)."""
        return True

    @property
    def uses_clock(self) -> bool:
        """Whether plans depend on the run: its step or progress, or a reseeded generator at a new run.

        When False, a bare denoiser's timestep is never read (no device-to-host sync), and a compiled
        denoiser skips the clock entirely (no graph break, no per-step recompilation).
        """
        return True

    def share_key(self, block: str, level: int) -> tuple | None:
        """Key under which blocks share one plan per denoiser call, or None to plan per block.

        ``share_plan="level"``: every block of a U-Net level reuses the plan built from the input of the
        level's first block to run; a method whose plan depends on more than the level (ToFu: prune or
        merge) adds it to the key.
        """
        return ("level", level) if self.share_plan == "level" else None

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:  # pragma: no cover
        raise NotImplementedError

    def max_ratio(self) -> float:  # pragma: no cover
        raise NotImplementedError

    def _validate_common(self) -> None:
        check_range(self, "ratio", self.ratio, 0.0, self.max_ratio())
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(
                f"{type(self).__name__}.max_downsample must be one of 1, 2, 4, 8 (levels from the first "
                f"attention level), got {self.max_downsample!r}"
            )
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"{type(self).__name__}.seed must be an int or None, got {self.seed!r}")
        if self.share_plan not in SHARE_PLAN:
            raise ValueError(
                f"{type(self).__name__}.share_plan must be one of {SHARE_PLAN} (plan per block, or one plan per "
                f"U-Net level and denoiser call), got {self.share_plan!r}"
            )
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(
                f"{type(self).__name__}.min_tokens must be an int >= 0 (blocks with fewer tokens are not merged; "
                f"0 merges every block), got {self.min_tokens!r}"
            )
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError(
                f"{type(self).__name__}: merge_attn, merge_crossattn and merge_mlp are all False, so nothing "
                "would be merged; enable at least one (merge_attn=True is the papers' setting)"
            )

    def max_downsample_levels(self) -> int:
        """How many attention levels, from the highest resolution down, are patched."""
        return int(math.log2(self.max_downsample)) + 1


def check_range(config: object, name: str, value: float, low: float, high: float) -> None:
    """Raise ``ValueError`` naming the field unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{type(config).__name__}.{name} must be in [{low:g}, {high:g}], got {value!r}")
