"""How a source token finds its destination: by feature similarity (cosine) or by distance on the grid.

``match="grid"`` is the importance paper's setting for PixArt (Appendix B: "using pixel location distance of
tokens yields better results than feature similarity"): each source goes to its nearest destination on the
token grid, and "most similar" means "closest". It needs no feature matmul at all.

``match_window=w`` (ToMe, ToFu) compares a source only with the destinations of the ``(2w+1) x (2w+1)`` cells
around its own (:func:`nearest_in_window`): ``O(N (2w+1)^2 C)`` instead of ToMe's ``O(N^2 C / 4)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plan import arange_of, cell_destinations, gather_tokens, nearest_destination, shape_constant

MATCHES = ("features", "grid")


def check_match(config: object) -> None:
    """Raise ``ValueError`` naming the field unless ``config.match`` is one of :data:`MATCHES`."""
    if config.match not in MATCHES:
        raise ValueError(
            f"{type(config).__name__}.match must be one of {MATCHES} (cosine similarity of the tokens, or their "
            f"distance on the token grid), got {config.match!r}"
        )


def check_match_window(config: object) -> None:
    """Raise ``ValueError`` naming the field unless ``config.match_window`` is None or an int >= 0."""
    value = config.match_window
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(
            f"{type(config).__name__}.match_window must be None (every destination) or an int >= 0 (destinations "
            f"whose cell is within that many cells in each direction), got {value!r}"
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
    x = F.normalize(x, dim=-1)  # once for sources and destinations (three kernels fewer than normalising each)
    return nearest_destination(gather_tokens(x, src), gather_tokens(x, dst), normalized=True)


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


def window_candidates(tokens: torch.Tensor, grid: tuple[int, int], sy: int, sx: int, window: int) -> torch.Tensor:
    """``(..., (2w+1)^2)`` positions within the cell destinations of the cells around each token's cell.

    The destinations are :func:`~tokenmerge.plan.cell_destinations`'s: one per full ``sy x sx`` cell, in raster
    order, so a destination's position *is* its cell's index and the candidates follow from the token's
    coordinates alone (no search). A token in a partial edge cell belongs to the last full cell. Neighbours
    beyond the border are clamped to the nearest valid cell (a repeated candidate, harmless for a maximum),
    which keeps the tensor fixed-size: no mask, no host sync.
    """
    height, width = grid
    cells_y, cells_x = height // sy, width // sx
    cell_y = (tokens // width // sy).clamp_max(cells_y - 1)
    cell_x = (tokens % width // sx).clamp_max(cells_x - 1)
    offsets = torch.arange(-window, window + 1, device=tokens.device)
    near_y = (cell_y[..., None, None] + offsets[:, None]).clamp_(0, cells_y - 1)
    near_x = (cell_x[..., None, None] + offsets[None, :]).clamp_(0, cells_x - 1)
    return (near_y * cells_x + near_x).flatten(-2)


def nearest_in_window(x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, grid: tuple[int, int], sy: int,
                      sx: int, window: int, match: str = "features",
                      max_elements: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`nearest` restricted to the destinations within ``window`` cells (each direction) of a source's cell.

    ``dst`` must be the cell destinations (one per full ``sy x sx`` cell, raster order). Costs
    ``O(N (2w+1)^2 C)``, never ``S x D``. Ties go to the lowest destination position, as ``max`` does in the
    global matching, so a window covering the whole cell grid finds the same destinations (up to float
    rounding of the dot products).
    """
    batch = x.shape[0]
    table = shape_constant(("window candidates", grid, sy, sx, window, src.device),
                           lambda: window_candidates(arange_of(grid[0] * grid[1], src.device), grid, sy, sx, window))
    candidates = table[src]  # (1 or B, S, K)
    if match == "grid":
        width = grid[1]
        dst_tokens = dst.gather(1, candidates.flatten(1)).view_as(candidates)
        dy = (src // width)[..., None] - dst_tokens // width
        dx = (src % width)[..., None] - dst_tokens % width
        similarity = (dy * dy + dx * dx).neg_().float()
    else:
        every = window_similarity(x, dst, grid, sy, sx, window, max_elements)  # (B, N, K)
        similarity = every.gather(1, src.expand(batch, -1)[..., None].expand(-1, -1, every.shape[-1]))
    best = similarity.max(dim=-1).values
    lowest = torch.where(similarity == best[..., None], candidates, dst.shape[1]).amin(dim=-1)
    return best.expand(batch, -1), lowest.expand(batch, -1)


def window_similarity(x: torch.Tensor, dst: torch.Tensor, grid: tuple[int, int], sy: int, sx: int, window: int,
                      max_elements: int = 1 << 26) -> torch.Tensor:
    """``(B, N, K)`` cosine similarity of every token to the ``K = (2w+1)^2`` candidates of its cell.

    The tokens of one cell share their candidates, so a full cell is one small matmul
    ``(sy*sx, C) @ (C, K)``: the candidates are gathered once per cell (not per token), in chunks of at most
    ``max_elements`` gathered values. The few tokens of the partial edge cells are gathered one by one.
    """
    batch, num_tokens, channels = x.shape
    height, width = grid
    cells_y, cells_x = height // sy, width // sx
    cells = cells_y * cells_x
    x = F.normalize(x, dim=-1)
    flat_dst = gather_tokens(x, dst.expand(batch, -1)).reshape(batch * cells, channels)
    rows, edge, edge_rows = shape_constant(("window rows", grid, sy, sx, window, batch, x.device),
                                           lambda: _window_rows(grid, sy, sx, window, batch, x.device))

    full = x.view(batch, height, width, channels)[:, : cells_y * sy, : cells_x * sx]
    full = full.reshape(batch, cells_y, sy, cells_x, sx, channels).permute(0, 1, 3, 2, 4, 5)
    full = full.reshape(batch * cells, sy * sx, channels)
    k = rows.shape[-1]
    step = max(1, max_elements // (k * channels))
    parts = [torch.bmm(full[i : i + step], flat_dst.index_select(0, rows[i : i + step].reshape(-1))
                       .view(-1, k, channels).transpose(1, 2)) for i in range(0, batch * cells, step)]
    similarity = x.new_empty(batch, height, width, k)
    similarity[:, : cells_y * sy, : cells_x * sx] = (
        torch.cat(parts).view(batch, cells_y, cells_x, sy, sx, k).permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, cells_y * sy, cells_x * sx, k))
    similarity = similarity.view(batch, num_tokens, k)

    if edge.numel():  # the few tokens of the partial edge cells
        edge_dst = flat_dst.index_select(0, edge_rows).view(batch * edge.numel(), k, channels)
        edge_x = x.index_select(1, edge).reshape(batch * edge.numel(), 1, channels)
        similarity[:, edge] = torch.bmm(edge_x, edge_dst.transpose(1, 2)).view(batch, -1, k)
    return similarity


def _window_rows(grid: tuple[int, int], sy: int, sx: int, window: int, batch: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The index tensors :func:`window_similarity` needs, from the grid's sizes alone (a boolean mask would sync
    with the host on CUDA): each full cell's candidate rows in the flat ``(B * cells)`` destinations
    ``(B * cells, K)``, the tokens of the partial edge cells ``(E,)`` and their candidate rows ``(B * E * K,)``."""
    height, width = grid
    cells_y, cells_x = height // sy, width // sx
    offsets = torch.arange(batch, device=device)[:, None, None] * (cells_y * cells_x)
    corner = cell_destinations(height, width, sy, sx, device=device)  # each full cell's top-left token
    rows = (window_candidates(corner, grid, sy, sx, window) + offsets).reshape(batch * cells_y * cells_x, -1)
    right = (torch.arange(cells_y * sy, device=device)[:, None] * width
             + torch.arange(cells_x * sx, width, device=device)[None, :]).reshape(-1)
    edge = torch.cat([right, torch.arange(cells_y * sy * width, height * width, device=device)])
    edge_rows = (window_candidates(edge[None], grid, sy, sx, window) + offsets).reshape(-1)
    return rows, edge, edge_rows


def window_covers(grid: tuple[int, int], sy: int, sx: int, window: int | None) -> bool:
    """Whether every source's window holds every cell (None = no window): the global matching is then the same."""
    return window is None or window >= max(grid[0] // sy, grid[1] // sx) - 1
