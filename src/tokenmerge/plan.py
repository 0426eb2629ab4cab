"""MergePlan and the tensor operations every method shares.

A plan describes, for one batch of ``N`` tokens, which ``M`` tokens are kept (computed on)
and which kept slot every token maps to. Every method in tokenmerge produces one; the hooks
only ever call ``plan.merge`` and ``plan.unmerge``. Writing the token bookkeeping once, here,
keeps the methods short and makes the invariants testable in one place:

* ``unmerge(merge(x))`` has the shape of ``x``;
* a kept token's unmerged output is exactly its own slot's value;
* a merged (or pruned) token receives a copy of its destination's value.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# Destination roles, as drawn in the computation maps (see tokenmerge.tools.viz).
MERGED, DESTINATION, INDEPENDENT = 0, 1, 2

_SHAPE_CONSTANTS: dict[tuple, object] = {}
_MAX_SHAPE_CONSTANTS = 512


def shape_constant(key: tuple, build: Callable[[], object]) -> object:
    """Index tensors that depend only on shapes (and the device), built once per ``key`` and shared.

    A plan is a few dozen small kernels; on a GPU each costs its launch whatever the token count, so the
    index tensors every plan of a grid needs (cell corners, aranges, batch offsets) are made once, not per
    block and step. Callers must not modify the returned tensor in place. Under ``torch.compile`` the tensor
    is built in the graph (where it is constant-folded) instead of read from this cache.
    """
    if torch.compiler.is_compiling():
        return build()
    value = _SHAPE_CONSTANTS.get(key)
    if value is None:
        if len(_SHAPE_CONSTANTS) >= _MAX_SHAPE_CONSTANTS:
            _SHAPE_CONSTANTS.clear()
        with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable in and out of inference mode
            value = _SHAPE_CONSTANTS[key] = build()
    return value


#: ``PlanContext.generator`` for "the default generator of the tokens' device". The denoiser hooks load the patch's
#: private RNG state into that generator for the length of each call (:class:`tokenmerge.state.PrivateRNG`), so a
#: plan draws the numbers a private ``torch.Generator`` in that state would, and ``torch.compile`` can trace the
#: draw (it cannot trace a ``torch.Generator`` argument).
DEVICE_RNG = "device"


def draw(sample: Callable[..., torch.Tensor], *args: object, generator: torch.Generator | str,
         device: torch.device | str) -> torch.Tensor:
    """``sample(*args)`` (``torch.rand``, ``randn``, ``randint``) on ``device``, from ``generator``: a
    ``torch.Generator`` (drawn on its own device, then moved) or :data:`DEVICE_RNG`."""
    if isinstance(generator, torch.Generator):
        return sample(*args, generator=generator, device=generator.device).to(device)
    return sample(*args, device=device)


def arange_of(n: int, device: torch.device | str) -> torch.Tensor:
    """``torch.arange(n)`` on ``device``, shared (see :func:`shape_constant`)."""
    return shape_constant(("arange", n, torch.device(device)), lambda: torch.arange(n, device=device))


def _batch_offsets(batch: int, n: int, device: torch.device) -> torch.Tensor:
    """``(B, 1)`` first flat row of each batch element, for rows of ``n`` tokens."""
    return shape_constant(("batch offsets", batch, n, device), lambda: torch.arange(batch, device=device)[:, None] * n)


@dataclass(eq=False)
class MergePlan:
    """Which tokens are computed on, and where every token's result comes from.

    Attributes:
        kept: ``(B, M)`` token indices that survive, destinations first
            (``kept[:, :num_dst]``) then independent tokens.
        assign: ``(B, N)`` slot in ``[0, M)`` each token maps to; a kept token maps to itself.
        num_dst: how many of the kept tokens are destinations.
        prune: if True, ``merge`` drops non-kept tokens instead of averaging them in.
        merge_weight: ``(B * N, 1)`` weight of each token in its slot's weighted sum (ReToM's alpha), or None
            for the plain mean of the slot's members; ignored when pruning.
    """

    kept: torch.Tensor
    assign: torch.Tensor
    num_dst: int
    prune: bool = False
    merge_weight: torch.Tensor | None = None
    _flat_kept: torch.Tensor = field(init=False, repr=False)
    _flat_assign: torch.Tensor = field(init=False, repr=False)
    _slot_scale: torch.Tensor | None = field(init=False, repr=False, default=None)
    _cast: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        batch, n = self.assign.shape
        m = self.kept.shape[1]
        device = self.assign.device
        # Flattened (batch * tokens) row indices let merge/unmerge be one index op each.
        self._flat_kept = (self.kept + _batch_offsets(batch, n, device)).reshape(-1)
        self._flat_assign = (self.assign + _batch_offsets(batch, m, device)).reshape(-1)
        if not self.prune and self.merge_weight is None:
            # A plain mean: merge sums each slot's members and scales the M slot rows by 1 / members, which
            # touches N x C values once (weighting the N rows first was 1.2-3.8x slower on CPU).
            one = shape_constant(("one", device), lambda: torch.ones((), device=device, dtype=torch.float32))
            counts = torch.zeros(batch, m, device=device, dtype=torch.float32)
            counts.scatter_add_(1, self.assign, one.expand(batch, n))
            self._slot_scale = counts.reciprocal_().reshape(-1, 1)

    @property
    def batch_size(self) -> int:
        return self.assign.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.assign.shape[1]

    @property
    def num_kept(self) -> int:
        return self.kept.shape[1]

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C) -> (B, M, C)``: average each slot's members (or keep only the slot)."""
        self._check(x, self.num_tokens)
        b, n, c = x.shape
        rows = x.reshape(b * n, c)
        if self.prune:
            return rows.index_select(0, self._flat_kept).view(b, self.num_kept, c)
        out = x.new_zeros(b * self.num_kept, c)
        if self._slot_scale is not None:
            out.index_add_(0, self._flat_assign, rows)
            out.mul_(self._weights(x.dtype))
        else:
            out.index_add_(0, self._flat_assign, rows * self._weights(x.dtype))
        return out.view(b, self.num_kept, c)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, M, C) -> (B, N, C)``: every token takes the value of its slot."""
        self._check(y, self.num_kept)
        b, m, c = y.shape
        return y.reshape(b * m, c).index_select(0, self._flat_assign).view(b, self.num_tokens, c)

    def sizes(self, count_pruned: bool = True) -> torch.Tensor:
        """``(B, M)`` float32: how many tokens each kept slot stands for.

        A merging plan: the slot's members. A pruning plan: the kept token and the pruned tokens that copy its
        output (``count_pruned=True``), or 1 (``count_pruned=False``: the pruned tokens are gone).
        """
        key = ("sizes", count_pruned)
        if key not in self._cast:
            batch, n = self.assign.shape
            device = self.assign.device
            one = shape_constant(("one", device), lambda: torch.ones((), device=device, dtype=torch.float32))
            if self.prune and not count_pruned:
                sizes = one.expand(batch, self.num_kept)
            else:
                sizes = torch.zeros(batch, self.num_kept, device=device, dtype=torch.float32)
                sizes.scatter_add_(1, self.assign, one.expand(batch, n))
            self._cast[key] = sizes
        return self._cast[key]

    def log_sizes(self, dtype: torch.dtype, count_pruned: bool = True) -> torch.Tensor:
        """``(B, M)`` ``log(sizes)`` in ``dtype``: the size-aware key bias, built once per plan and dtype."""
        key = ("log sizes", dtype, count_pruned)
        if key not in self._cast:
            self._cast[key] = self.sizes(count_pruned).log().to(dtype)
        return self._cast[key]

    def merge_logits(self, logits: torch.Tensor, count_pruned: bool = True) -> torch.Tensor:
        """``(B, N) -> (B, M)``: ``log(sum(exp(logits)))`` over each slot's members (see :meth:`sizes`).

        A per-key additive attention bias over the ``N`` tokens becomes the bias of the ``M`` slots that gives
        a slot of identical members the weight its members had (all zeros give ``log(sizes)``).
        """
        self._check(logits[..., None], self.num_tokens)
        if self.prune and not count_pruned:
            return logits.gather(1, self.kept)
        b, n = logits.shape
        peak = logits.amax(dim=1, keepdim=True)
        peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))  # a row masked out entirely
        exp = (logits - peak).exp().reshape(-1)
        sums = exp.new_zeros(b * self.num_kept).index_add_(0, self._flat_assign, exp)
        return sums.view(b, self.num_kept).log() + peak

    def roles(self) -> torch.Tensor:
        """``(B, N)`` int8 map: MERGED (0), DESTINATION (1) or INDEPENDENT (2) per token."""
        roles = torch.full(self.assign.shape, MERGED, dtype=torch.int8, device=self.assign.device)
        role_of_kept = torch.full(self.kept.shape, INDEPENDENT, dtype=torch.int8, device=self.kept.device)
        role_of_kept[:, : self.num_dst] = DESTINATION
        return roles.scatter_(1, self.kept, role_of_kept)

    def _weights(self, dtype: torch.dtype) -> torch.Tensor:
        """The slot scale (plain mean) or the per-token weights in ``dtype``, cast once per plan (a plan serves
        attn1, attn2 and ff)."""
        if dtype not in self._cast:
            weights = self._slot_scale if self._slot_scale is not None else self.merge_weight
            self._cast[dtype] = weights.to(dtype)
        return self._cast[dtype]

    def _check(self, x: torch.Tensor, tokens: int) -> None:
        if x.ndim != 3 or x.shape[0] != self.batch_size or x.shape[1] != tokens:
            raise RuntimeError(
                f"tokenmerge: a merge plan for batch {self.batch_size} x {tokens} tokens got a tensor of "
                f"shape {tuple(x.shape)}. Something between the block and its attention/MLP changed the "
                "token layout (e.g. feed-forward chunking): disable it or merge only where the layout is kept."
            )


def plan_from_matching(
    dst: torch.Tensor, kept_src: torch.Tensor, src: torch.Tensor, nearest_dst: torch.Tensor, num_tokens: int,
    prune: bool = False,
) -> MergePlan:
    """Build a plan from a bipartite matching.

    Args:
        dst: ``(B, D)`` destination token indices.
        kept_src: ``(B, I)`` positions *within src* of the source tokens that stay independent.
        src: ``(B, S)`` source token indices (every token that is not a destination).
        nearest_dst: ``(B, S)`` position within ``dst`` of each source token's destination.
        num_tokens: N.
        prune: drop merged tokens instead of averaging them into their destination.
    """
    batch, num_dst = dst.shape
    num_ind = kept_src.shape[1]
    slots = arange_of(num_dst + num_ind, dst.device)
    # A source token maps to its destination's slot, unless it is kept as an independent token.
    src_slot = nearest_dst.scatter(1, kept_src, slots[num_dst:].expand(batch, -1))
    assign = torch.empty(batch, num_tokens, dtype=torch.long, device=dst.device)
    assign.scatter_(1, src, src_slot)
    assign.scatter_(1, dst, slots[:num_dst].expand(batch, -1))
    kept = torch.cat([dst, src.gather(1, kept_src)], dim=1)
    return MergePlan(kept=kept, assign=assign, num_dst=num_dst, prune=prune)


def cell_destinations(
    height: int, width: int, sy: int, sx: int, batch: int = 1,
    generator: torch.Generator | str | None = None, device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One destination per full ``sy x sx`` cell of the grid: ``(batch, cells)`` token indices, raster order.

    With a generator (see :func:`draw`) each cell's destination is drawn uniformly (as tomesd does); without one
    it is the cell's top-left token. Tokens in the partial cells at the right/bottom edge are never destinations.
    """
    cells_y, cells_x = height // sy, width // sx
    device = torch.device(device)

    def build() -> torch.Tensor:
        rows = torch.arange(cells_y, device=device)[:, None] * (sy * width)
        return (rows + torch.arange(cells_x, device=device) * sx).reshape(1, -1)

    corners = shape_constant(("cell corners", height, width, sy, sx, device), build)  # (1, cells), top-left tokens
    if generator is None:
        return corners.expand(batch, -1)
    # Drawn with the same shape and order as tomesd, so a fork of the same RNG state gives the same cells.
    offset = draw(torch.randint, sy * sx, (batch * cells_y, cells_x, 1), generator=generator, device=device)
    offset = offset.view(batch, -1)
    return token_in_cell(offset, height, width, sy, sx)


def token_in_cell(offset: torch.Tensor, height: int, width: int, sy: int, sx: int) -> torch.Tensor:
    """``(B, cells)`` position within each full ``sy x sx`` cell (row-major in the cell) -> token index."""
    return cell_destinations(height, width, sy, sx, device=offset.device) + offset // sx * width + offset % sx


def complement(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, K) -> (B, N - K)``: the tokens not in ``indices``, in raster order."""
    batch = indices.shape[0]
    member = torch.zeros(batch, num_tokens, dtype=torch.bool, device=indices.device)
    member.scatter_(1, indices, True)
    # Sorting the membership flag (stable) lists the non-members first, in their original order.
    order = torch.sort(member.to(torch.uint8), dim=1, stable=True).indices
    return order[:, : num_tokens - indices.shape[1]]


def gather_tokens(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``x[b, indices[b]]`` for ``x`` of shape ``(B, N, C)`` and ``indices`` of shape ``(B, K)``.

    Whole rows are copied (``index_select``): an element-wise ``gather`` with the index expanded over the
    channels was 5-10x slower on CPU.
    """
    batch, num_tokens, channels = x.shape
    if indices.shape[0] == batch and (batch == 1 or indices.stride(0) == 0):  # the same tokens in every element
        return x.index_select(1, indices[0])
    rows = (indices + _batch_offsets(indices.shape[0], num_tokens, x.device)).reshape(-1)
    return x.reshape(batch * num_tokens, channels).index_select(0, rows).view(*indices.shape, channels)


def nearest_destination(
    src: torch.Tensor, dst: torch.Tensor, max_elements: int = 1 << 26, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of every source token to its most similar destination.

    ``src (B, S, C)``, ``dst (B, D, C)`` -> ``(best similarity (B, S), best destination (B, S))``.
    The ``S x D`` score matrix is built in row chunks of at most ``max_elements`` entries so that
    memory stays bounded at high resolution; the result is the same as one full matrix.
    ``normalized=True``: the tokens already have unit norm (normalised once before splitting them).
    """
    if not normalized:
        # normalize clamps the norm, so an all-zero token has similarity 0, not NaN (which max() would pick).
        src = F.normalize(src, dim=-1)
        dst = F.normalize(dst, dim=-1)
    batch, num_src, _ = src.shape
    rows = max(1, max_elements // max(1, batch * dst.shape[1]))
    if rows >= num_src:
        return (src @ dst.transpose(-1, -2)).max(dim=-1)
    best, where = [], []
    for start in range(0, num_src, rows):
        value, index = (src[:, start : start + rows] @ dst.transpose(-1, -2)).max(dim=-1)
        best.append(value)
        where.append(index)
    return torch.cat(best, dim=1), torch.cat(where, dim=1)
