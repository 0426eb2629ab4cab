"""Computation and importance maps, labelled panels, and the on_plan recorder behind the CLI's maps."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from tokenmerge import PlanEvent
from tokenmerge.tools import viz
from tokenmerge.plan import DESTINATION, INDEPENDENT, MERGED, MergePlan


def cell_colors(image: Image.Image, grid: tuple[int, int]) -> np.ndarray:
    """The colour at the centre of every token's square: ``(H, W, 3)``."""
    pixels = np.asarray(image)
    factor = image.width // grid[1]
    centres = np.arange(max(grid)) * factor + factor // 2
    return pixels[centres[: grid[0]]][:, centres[: grid[1]]]


def test_computation_map_colours_every_token_by_its_role():
    roles = torch.tensor([[MERGED, DESTINATION, INDEPENDENT, MERGED],
                          [DESTINATION, DESTINATION, MERGED, INDEPENDENT],
                          [INDEPENDENT, MERGED, MERGED, DESTINATION]], dtype=torch.int8)
    image = viz.computation_map(roles, size=64)
    assert image.mode == "RGB" and image.size == (4 * 16, 3 * 16)
    expected = np.array([viz.ROLE_COLORS[int(role)] for role in roles.flatten()]).reshape(3, 4, 3)
    assert np.array_equal(cell_colors(image, (3, 4)), expected)
    assert {tuple(c) for c in np.asarray(image).reshape(-1, 3)} == set(viz.ROLE_COLORS.values())


def magma(value: float) -> tuple[int, ...]:
    return tuple(round(channel * 255) for channel in matplotlib.colormaps["magma"](value)[:3])


def test_importance_map_spans_the_colormap_and_survives_a_constant_map():
    importance = torch.tensor([[0.0, 1.0], [3.0, 2.0]])
    image = viz.importance_map(importance, size=8)
    assert image.size == (8, 8)
    colors = cell_colors(image, (2, 2))
    assert tuple(colors[0, 0]) == magma(0.0) and tuple(colors[1, 0]) == magma(1.0)
    assert (np.asarray(viz.importance_map(torch.ones(3, 3))) == magma(0.0)).all()


def test_side_by_side_puts_every_image_in_one_row():
    images = [Image.new("RGB", (20, 30), "red"), Image.new("RGB", (40, 10), "blue")]
    panel = viz.side_by_side(images, ["a", "b"])
    assert panel.width == 20 + 40 + 3 * viz.PADDING and panel.height > 30
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        viz.side_by_side(images, ["a"])


def two_row_plan(prune: bool = False) -> MergePlan:
    """Batch of 2 over a 2x2 grid, keeping a different destination/independent pair in each row."""
    return MergePlan(kept=torch.tensor([[0, 1], [3, 2]]), assign=torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]]),
                     num_dst=1, prune=prune)


def event(step: int, block: str = "top", plan: MergePlan | None = None, importance=None, prune: bool = False):
    return PlanEvent(step, block, (2, 2), plan, importance, prune)


def test_recorder_keeps_the_first_block_at_the_chosen_steps_from_the_last_batch_row():
    recorder = viz.MapRecorder(steps=[1, 3])
    importance = torch.tensor([[4.0, 3.0, 2.0, 1.0], [9.0, 9.0, 9.0, 9.0]])
    for step in range(4):
        recorder(event(step, "top", two_row_plan(prune=step == 1), importance))
        recorder(event(step, "deeper", None))
    assert recorder.block == "top" and sorted(recorder.maps) == [1, 3]
    maps = recorder.maps[1]
    assert maps.roles.tolist() == [[MERGED, MERGED], [INDEPENDENT, DESTINATION]]
    assert maps.importance.tolist() == [[4.0, 3.0], [2.0, 1.0]] and maps.prunes
    assert not recorder.maps[3].prunes


def test_recorder_draws_an_unmerged_block_as_all_destinations(tmp_path):
    recorder = viz.MapRecorder(steps=[0])
    recorder(event(0, plan=None, importance=None))
    assert recorder.maps[0].roles.tolist() == [[DESTINATION] * 2] * 2 and recorder.maps[0].importance is None
    figure = Image.open(viz.save_maps_figure(recorder.maps, tmp_path / "maps.png"))
    colors = {tuple(c) for c in np.asarray(figure.convert("RGB")).reshape(-1, 3)}
    assert viz.NO_IMPORTANCE_GRAY in colors and figure.width == viz.MAP_SIZE + 2 * viz.PADDING
