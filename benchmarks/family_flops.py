"""FLOP bound of merging on every model family at its native size, counted on the meta device (no memory, no
weights: seconds, on any machine). Each method runs with the family's preset, as ``tokenmerge bench`` does.

    python benchmarks/family_flops.py --ratios 0.5,0.75
"""

from __future__ import annotations

import argparse

import torch

import tokenmerge
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench
from tokenmerge.tools.tiny import build_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sd21,sdxl,pixart,dit,lcm,animatediff,zero123pp,sd35m,flux1dev")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--methods", default="tome,importance")
    args = parser.parse_args()
    meta = torch.device("meta")
    print("| model | px | method | ratio | step GFLOPs | FLOP bound |")
    print("| --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        denoiser = build_denoiser(bench.model_config(model), meta, torch.float32)
        size = bench.MODELS[model].gpu_sizes[0]
        inputs, kwargs = example_inputs(denoiser, size, 1, meta, torch.float32)

        def step() -> None:
            with torch.no_grad():
                denoiser(*inputs, **kwargs)

        base = bench.count_flops(step)
        label = bench.size_label(size)
        print(f"| {model} | {label} | unpatched | - | {base / 1e9:.0f} | 1x |", flush=True)
        for ratio in map(float, args.ratios.split(",")):
            for method in args.methods.split(","):
                config = bench.method_config(method, ratio, bench.latent_size(size), meta, False, 0,
                                             family=bench.family(denoiser))
                with tokenmerge.patched(denoiser, config):
                    flops = bench.count_flops(step)
                print(f"| {model} | {label} | {method} | {ratio:g} | {flops / 1e9:.0f} | {base / flops:.2f}x |",
                      flush=True)


if __name__ == "__main__":
    main()
