"""How a source token finds its destination: by feature similarity (cosine) or by distance on the grid.

``match="grid"`` is the importance paper's setting for PixArt (Appendix B: "using pixel location distance of
tokens yields better results than feature similarity"): each source goes to its nearest destination on the
token grid, and "most similar" means "closest". It needs no feature matmul at all.
"""

from __future__ import annotations

import torch

from ..plan import gather_tokens, nearest_destination

MATCHES = ("features", "grid")


def check_match(config: object) -> None:
    """Raise ``ValueError`` naming the field unless ``config.match`` is one of :data:`MATCHES`."""
    if config.match not in MATCHES:
        raise ValueError(
            f"{type(config).__name__}.match must be one of {MATCHES} (cosine similarity of the tokens, or their "
            f"distance on the token grid), got {config.match!r}"
        )


def nearest(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, grid: tuple[int, int],
            match: str = "features") -> tuple[torch.Tensor, torch.Tensor]:
    """``(similarity (B, S), nearest destination (B, S))`` of the source tokens ``src`` among ``dst``.

    ``src``/``dst`` are token indices ``(B, S)``/``(B, D)`` (``B`` may be 1 and broadcast over ``x``'s batch).
    With ``match="grid"`` the similarity is the negative squared grid distance.
    """
    if match == "grid":
        similarity, where = nearest_on_grid(src, dst, grid[1])
        batch = x.shape[0]
        return similarity.expand(batch, -1), where.expand(batch, -1)
    if src.shape[0] != x.shape[0]:
        src, dst = src.expand(x.shape[0], -1), dst.expand(x.shape[0], -1)
    return nearest_destination(gather_tokens(x, src), gather_tokens(x, dst))


def nearest_on_grid(src: torch.Tensor, dst: torch.Tensor, width: int,
                    max_elements: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest destination on a raster grid of ``width`` columns: ``(-squared distance, position in dst)``.

    Built in row chunks of at most ``max_elements`` distances, like :func:`~tokenmerge.plan.nearest_destination`.
    """
    def coords(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (indices // width).float(), (indices % width).float()

    src_y, src_x = coords(src)
    dst_y, dst_x = coords(dst)
    batch, num_src = src.shape
    rows = max(1, max_elements // max(1, batch * dst.shape[1]))
    best, where = [], []
    for start in range(0, num_src, rows):
        sy, sx = src_y[:, start : start + rows, None], src_x[:, start : start + rows, None]
        distance = (sy - dst_y[:, None, :]).square_() + (sx - dst_x[:, None, :]).square_()
        value, index = distance.min(dim=-1)
        best.append(value.neg_())
        where.append(index)
    return torch.cat(best, dim=1), torch.cat(where, dim=1)
