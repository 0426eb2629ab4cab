"""FLOP bound of merging by placement on a transformer family (which blocks, with or without the MLP), counted on
the meta device at the model's native size: what a family preset is chosen from (docs/models.md).

    python benchmarks/placement_flops.py --model flux1dev --ratios 0.5,0.75
"""

from __future__ import annotations

import argparse

import torch

import tokenmerge
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench
from tokenmerge.tools.tiny import build_denoiser

PLACEMENTS = ((0.25, 0.75), (0.0, 1.0), (0.0, 0.5), (0.5, 1.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux1dev")
    parser.add_argument("--ratios", default="0.5,0.75")
    args = parser.parse_args()
    meta = torch.device("meta")
    denoiser = build_denoiser(bench.model_config(args.model), meta, torch.float32)
    size = bench.MODELS[args.model].gpu_sizes[0]
    inputs, kwargs = example_inputs(denoiser, size, 1, meta, torch.float32)

    def step() -> None:
        with torch.no_grad():
            denoiser(*inputs, **kwargs)

    base = bench.count_flops(step)
    ratios = [float(r) for r in args.ratios.split(",")]
    print(f"{args.model} at {bench.size_label(size)}: {base / 1e12:.2f} TFLOPs per step unpatched; ToMe, min_tokens=0")
    header = [f"attention {r:g}" for r in ratios] + [f"+ merge_mlp {r:g}" for r in ratios]
    print("| layers | " + " | ".join(header) + " |")
    print("| --- |" + " --- |" * len(header))
    for layers in PLACEMENTS:
        cells = []
        for merge_mlp in (False, True):
            for ratio in ratios:
                config = tokenmerge.ToMe(ratio=ratio, layers=layers, merge_mlp=merge_mlp, min_tokens=0)
                with tokenmerge.patched(denoiser, config):
                    cells.append(f"{base / bench.count_flops(step):.2f}x")
        print(f"| {layers} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
