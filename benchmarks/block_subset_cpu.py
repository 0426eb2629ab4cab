"""CPU time of a full-width denoiser cut to a subset of its blocks, unpatched and merged (interleaved rounds,
medians): for models whose full size does not fit this machine's memory (FLUX.1-dev: 12 B parameters).

The subset keeps the model's proportions (FLUX: 1 double-stream and 2 single-stream blocks, as 19 and 38), so its
speed-up is the blocks' speed-up; the full model adds only its embeddings and final layer, which merging does not
touch and which cost under 1% of a step.

    python benchmarks/block_subset_cpu.py --model flux1dev --size 1024 --rounds 3
    python benchmarks/block_subset_cpu.py --model wan21 --size 480x832 --rounds 3   (1 of 30 blocks, 81 frames)
    python benchmarks/block_subset_cpu.py --model sd35m --size 1024 --rounds 2 --full   (SD3.5M fits: every block)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import tokenmerge
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench
from tokenmerge.tools.options import one_size
from tokenmerge.tools.tiny import build_denoiser

SUBSETS = {"FluxTransformer2DModel": dict(num_layers=1, num_single_layers=2),
           "SD3Transformer2DModel": dict(num_layers=2, dual_attention_layers=(0,)),
           "WanTransformer3DModel": dict(num_layers=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux1dev")
    parser.add_argument("--size", type=one_size, default=1024, help="pixels, N or HxW")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="every block: the whole model, where memory allows")
    args = parser.parse_args()
    config = bench.model_config(args.model)
    subset = {} if args.full else SUBSETS[config["_class_name"]]
    config.update(subset)
    denoiser = build_denoiser(config, "cpu", torch.float32)
    inputs, kwargs = example_inputs(denoiser, args.size, 1, "cpu", torch.float32)
    importance = {}
    if config["_class_name"] == "WanTransformer3DModel":
        # WanPipeline's CFG comes as two calls, which one bare call does not make: a fixed map of the CFG map's
        # shape (one per frame) costs the plans what the CFG map does (the map itself is one subtraction a step).
        latent = inputs[0]
        importance = {"importance": torch.rand(latent.shape[2], *latent.shape[3:])}
    variants = {"unpatched": None, "tome": tokenmerge.ToMe(ratio=args.ratio, seed=0),
                "importance": tokenmerge.ImportanceMerge(ratio=args.ratio, seed=0, **importance)}
    times = {name: [] for name in variants}

    def step() -> None:
        with torch.no_grad():
            denoiser(*inputs, **kwargs)

    step()  # warm-up
    for _ in range(args.rounds):
        for name, config in variants.items():
            with tokenmerge.patched(denoiser, config) if config is not None else contextlib.nullcontext():
                step()  # the run's first step: ImportanceMerge's map comes from it
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["unpatched"])
    print(f"{args.model} {'in full' if args.full else f'subset {subset}'} at {bench.size_label(args.size)} px, CPU float32, ratio {args.ratio:g}, "
          f"{args.rounds} interleaved rounds, medians:")
    print("| variant | s per call | speed-up | rounds (s) |")
    print("| --- | --- | --- | --- |")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"| {name} | {median:.2f} | {base / median:.2f}x | {', '.join(f'{s:.2f}' for s in samples)} |")


if __name__ == "__main__":
    main()
