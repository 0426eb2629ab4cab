"""The shipped testbed generator: it loads from the package's safetensors weights, is float16 and small enough to
ship, generates deterministically on CPU, and draws what its held-out captions say (judged by the shipped judge)."""

from __future__ import annotations

from pathlib import Path

import torch

from tokenmerge.tools.evaluate.metrics import judge_correct
from tokenmerge.testbed.data import sample_scenes
from tokenmerge.testbed.judge import load_judge
from tokenmerge.testbed.pipeline import WEIGHTS_DIR, load_testbed


def test_weights_are_float16_safetensors_within_25_mb():
    files = [path for path in Path(WEIGHTS_DIR).rglob("*") if path.is_file()]
    assert sum(path.stat().st_size for path in files) < 25 * 2**20
    assert not [path for path in files if path.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    pipe = load_testbed(dtype=torch.float16)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == torch.float16


def test_shipped_model_generates_deterministically_and_draws_held_out_captions():
    pipe = load_testbed()
    scenes = sample_scenes("heldout", 12)

    def generate(scenes, seed):
        return pipe([scene.caption for scene in scenes], num_inference_steps=20,
                    generator=torch.Generator().manual_seed(seed), output_type="pt").images

    images = generate(scenes, 0)
    right = judge_correct(load_judge(32), images, scenes).all(dim=1).float().mean().item()
    assert right >= 0.8, f"only {right:.0%} of held-out captions drawn right"
    torch.testing.assert_close(generate(scenes[:2], 0), images[:2], atol=1e-4, rtol=0)  # same seed, same images
    assert not torch.equal(generate(scenes[:2], 1), images[:2])
