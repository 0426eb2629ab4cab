"""The procedural data: deterministic, captions that name every attribute, held-out pairs kept apart."""

from __future__ import annotations

import numpy as np
import pytest

from tokenmerge.testbed.data import (
    ATTRIBUTES, HELDOUT_PAIRS, SPLIT_SEEDS, Scene, all_scenes, is_heldout, make_batch, render, sample_scenes,
)


def test_batches_are_deterministic_and_splits_differ():
    a_images, a_scenes = make_batch("train", 8, size=32)
    b_images, b_scenes = make_batch("train", 8, size=32)
    assert np.array_equal(a_images, b_images) and a_scenes == b_scenes
    c_images, _ = make_batch("val", 8, size=32)
    assert not np.array_equal(a_images, c_images)
    assert a_images.shape == (8, 32, 32, 3) and a_images.dtype == np.uint8


def test_heldout_pairs_never_appear_outside_the_heldout_split():
    for split in set(SPLIT_SEEDS) - {"judge"}:
        scenes = sample_scenes(split, 500)
        assert all(is_heldout(s) == (split == "heldout") for s in scenes)
    assert any(is_heldout(s) for s in sample_scenes("judge", 500))  # the judge must read every caption
    assert {(s.shape, s.color) for s in sample_scenes("heldout", 500)} == set(HELDOUT_PAIRS)


def test_caption_names_every_attribute():
    for scene in all_scenes()[::37]:
        caption = scene.caption
        for name, values in ATTRIBUTES.items():
            value = getattr(scene, name)
            if name == "texture" and value == "plain":
                assert not any(t in caption for t in values if t != "plain")
            else:
                assert value in caption, (name, caption)
            assert scene.labels()[name] == values.index(value)


def test_attributes_are_visible_in_the_pixels():
    base = dict(shape="square", color="red", size="large", texture="plain", position="top left",
                background="black")
    image = np.asarray(render(Scene(**base), 32)).astype(int)
    assert (np.abs(image[8, 8] - (220, 45, 45)) < 10).all()  # the object sits at the top left
    assert (np.abs(image[24, 24] - (15, 15, 15)) < 10).all()  # the background elsewhere
    small = np.asarray(render(Scene(**{**base, "size": "small"}), 32))
    assert (small != image).any(axis=-1).sum() > 20
    striped = np.asarray(render(Scene(**{**base, "texture": "striped"}), 64)).astype(int)
    assert striped[10:22, 10:22].std() > image[10:22, 10:22].std() + 10


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="unknown split"):
        sample_scenes("training", 1)
