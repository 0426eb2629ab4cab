"""Time one SD 1.5 U-Net step (CFG batch) unpatched, with tomesd and with tokenmerge, interleaved.

Full-size SD 1.5 architecture with random weights (timing does not depend on weight values).
Until `tokenmerge bench` exists (its own issue), this is the measurement behind docs/benchmarks.md:

    python benchmarks/step_vs_tomesd.py --size 512 --ratio 0.5 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import tomesd
import torch
from diffusers import UNet2DConditionModel

import tokenmerge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).to(args.device, dtype).eval()  # SD 1.x layout
    latent = args.size // 8
    inputs = (torch.randn(2, 4, latent, latent, device=args.device, dtype=dtype), torch.tensor(500),
              torch.randn(2, 77, 768, device=args.device, dtype=dtype))

    def step() -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            unet(*inputs)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def unpatched():
        return step()

    def with_tomesd():
        tomesd.apply_patch(unet, ratio=args.ratio, use_rand=False)
        try:
            return step()
        finally:
            tomesd.remove_patch(unet)

    def with_tokenmerge(config):
        def run():
            with tokenmerge.patched(unet, config):
                return step()
        return run

    variants = {
        "unpatched": unpatched,
        "tomesd ToMe": with_tomesd,
        "tokenmerge ToMe": with_tokenmerge(tokenmerge.ToMe(ratio=args.ratio, use_rand=False)),
        "tokenmerge ImportanceMerge": with_tokenmerge(
            tokenmerge.ImportanceMerge(ratio=min(args.ratio, 0.75), importance=torch.rand(latent, latent),
                                       prune_steps=0.0, seed=0)),
    }
    for run in variants.values():  # warm-up
        run()
    times = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved
        for name, run in variants.items():
            times[name].append(run())
    base = statistics.median(times["unpatched"])
    print(f"SD 1.5 U-Net step, batch 2 (CFG), {args.size} px, ratio {args.ratio}, {args.device} {args.dtype}, "
          f"median of {args.repeats} interleaved runs")
    print("| variant | median s | min s | max s | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f} | {max(values):.3f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
