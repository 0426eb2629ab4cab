"""The training script runs end to end and writes a loadable float16 safetensors pipeline."""

from __future__ import annotations

import torch

from tokenmerge.testbed.pipeline import load_testbed
from tokenmerge.testbed.train import train


def test_a_few_training_steps_write_a_loadable_pipeline(tmp_path):
    out = tmp_path / "testbed"
    train(out, steps=3, batch=4, width=16, samples=32)
    assert list(out.glob("unet/*.safetensors")) and not list(out.rglob("*.bin"))
    pipe = load_testbed(out)
    assert pipe.unet.dtype == torch.float32  # stored in float16, loaded for CPU in float32
    images = pipe("a small red square at the top left on a white background", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3)


def test_init_continues_from_a_saved_pipeline_and_minutes_stop_early(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    train(first, steps=2, batch=2, width=16, samples=8)
    # lr 0: the weights cannot move, so the continued pipeline must be exactly the one it started from.
    train(second, steps=50, batch=2, width=16, samples=8, lr=0.0, init=first, minutes=0.0)
    printed = capsys.readouterr()
    assert "time budget of 0 min reached after 1 steps" in printed.out + printed.err
    started, continued = load_testbed(first), load_testbed(second)
    for name in ("unet", "text_encoder"):
        a, b = getattr(started, name).state_dict(), getattr(continued, name).state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)
