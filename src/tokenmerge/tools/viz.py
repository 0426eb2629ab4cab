"""Pictures of what a merging method did: computation maps, importance maps, labelled panels.

A computation map colours each token of a block's grid by its role in the plan, as in the paper's
Fig. 1/4: destinations white, independent tokens orange, merged (or pruned) tokens black.
:class:`MapRecorder` is an ``on_plan`` callback for :func:`tokenmerge.apply` that keeps these maps for
the highest-resolution patched block at a few steps; :func:`save_maps_figure` draws them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..plan import DESTINATION, INDEPENDENT, MERGED
from ..state import PlanEvent

ROLE_COLORS = {DESTINATION: (255, 255, 255), INDEPENDENT: (255, 165, 0), MERGED: (0, 0, 0)}
MAP_SIZE = 256  # maps are scaled up by a whole factor to at most this many pixels, so small grids stay visible
NO_IMPORTANCE_GRAY = (128, 128, 128)
PADDING = 6
BACKGROUND = (255, 255, 255)


def _upscale(pixels: np.ndarray, size: int) -> Image.Image:
    """Nearest-neighbour upscaling by a whole factor, so every token stays a crisp square."""
    factor = max(1, size // max(pixels.shape[:2]))
    return Image.fromarray(pixels.repeat(factor, axis=0).repeat(factor, axis=1))


def computation_map(roles: torch.Tensor, size: int = MAP_SIZE) -> Image.Image:
    """RGB picture of a ``(H, W)`` roles map (:meth:`MergePlan.roles`), one square per token."""
    roles = roles.detach().cpu().numpy()
    palette = np.zeros((max(ROLE_COLORS) + 1, 3), dtype=np.uint8)
    for role, color in ROLE_COLORS.items():
        palette[role] = color
    return _upscale(palette[roles], size)


def importance_map(importance: torch.Tensor, size: int = MAP_SIZE, cmap: str = "magma") -> Image.Image:
    """RGB picture of a ``(H, W)`` importance map, min-max normalized (a constant map is drawn as 0)."""
    values = importance.detach().float().cpu().numpy()
    spread = values.max() - values.min()
    normalized = (values - values.min()) / spread if spread > 0 else np.zeros_like(values)
    rgb = matplotlib.colormaps[cmap](normalized)[..., :3]
    return _upscale((rgb * 255).round().astype(np.uint8), size)


def _stack(images: Sequence[Image.Image]) -> Image.Image:
    """Images one above the other, left-aligned."""
    width = max(image.width for image in images)
    height = sum(image.height for image in images) + PADDING * (len(images) - 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    top = 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height + PADDING
    return canvas


def side_by_side(images: Sequence[Image.Image], labels: Sequence[str]) -> Image.Image:
    """Images in a row, each with its label written above it."""
    if len(images) != len(labels):
        raise ValueError(f"side_by_side got {len(images)} images but {len(labels)} labels")
    font = ImageFont.load_default()
    label_height = font.getbbox("Ag")[3] + PADDING
    width = sum(image.width for image in images) + PADDING * (len(images) + 1)
    height = max(image.height for image in images) + label_height + 2 * PADDING
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    left = PADDING
    for image, label in zip(images, labels):
        draw.text((left, PADDING), label, fill=(0, 0, 0), font=font)
        canvas.paste(image.convert("RGB"), (left, PADDING + label_height))
        left += image.width + PADDING
    return canvas


@dataclass
class StepMaps:
    """The maps of one block at one denoising step; tensors stay on the device until drawn."""

    roles: torch.Tensor  # (H, W) int8
    importance: torch.Tensor | None  # (H, W), None when no importance was known (first step, ToMe)
    prunes: bool  # the plan drops tokens (and copies them back) instead of averaging them


class MapRecorder:
    """``on_plan`` callback keeping the maps of the first patched block (the highest resolution) at ``steps``.

    The roles are those of the last batch row: the conditional image when the batch is a CFG pair of one
    image. Events at other steps or blocks return at once, and nothing is copied to the CPU during the
    run (that would synchronize the device inside the timed pipeline call).
    """

    def __init__(self, steps: Iterable[int]) -> None:
        self.steps = frozenset(steps)
        self.block: str | None = None
        self.maps: dict[int, StepMaps] = {}

    def __call__(self, event: PlanEvent) -> None:
        if self.block is None:
            self.block = event.block
        if event.block != self.block or event.step not in self.steps:
            return
        if event.plan is None:
            roles = torch.full(event.grid, DESTINATION, dtype=torch.int8)
        else:
            roles = event.plan.roles()[event.plan.batch_size - 1].reshape(event.grid)
        importance = None if event.importance is None else event.importance[0].reshape(event.grid).clone()
        prunes = event.plan is not None and event.plan.prune
        self.maps[event.step] = StepMaps(roles, importance, prunes)


def save_maps_figure(maps: dict[int, StepMaps], path: str | Path) -> Path:
    """One column per recorded step: importance map above computation map, captioned "step k (merge)".

    A step without importance (the first one, or ToMe) shows a gray square in its place.
    """
    columns, captions = [], []
    for step, recorded in sorted(maps.items()):
        computation = computation_map(recorded.roles)
        if recorded.importance is None:
            importance = Image.new("RGB", computation.size, NO_IMPORTANCE_GRAY)
        else:
            importance = importance_map(recorded.importance)
        columns.append(_stack([importance, computation]))
        captions.append(f"step {step} ({'prune' if recorded.prunes else 'merge'})")
    path = Path(path)
    side_by_side(columns, captions).save(path)
    return path
