"""ToFu, Token Fusion (Kim, Gao, Hsu, Shen, Jin, WACV 2024), on the ToMeSD matching.

Paper: "Token Fusion: Bridging the Gap between Token Pruning and Token Merging", WACV 2024, pp. 1383-1392,
arXiv:2312.01026 (https://arxiv.org/abs/2312.01026).

The rule implemented here, for a block with ``N`` tokens and ``r = int(N * ratio)``:

1. **Matching: ToMeSD's, unchanged.** One destination per ``sy x sx`` cell (random with ``use_rand``, drawn
   as tomesd draws it); every other token is a source matched to its most similar destination (cosine);
   the ``r`` sources with the highest similarity are reduced, the rest stay independent. ToFu changes what
   happens to the reduced sources, not which ones they are (the public re-implementations call ToMe's
   bipartite soft matching unchanged), and on Stable Diffusion it is run as ToMeSD is (Wu et al.,
   "Importance-Based Token Merging", Sec. 2.2: ToFu "follows [a] similarly suboptimal destination token
   selection strategy", i.e. ToMeSD's random cells; their Table 1 compares ToFu, ToMeSD and theirs on SD 2
   at the same ratios). So the token counts are
   ToMe's and, from the same generator state, ``kept``/``assign`` are exactly ToMe's.

2. **Prune early, merge late.** ToFu's criterion (abstract): pruning is preferable where the model is
   sensitive to interpolating its input (``f(avg) != avg f``), merging where it responds close to linearly.
   The non-linear part is the early layers (the network that follows them is deep), so ToFu *prunes in the
   early layers* (a reduced source is dropped from the computation and receives its destination's output
   afterwards) and *merges in the later layers*; the public ViT re-implementations put the switch at half
   depth. On a U-Net we read "early" as the encoder: blocks in ``down_blocks`` prune, blocks in
   ``mid_block`` and ``up_blocks`` merge (``prune_blocks="down"``, the default). With the default
   ``max_downsample=1`` this is ToMeSD's placement split in two: the first-level down blocks prune, the
   first-level up blocks merge.

3. **MLERP merge (norm-preserving).** Averaging dissimilar tokens shrinks the norm, shifting the feature-norm
   distribution later layers expect. MLERP, ToFu's multi-token variant of SLERP, keeps the average's
   *direction* and gives it the largest *norm* among the tokens merged::

       mean = sum_i w_i x_i           (w_i = 1 / slot size: ToMeSD's plain mean)
       MLERP(x_1..x_k) = mean / ||mean|| * max_i ||x_i||

   over every member of the slot, the destination included. A slot with one member (an independent token,
   or a destination nothing was merged into) is left exactly as it is. A slot whose mean is exactly zero
   (members cancelling out) has no direction and stays zero.

Where the sources are ambiguous, and what we chose:

* We could read the paper's abstract, the importance-merging paper's account of ToFu (related work;
  Appendix B: "token pruning ... could help preserve structural details") and public re-implementations
  (PiToMe's ``algo/tofu``, OpenToMe's ``opentome/timm/tofu.py``), not the full text, so no equation or
  section numbers of ToFu are cited here. The placement (early layers prune) and the MLERP norm (the
  maximum over the merged tokens) are the same in every re-implementation and consistent with the abstract.
* None of these gives a U-Net block-by-block split (the re-implementations are for ViTs). We map the
  first half (the encoder) to pruning; whether the bottleneck (``mid_block``) prunes is not determined, and
  we let it merge (``prune_blocks="down_mid"`` makes it prune). ``"all"`` / ``"none"`` give the pure-pruning and
  pure-merging ablations.
* The mean is ToMeSD's unweighted one (SD blocks carry no token sizes from block to block).

Randomness, batch handling and placement (``max_downsample`` counted from the first level with attention)
are those of :class:`~tokenmerge.methods.tome.ToMe`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..plan import MergePlan, plan_from_matching
from .base import MethodConfig, PlanContext
from .tome import CellMethod, cell_matching, check_cells

PRUNE_BLOCKS = ("down", "down_mid", "all", "none")


@dataclass(eq=False)
class MlerpPlan(MergePlan):
    """A merging plan whose ``merge`` is ToFu's MLERP: each slot's mean, rescaled to its largest member norm.

    ``unmerge`` is the base class's: every token takes its slot's value.
    """

    _multi: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.prune:
            raise ValueError("MlerpPlan merges tokens; a pruning plan has no merged slot to rescale")
        super().__post_init__()
        self._multi = self._slot_scale.view(-1) < 1  # 1 / members: a slot with more than one member

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        mean = super().merge(x)
        b, n, c = x.shape
        m = self.num_kept
        norms = torch.linalg.vector_norm(x.reshape(b * n, c), dim=-1, dtype=torch.float32)
        largest = norms.new_zeros(b * m).scatter_reduce_(0, self._flat_assign, norms, reduce="amax",
                                                        include_self=False)
        rows = mean.view(b * m, c)
        mean_norm = torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32)
        rescale = self._multi & (mean_norm > 0)
        scale = torch.where(rescale, largest / mean_norm.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        # In float32, so that a large scale on a half-precision mean cannot overflow; 1.0 leaves a row exact.
        return (rows.float() * scale[:, None]).to(x.dtype).view(b, m, c)


@dataclass(frozen=True, kw_only=True)
class ToFu(CellMethod, MethodConfig):
    """Token Fusion: ToMeSD's matching, pruning in the early (down) blocks, MLERP merging in the later ones.

    Args:
        ratio: fraction of a block's tokens reduced (pruned or merged), in ``[0, 1 - 1/(sx*sy)]``.
        prune_blocks: which blocks prune instead of merging, by their stage in a U-Net: ``"down"`` (the encoder;
            the mid and up blocks merge: the paper's early/late split, our default), ``"down_mid"`` (the mid block
            prunes too), ``"all"`` (pruning only) or ``"none"`` (merging only). A transformer's blocks have no
            U-Net stage and merge, except with ``"all"``.
        mlerp: merge with MLERP (mean direction, largest member norm) instead of the plain mean.
        sx: horizontal stride of the destination cells.
        sy: vertical stride of the destination cells.
        use_rand: draw each cell's destination at random (True) or use its top-left token. As in
            tomesd, odd batch sizes (no CFG pair) always use the top-left token.
        match: ``"features"`` (cosine similarity) or ``"grid"`` (nearest destination on the token grid).
        match_window: None (default; tomesd): every source is compared with every destination, ``O(N^2)``. An
            int ``w``: only with the destinations of the cells within ``w`` cells of its own in each direction
            (``(2w+1)^2`` candidates, ``O(N)``; outputs change unless the window covers the whole cell grid).

    The placement and the other shared fields are :class:`MethodConfig`'s (ToMeSD's defaults).
    """

    name = "tofu"

    prune_blocks: str = "down"
    mlerp: bool = True
    sx: int = 2
    sy: int = 2
    use_rand: bool = True
    match: str = "features"
    match_window: int | None = None

    def check_fields(self) -> None:
        if self.prune_blocks not in PRUNE_BLOCKS:
            raise ValueError(f"ToFu.prune_blocks must be one of {PRUNE_BLOCKS}, got {self.prune_blocks!r}")
        if not isinstance(self.mlerp, bool):
            raise ValueError(f"ToFu.mlerp must be True or False, got {self.mlerp!r}")
        check_cells(self)

    @property
    def always_prunes(self) -> bool:
        return self.prune_blocks == "all"

    def share_key(self, level: int, stage: str) -> tuple | None:
        # Blocks of one level that prune and blocks that merge cannot share a plan.
        key = super().share_key(level, stage)
        return None if key is None else (*key, self.prunes(stage))

    def prunes(self, stage: str) -> bool:
        """Whether a block at ``stage`` (``PlanContext.stage``: ``"down"``, ``"mid"``, ``"up"``, ...) prunes."""
        if self.prune_blocks in ("all", "none"):
            return self.prune_blocks == "all"
        return stage == "down" or (stage == "mid" and self.prune_blocks == "down_mid")

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:
        matching = cell_matching(x, ctx, self.ratio, self.sx, self.sy, self.use_rand, self.match, self.match_window)
        if matching is None:
            return None
        prune = self.prunes(ctx.stage)
        plan = plan_from_matching(*matching, x.shape[1], prune=prune)
        if prune or not self.mlerp:
            return plan
        return MlerpPlan(kept=plan.kept, assign=plan.assign, num_dst=plan.num_dst)
