"""Plan time of ToMe with the global matching against ``match_window`` (issue 6).

Times ``ToMe(ratio, use_rand=False, match_window=w).make_plan`` for ``N`` tokens of width ``C`` (SD 1.5's top
level: C = 320; batch 2 = one CFG pair) with ``w = None`` (every source against every destination, tomesd's
``O(N^2 C / 4)``) and window sizes ``w`` (``(2w+1)^2`` candidate cells, ``O(N (2w+1)^2 C)``), and how many of
the sources the window sends to another destination than the global matching. Only torch is needed.

    python benchmarks/match_window.py --device cpu --tokens 16384,65536 --windows 1,2
"""

from __future__ import annotations

import argparse

import torch

from tokenmerge import ToMe
from tokenmerge.methods.base import PlanContext

from merge_floor import seconds  # benchmarks/ is on sys.path when a script here runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--tokens", default="16384,65536")
    parser.add_argument("--windows", default="1,2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    print(f"device {device} {dtype}, C={args.channels}, batch {args.batch}, ratio {args.ratio:g}, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}")
    print("| N | match_window | plan ms | speed-up vs global | tokens mapped elsewhere than global |")
    print("| --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for n in map(int, args.tokens.split(",")):
            side = int(n ** 0.5)
            # Smooth-ish features (a low-resolution field upsampled, plus noise), so neighbours are similar.
            coarse = torch.randn(args.batch, args.channels, side // 8, side // 8,
                                 generator=torch.Generator().manual_seed(0))
            x = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bilinear")
            x = (x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1)))
            x = x.flatten(2).transpose(1, 2).contiguous().to(device, dtype)
            ctx = PlanContext(grid=(side, side))
            reference = None
            base = None
            for window in [None, *map(int, args.windows.split(","))]:
                config = ToMe(ratio=args.ratio, use_rand=False, match_window=window)
                plan = config.make_plan(x, ctx)
                took = seconds(lambda: config.make_plan(x, ctx), device, args.repeats)
                if reference is None:
                    reference, base = plan, took
                # The token each token's result comes from; differs where the window changed the matching.
                changed = (plan.kept.gather(1, plan.assign) != reference.kept.gather(1, reference.assign)
                           ).float().mean().item()
                print(f"| {side * side} | {window} | {took * 1e3:.1f} | {base / took:.1f}x | {changed:.1%} |",
                      flush=True)


if __name__ == "__main__":
    main()
