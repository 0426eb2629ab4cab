"""One block's token merging, tokenmerge's ToMe against the ``tomesd`` package at the same settings (random 2x2
cells, r = 0.5): the plan (tomesd: ``bipartite_soft_matching_random2d``), the merge and unmerge, and both.

    python benchmarks/tomesd_block.py --sides 32,64 --repeats 30

A whole step at 512 px holds five such blocks among much larger convolutions and linears, so a step's
difference between the two is a few tens of milliseconds, below a shared CPU's round-to-round noise; this
isolates it. Medians of interleaved runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tomesd.merge import bipartite_soft_matching_random2d

from tokenmerge import ToMe
from tokenmerge.methods.base import PlanContext


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", default="32,64", help="token grid sides (64: SD 1.5's top level at 512 px)")
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"| tokens | tomesd plan ms | ours plan ms | tomesd merge+unmerge ms | ours merge+unmerge ms | "
          f"tomesd all ms | ours all ms | ours faster |  ({torch.get_num_threads()} threads, batch 2, C = "
          f"{args.channels}, r = 0.5)")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    config = ToMe(ratio=0.5, min_tokens=0)
    for side in map(int, args.sides.split(",")):
        x = torch.randn(2, side * side, args.channels, generator=torch.Generator().manual_seed(0))

        def theirs_plan():
            return bipartite_soft_matching_random2d(x, side, side, 2, 2, int(side * side * 0.5), no_rand=False,
                                                    generator=torch.Generator().manual_seed(0))

        def ours_plan():
            return config.make_plan(x, PlanContext(grid=(side, side), generator=torch.Generator().manual_seed(0)))

        merge, unmerge = theirs_plan()
        plan = ours_plan()
        torch.testing.assert_close(plan.unmerge(plan.merge(x)), unmerge(merge(x)), atol=1e-5, rtol=0)
        calls = {
            "tomesd plan": theirs_plan, "ours plan": ours_plan,
            "tomesd merge": lambda: unmerge(merge(x)), "ours merge": lambda: plan.unmerge(plan.merge(x)),
            "tomesd all": lambda: (lambda m, u: u(m(x)))(*theirs_plan()),
            "ours all": lambda: (lambda p: p.unmerge(p.merge(x)))(ours_plan()),
        }
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):  # interleaved
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
        ms = {name: statistics.median(t) * 1e3 for name, t in times.items()}
        print(f"| {side * side} | {ms['tomesd plan']:.2f} | {ms['ours plan']:.2f} | {ms['tomesd merge']:.2f} | "
              f"{ms['ours merge']:.2f} | {ms['tomesd all']:.2f} | {ms['ours all']:.2f} | "
              f"{ms['tomesd all'] / ms['ours all']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
