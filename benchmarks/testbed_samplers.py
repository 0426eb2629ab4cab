"""Judge accuracy of a testbed pipeline under a few samplers (same seeds, unpatched): which sampler to ship.

    python benchmarks/testbed_samplers.py MODEL_DIR [--count 500] [--save-best]

A sampler is part of the model, not of a merging method: the shipped pipeline keeps the best one here, and every
method is then evaluated with it.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

from tokenmerge.tools.evaluate.metrics import judge_correct
from tokenmerge.testbed.data import ATTRIBUTES, sample_scenes
from tokenmerge.testbed.judge import load_judge
from tokenmerge.testbed.pipeline import load_testbed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--split", default="heldout")
    parser.add_argument("--save-best", action="store_true", help="write the best scheduler into MODEL_DIR")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_testbed(args.model).to(device)
    judge = load_judge(32).to(device)
    scenes = sample_scenes(args.split, args.count)
    config = pipe.scheduler.config
    samplers = {
        "ddim clip": DDIMScheduler.from_config(config, clip_sample=True),
        "ddim": DDIMScheduler.from_config(config, clip_sample=False),
        "dpm++2m": DPMSolverMultistepScheduler.from_config(config),
    }
    best = None
    for name, scheduler in samplers.items():
        for guidance in (3.0, 5.0):
            pipe.scheduler = scheduler
            start = time.perf_counter()
            images = pipe([s.caption for s in scenes], num_inference_steps=20, guidance_scale=guidance,
                          generator=torch.Generator(device).manual_seed(0), output_type="pt").images
            right = judge_correct(judge, images, scenes)
            accuracy = right.all(1).float().mean().item()
            per = " ".join(f"{a} {v:.3f}" for a, v in zip(ATTRIBUTES, right.float().mean(0).tolist()))
            print(f"{name:8s} guidance {guidance:g}: all {accuracy:.3f} | {per} | {time.perf_counter() - start:.1f} s",
                  flush=True)
            if guidance == 3.0 and (best is None or accuracy > best[0]):
                best = (accuracy, name, scheduler)
    print(f"best at guidance 3: {best[1]} ({best[0]:.3f})")
    if args.save_best:
        best[2].save_pretrained(f"{args.model}/scheduler")


if __name__ == "__main__":
    main()
