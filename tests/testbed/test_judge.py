"""The shipped judge reads every attribute of real procedural images, held-out captions included."""

from __future__ import annotations

import pytest

from tokenmerge.testbed.data import make_batch
from tokenmerge.testbed.judge import FEATURE_DIM, correct, load_judge, to_tensor


@pytest.mark.parametrize("split", ["test", "heldout"])
def test_shipped_judge_is_at_least_98_percent_right_on_every_attribute(split):
    judge = load_judge(32)
    images, scenes = make_batch(split, 400, 32, seed_offset=99)  # images the judge never saw
    right = correct(judge, to_tensor(images), scenes)
    assert right.all(dim=1).float().mean() >= 0.98


def test_features_are_the_penultimate_layer():
    judge = load_judge(32)
    images, _ = make_batch("test", 4, 32)
    assert judge.features(to_tensor(images)).shape == (4, FEATURE_DIM)


def test_missing_weights_say_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenmerge.testbed.judge"):
        load_judge(path=tmp_path / "none.safetensors")
