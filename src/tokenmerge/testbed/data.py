"""Procedural captioned scenes, deterministic from a seed.

One object per scene on a plain background. The caption names every attribute in plain words:

    "a large red striped circle at the top left on a gray background"

Shape, colour, size, texture, position and background vary independently (5 x 6 x 2 x 3 x 5 x 3 = 2700
captions). Textures (stripes, dots) put fine detail where the object is: a method that merges the wrong
tokens loses it. A few (shape, colour) pairs never appear in the generator's training: the ``heldout`` split has
only them, to test that the model composes attributes instead of memorising captions. The ``judge`` split
draws from every caption: the judge is a measuring instrument and must read held-out pairs too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
COLORS = {
    "red": (220, 45, 45),
    "green": (45, 175, 70),
    "blue": (50, 90, 225),
    "yellow": (240, 215, 50),
    "purple": (150, 65, 195),
    "orange": (245, 140, 35),
}
SIZES = ("small", "large")
TEXTURES = ("plain", "striped", "dotted")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128), "white": (240, 240, 240)}
ATTRIBUTES = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "size": SIZES,
    "texture": TEXTURES,
    "position": POSITIONS,
    "background": tuple(BACKGROUNDS),
}
# (shape, colour) pairs kept out of train/val/test: the "heldout" split is made of them only.
HELDOUT_PAIRS = frozenset({("circle", "blue"), ("square", "yellow"), ("triangle", "purple"),
                           ("cross", "red"), ("diamond", "green")})
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2, "heldout": 3, "judge": 4}

SUPERSAMPLE = 4  # draw at 4x and downsample: smooth edges at 32 px
_POSITION_CENTERS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "bottom left": (0.27, 0.73),
                     "bottom right": (0.73, 0.73), "center": (0.5, 0.5)}
_SIZE_RADIUS = {"small": 0.13, "large": 0.22}  # half-extent, as a fraction of the image side


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    size: str
    texture: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"a {self.size} {self.color} {texture}{self.shape} at the {self.position} " \
               f"on a {self.background} background".replace("at the center", "in the center")

    def labels(self) -> dict[str, int]:
        """Index of each attribute's value (the judge's targets)."""
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}


def all_scenes() -> list[Scene]:
    return [Scene(*values) for values in itertools.product(*ATTRIBUTES.values())]


def is_heldout(scene: Scene) -> bool:
    return (scene.shape, scene.color) in HELDOUT_PAIRS


def sample_scenes(split: str, count: int, seed_offset: int = 0) -> list[Scene]:
    """``count`` scenes of a split, drawn uniformly from its captions, deterministic from the split's seed."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; choose one of {tuple(SPLIT_SEEDS)}")
    pool = all_scenes()
    if split != "judge":
        pool = [s for s in pool if is_heldout(s) == (split == "heldout")]
    rng = np.random.default_rng([SPLIT_SEEDS[split], seed_offset])
    return [pool[i] for i in rng.integers(len(pool), size=count)]


def object_mask(scene: Scene, size: int = 32) -> np.ndarray:
    """``(size, size)`` bool: the pixels the scene's object may cover, a square around its centre.

    The half-side is the shape's half-extent plus the largest jitter of :func:`render` (4% of the side); a pixel
    the square overlaps at all counts (the image is box-downsampled), so the object of any rendering of the
    caption lies inside; everything outside is background.
    """
    cx, cy = _POSITION_CENTERS[scene.position]
    half = _SIZE_RADIUS[scene.size] + 0.04 + 0.5 / size
    centers = (np.arange(size) + 0.5) / size
    inside_x = np.abs(centers - cx) <= half
    inside_y = np.abs(centers - cy) <= half
    return inside_y[:, None] & inside_x[None, :]


def render(scene: Scene, size: int = 32, jitter_seed: int | None = None) -> Image.Image:
    """Draw a scene as an RGB image of ``size`` x ``size`` pixels.

    ``jitter_seed`` moves the object by up to 4% of the side and the stripe/dot phase, so that one caption
    has many images; None draws the canonical image.
    """
    rng = np.random.default_rng(jitter_seed)
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    cx, cy = _POSITION_CENTERS[scene.position]
    if jitter_seed is not None:
        cx, cy = cx + rng.uniform(-0.04, 0.04), cy + rng.uniform(-0.04, 0.04)
    radius = _SIZE_RADIUS[scene.size] * big
    mask = Image.new("L", (big, big), 0)
    _draw_shape(ImageDraw.Draw(mask), scene.shape, cx * big, cy * big, radius)
    fill = Image.new("RGB", (big, big), COLORS[scene.color])
    image.paste(fill, mask=mask)
    if scene.texture != "plain":
        pattern = _texture_mask(scene.texture, big, phase=rng.uniform(0, 1) if jitter_seed is not None else 0.0)
        dark = tuple(int(c * 0.35) for c in COLORS[scene.color])
        image.paste(Image.new("RGB", (big, big), dark), mask=Image.fromarray(np.minimum(pattern, np.array(mask))))
    return image.resize((size, size), Image.Resampling.BOX)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x: float, y: float, r: float) -> None:
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    elif shape == "square":
        s = r * 0.88
        draw.rectangle((x - s, y - s, x + s, y + s), fill=255)
    elif shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=255)
    elif shape == "cross":
        t = r * 0.36
        draw.rectangle((x - r, y - t, x + r, y + t), fill=255)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=255)
    elif shape == "diamond":
        draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _texture_mask(texture: str, big: int, phase: float) -> np.ndarray:
    """uint8 mask (255 = dark texture) of diagonal stripes or a dot grid with a period of 1/8 of the side."""
    period = big / 8
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    if texture == "striped":
        on = ((xx + yy) / period + phase) % 1.0 < 0.5
    elif texture == "dotted":
        dx = ((xx / period + phase) % 1.0) - 0.5
        dy = ((yy / period + phase) % 1.0) - 0.5
        on = dx * dx + dy * dy < 0.22**2
    else:
        raise ValueError(f"unknown texture {texture!r}")
    return (on * 255).astype(np.uint8)


def make_batch(split: str, count: int, size: int = 32, seed_offset: int = 0, workers: int = 1
               ) -> tuple[np.ndarray, list[Scene]]:
    """``(count, size, size, 3)`` uint8 images and their scenes; image ``i`` jittered with its own seed.

    ``workers`` > 1 renders in that many processes (same images: each one depends on its own seed only).
    """
    scenes = sample_scenes(split, count, seed_offset)
    base = SPLIT_SEEDS[split] * 1_000_003 + seed_offset * 7919
    jobs = [(scene, size, base + i) for i, scene in enumerate(scenes)]
    if workers > 1 and count > 1:
        from multiprocessing import get_context

        with get_context("spawn").Pool(workers) as pool:
            images = pool.starmap(_render_array, jobs, chunksize=max(1, count // (4 * workers)))
    else:
        images = [_render_array(*job) for job in jobs]
    return np.stack(images), scenes


def _render_array(scene: Scene, size: int, jitter_seed: int) -> np.ndarray:
    return np.asarray(render(scene, size, jitter_seed=jitter_seed))
