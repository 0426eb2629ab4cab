"""SiTo: similarity-based token pruning (Zhang, Tang, Ning, Zhang, AAAI 2025), Sec. "Method".

For a block input ``x`` of ``N`` tokens on an ``H x W`` grid, per batch element:

1. ``SimScore_i = sum_j cos(x_i, x_j)`` (Eq. 3);
2. ``Noisy SimScore = SimScore + eps``, ``eps ~ N(0, sigma^2)`` per token (Eq. 4);
3. base tokens: the token of highest noisy SimScore in every full ``s x s`` patch (Eq. 5);
4. pruned tokens: the ``K = int(N * ratio)`` non-base tokens with the highest maximum cosine
   similarity to a base token (Eq. 6);
5. the other ``N - K`` tokens are computed on, and every pruned token gets a copy of the output of its
   most similar base token ("Pruned Token Recovery").

No ``N x N`` matrix is built, although the paper describes one (``CosSim``, ``B x N x N``):

* SimScore uses ``sum_j x^_i . x^_j = x^_i . (sum_j x^_j)`` with unit vectors ``x^``: one ``O(N C)`` pass;
* Eq. 6 is a best match of the ``N - N/s^2`` non-base tokens against the ``N/s^2`` base tokens, built by
  :func:`~tokenmerge.plan.nearest_destination` in chunks of at most ``MATCH_MAX_ELEMENTS`` scores.

So the extra memory is ``O(B N C)`` plus one chunk, whatever the resolution.

Choices the paper leaves open (they follow the authors' code, github.com/EvelynZhang-epiclab/SiTo,
``sito.apply_patch`` defaults):

* ``sigma``: the paper gives none; the code uses ``sim_beta * SimScore + noise_alpha * randn`` with
  ``sim_beta = 1``, ``noise_alpha = 0.1``, i.e. ``sigma = 0.1`` in SimScore units. SimScore sums ``N``
  cosines, so its spread grows with ``N`` and a fixed ``sigma`` randomises less at higher resolution;
  ``sigma_relative=True`` measures ``sigma`` in units of each image's SimScore standard deviation instead.
  We compute SimScore in float32; the reference computes it in float16, where scores of a few hundred and
  above are rounded to steps of 0.25-1 and a noise of 0.1 is partly rounded away.
* ``patch``: 2 (``sx = sy = 2``; Table 3 and Fig. 5b; larger patches cost FID for little speed).
* placement: the highest-resolution attention level only (Sec. "Implementation": "only to the first and
  the last self-attention layers"; the code's ``max_downsample_ratio = 1``; Fig. 7), self-attention only
  (Table 2; cross-attention and MLP are optional).
* ``ratio``: 0.5, the code's default (the paper reports 0.5-0.7).
* plans are per batch element (the code's CFG alignment is commented out), like ToMe.
* tokens in the partial patches at the right/bottom edge of an odd grid are never base tokens (as in the
  code and in ToMeSD); they can be pruned.

Where we differ from the code, on purpose: a pruned token is recovered from its most similar *base* token,
as the paper's Method section states; the code copies from the most similar *unpruned* token (base or not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..plan import (MergePlan, cell_destinations, complement, draw, gather_tokens, nearest_destination,
                    plan_from_matching, token_in_cell)
from .base import MethodConfig, PlanContext

#: The base-token strategies of the paper's Table 3, by name, with their roman numeral.
BASE_STRATEGIES = {
    "topleft": "I",  # the top-left token of every s x s patch
    "random_global": "II",  # (H//s)(W//s) tokens (25% for s = 2) drawn uniformly from the whole grid
    "simscore_global": "III",  # the (H//s)(W//s) tokens of highest SimScore in the whole grid
    "random_patch": "IV",  # one token drawn uniformly in every s x s patch
    "simscore_patch": "V",  # the token of highest SimScore in every s x s patch
    "noisy_simscore_patch": "VI",  # the token of highest SimScore + N(0, sigma^2) in every patch (SiTo)
}
_BY_NUMERAL = {numeral: name for name, numeral in BASE_STRATEGIES.items()}

#: Most scores one chunk of the base-token matching (Eq. 6) holds: 2^26 float32 = 256 MiB.
MATCH_MAX_ELEMENTS = 1 << 26


def sim_score(x: torch.Tensor) -> torch.Tensor:
    """Eq. 3: ``(B, N, C) -> (B, N)`` float32, the sum of each token's cosine similarity to all tokens.

    Equal to ``cos_matrix.sum(-1)`` (self-similarity included) without building the ``N x N`` matrix:
    ``sum_j x^_i . x^_j = x^_i . sum_j x^_j``. Memory ``O(B N C)``. An all-zero token scores 0.
    """
    unit = F.normalize(x.float(), dim=-1)
    total = unit.sum(dim=1, keepdim=True)  # (B, 1, C)
    return (unit @ total.transpose(1, 2)).squeeze(-1)


def patch_argmax(score: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Eq. 5: ``(B, H*W) -> (B, cells)``: the token of highest score in every full ``patch x patch`` cell.

    Cells are listed in raster order, as :func:`~tokenmerge.plan.cell_destinations` lists them; the tokens
    of partial cells at the right/bottom edge are never chosen.
    """
    batch = score.shape[0]
    cells_y, cells_x = height // patch, width // patch
    grid = score.reshape(batch, height, width)[:, : cells_y * patch, : cells_x * patch]
    cells = grid.reshape(batch, cells_y, patch, cells_x, patch).transpose(2, 3).reshape(batch, cells_y, cells_x, -1)
    return token_in_cell(cells.argmax(dim=-1).reshape(batch, -1), height, width, patch, patch)


@dataclass(frozen=True, kw_only=True)
class SiTo(MethodConfig):
    """Similarity-based token pruning (SiTo).

    Args:
        ratio: fraction of a block's tokens pruned, in ``[0, 1 - 1/patch^2]`` (0.75 for 2x2): at most
            every non-base token.
        patch: ``s``: one base token per ``s x s`` patch (2 in the paper), in ``[2, 8]``. The global
            strategies II and III pick as many base tokens as there are patches.
        sigma: standard deviation of the Gaussian noise added to SimScore (Eq. 4); 0.1 as in the authors'
            code. Used by strategy VI only; 0 makes VI equal to V.
        sigma_relative: False: ``sigma`` is in SimScore units (the authors' code). True: in units of each
            image's SimScore standard deviation over its tokens, so the randomness does not fade as ``N``
            (hence SimScore's spread) grows with the resolution.
        base: base-token strategy of Table 3, by name or roman numeral: ``"topleft"`` (I),
            ``"random_global"`` (II), ``"simscore_global"`` (III), ``"random_patch"`` (IV),
            ``"simscore_patch"`` (V), ``"noisy_simscore_patch"`` (VI, SiTo's default).

    The placement and the other shared fields are :class:`MethodConfig`'s; their defaults are the paper's
    (self-attention of the highest-resolution level only; Table 2: pruning around cross-attention or the MLP costs
    FID for no speed).
    """

    name = "sito"

    patch: int = 2
    sigma: float = 0.1
    sigma_relative: bool = False
    base: str = "noisy_simscore_patch"

    def check_fields(self) -> None:
        if isinstance(self.patch, bool) or not isinstance(self.patch, int) or not 2 <= self.patch <= 8:
            raise ValueError(
                f"SiTo.patch must be an int in [2, 8] (one base token per patch x patch cell), got {self.patch!r}"
            )
        sigma = self.sigma
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not 0.0 <= sigma < math.inf:
            raise ValueError(f"SiTo.sigma must be a finite number >= 0 (the noise's standard deviation), got {sigma!r}")
        if not isinstance(self.sigma_relative, bool):
            raise ValueError(f"SiTo.sigma_relative must be a bool, got {self.sigma_relative!r}")
        if self.base not in BASE_STRATEGIES and self.base not in _BY_NUMERAL:
            choices = ", ".join(f"{name!r} ({numeral})" for name, numeral in BASE_STRATEGIES.items())
            raise ValueError(f"SiTo.base must be one of {choices} or the numeral, got {self.base!r}")

    @property
    def strategy(self) -> str:
        """The base-token strategy's name (``base`` may be given as a roman numeral)."""
        return _BY_NUMERAL.get(self.base, self.base)

    def max_ratio(self) -> float:
        return 1.0 - 1.0 / (self.patch * self.patch)

    @property
    def always_prunes(self) -> bool:
        return True

    @property
    def uses_rng(self) -> bool:
        strategy = self.strategy
        return strategy.startswith("random") or (strategy == "noisy_simscore_patch" and self.sigma > 0)

    @property
    def uses_clock(self) -> bool:
        return self.uses_rng  # a new run reseeds the generator; nothing else depends on the step

    def base_tokens(self, x: torch.Tensor, ctx: PlanContext) -> torch.Tensor:
        """``(B, D)`` base-token indices, ``D = (H // s) * (W // s)``, for the configured strategy."""
        batch, num_tokens, _ = x.shape
        height, width = ctx.grid
        s = self.patch
        strategy = self.strategy
        if strategy == "topleft":
            return cell_destinations(height, width, s, s, device=x.device).expand(batch, -1)
        if strategy == "random_patch":
            return cell_destinations(height, width, s, s, batch=batch, generator=ctx.generator, device=x.device)
        num_base = (height // s) * (width // s)
        if strategy == "random_global":
            order = draw(torch.rand, batch, num_tokens, generator=ctx.generator, device=x.device)
            return order.topk(num_base, dim=1).indices.sort(dim=1).values
        score = sim_score(x)
        if strategy == "simscore_global":
            return score.topk(num_base, dim=1).indices.sort(dim=1).values
        if strategy == "noisy_simscore_patch" and self.sigma > 0:
            noise = draw(torch.randn, batch, num_tokens, generator=ctx.generator, device=x.device)
            scale = self.sigma * score.std(dim=1, keepdim=True) if self.sigma_relative else self.sigma
            score = score + scale * noise
        return patch_argmax(score, height, width, s)

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:
        _, num_tokens, _ = x.shape
        height, width = ctx.grid
        pruned = int(num_tokens * self.ratio)
        if pruned <= 0 or height < self.patch or width < self.patch:
            return None
        base = self.base_tokens(x, ctx)
        others = complement(base, num_tokens)
        # Eq. 6: every non-base token's best base token; the K most similar are pruned and copy it back.
        similarity, nearest = nearest_destination(gather_tokens(x, others), gather_tokens(x, base),
                                                  max_elements=MATCH_MAX_ELEMENTS)
        order = similarity.argsort(dim=-1, descending=True)
        return plan_from_matching(base, order[:, pruned:], others, nearest, num_tokens, prune=True)
