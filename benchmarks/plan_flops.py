"""FLOPs of one full-size SD 1.5 U-Net step (CFG batch), per method and share_plan mode, on the meta device.

No memory and no weights are needed (the meta device only propagates shapes), so 2048 px takes seconds.
The plans' share of the step is ``(block FLOPs - level FLOPs) / (1 - 1/blocks)``: the similarity matmuls a
level-shared plan does not repeat (SD 1.5's top level runs 5 transformer blocks).

    python benchmarks/plan_flops.py --sizes 512,1024,2048 --ratios 0.5,0.75
    python benchmarks/plan_flops.py --sizes 2048 --match-windows 1,2   # adds ToMe rows with match_window
"""

from __future__ import annotations

import argparse

import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench
from tokenmerge.tools.tiny import build_denoiser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="sd15")
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--blocks", type=int, default=5, help="transformer blocks at the patched level")
    parser.add_argument("--match-windows", default="", help="also ToMe with these match_window values, e.g. 1,2")
    args = parser.parse_args()
    meta = torch.device("meta")
    unet = build_denoiser(bench.model_config(args.model), meta, torch.float32)
    print("| px | method | ratio | step GFLOPs, plan per block | step GFLOPs, plan per level | FLOP bound (block) | "
          "FLOP bound (level) | plans' share of the step's FLOPs (block / level) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in map(int, args.sizes.split(",")):
        inputs, kwargs = example_inputs(unet, size, 1, meta, torch.float32)

        def step() -> None:
            with torch.no_grad():
                unet(*inputs, **kwargs)

        base = bench.count_flops(step)
        importance = torch.rand(size // 8, size // 8)
        for ratio in map(float, args.ratios.split(",")):
            methods = [("ToMe", lambda **kw: ToMe(ratio=ratio, use_rand=False, **kw)),
                       ("ImportanceMerge", lambda **kw: ImportanceMerge(
                           ratio=ratio, importance=importance, prune_steps=0.0, **kw))]
            methods += [(f"ToMe match_window={w}", lambda w=w, **kw: ToMe(
                ratio=ratio, use_rand=False, match_window=w, **kw))
                for w in map(int, filter(None, args.match_windows.split(",")))]
            for name, make in methods:
                flops = {}
                for share in ("block", "level"):
                    with tokenmerge.patched(unet, make(share_plan=share)):
                        flops[share] = bench.count_flops(step)
                per_plan = (flops["block"] - flops["level"]) / (args.blocks - 1)
                print(f"| {size} | {name} | {ratio:g} | {flops['block'] / 1e9:.0f} | {flops['level'] / 1e9:.0f} | "
                      f"{base / flops['block']:.3f}x | {base / flops['level']:.3f}x | "
                      f"{args.blocks * per_plan / flops['block']:.1%} / {per_plan / flops['level']:.1%} |", flush=True)
        print(f"| {size} | unpatched | - | {base / 1e9:.0f} | | 1x | 1x | |")


if __name__ == "__main__":
    main()
