"""The mean merge of a MergePlan: sum each slot's members, then scale the M slot rows (``MergePlan.merge``), against
weighting the N token rows first and then summing (the formulation before, kept here as the reference).

    python benchmarks/mean_merge.py --repeats 30
    OMP_NUM_THREADS=1 python benchmarks/mean_merge.py --repeats 30
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tokenmerge import ToMe
from tokenmerge.methods.base import PlanContext


def weighted_rows_first(x: torch.Tensor, plan) -> torch.Tensor:
    """Each token's row times 1 / (its slot's members), then one index_add_ into the slots."""
    b, n, c = x.shape
    counts = torch.zeros(b, plan.num_kept).scatter_add_(1, plan.assign, torch.ones(b, n))
    weight = counts.gather(1, plan.assign).reciprocal().reshape(-1, 1)
    flat = (plan.assign + torch.arange(b)[:, None] * plan.num_kept).reshape(-1)

    def merge() -> torch.Tensor:
        out = x.new_zeros(b * plan.num_kept, c)
        return out.index_add_(0, flat, x.reshape(b * n, c) * weight).view(b, plan.num_kept, c)

    return merge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="64x320,128x320,32x640", help="grid side x channels, comma-separated")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(f"| tokens | channels | weighted rows, then sum (ms) | sum, then scale slots (ms) | speed-up |  "
          f"({torch.get_num_threads()} threads, batch 2, r = {args.ratio})")
    print("| --- | --- | --- | --- | --- |")
    for shape in args.shapes.split(","):
        side, channels = map(int, shape.split("x"))
        x = torch.randn(2, side * side, channels, generator=torch.Generator().manual_seed(0))
        plan = ToMe(ratio=args.ratio, use_rand=False).make_plan(x, PlanContext(grid=(side, side)))
        before = weighted_rows_first(x, plan)
        torch.testing.assert_close(before(), plan.merge(x))
        times: dict[str, list[float]] = {"before": [], "now": []}
        for _ in range(args.repeats):  # interleaved
            for name, merge in (("before", before), ("now", lambda: plan.merge(x))):
                start = time.perf_counter()
                merge()
                times[name].append(time.perf_counter() - start)
        old, new = (statistics.median(times[k]) * 1e3 for k in ("before", "now"))
        print(f"| {side * side} | {channels} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")


if __name__ == "__main__":
    main()
