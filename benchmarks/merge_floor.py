"""Where does merging one self-attention pay? The measurement behind ``min_tokens``'s default.

Times, for ``N`` tokens of width ``C`` (SD 1.5's top level: C = 320, 8 heads; batch 2 = one CFG pair):

* ``attn``: the self-attention sublayer as diffusers runs it (q/k/v projections, SDPA, output projection);
* ``plan``: ``ToMe(use_rand=False).make_plan`` (the similarity matching);
* ``merged``: ``unmerge(attn(merge(x)))`` with that plan.

Speed-up per block = attn / (plan + merged); with ``share_plan="level"`` the plan is paid once for the
level's ``--blocks`` blocks: attn / (plan / blocks + merged). Only torch is needed (no diffusers).

    python benchmarks/merge_floor.py --device cpu --tokens 64,256,1024,4096 --ratios 0.5
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from plan_cost import seconds as one_call_seconds

from tokenmerge import ToMe
from tokenmerge.methods.base import PlanContext


class SelfAttention(torch.nn.Module):
    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(channels, channels, bias=False) for _ in range(3))
        self.to_out = torch.nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


def seconds(fn, device: torch.device, repeats: int) -> float:
    """Median of ``repeats`` calls after a warm-up call, each from a synchronised device to its end."""
    return statistics.median([one_call_seconds(fn, device) for _ in range(repeats + 1)][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    parser.add_argument("--tokens", default="64,256,1024,2304,4096,16384")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=5, help="blocks sharing a plan per level (SD 1.5 top: 5)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    attn = SelfAttention(args.channels, args.heads).to(device, dtype).eval()
    print(f"device {device} {dtype}, C={args.channels}, heads={args.heads}, batch 2, torch threads "
          f"{torch.get_num_threads()}, median of {args.repeats}")
    print("| N | ratio | attn ms | plan ms | merged ms | speed-up per block | speed-up, plan per level |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    with torch.no_grad():
        for n in map(int, args.tokens.split(",")):
            side = int(n ** 0.5)
            x = torch.randn(2, side * side, args.channels, device=device, dtype=dtype)
            base = seconds(lambda: attn(x), device, args.repeats)
            for ratio in map(float, args.ratios.split(",")):
                config = ToMe(ratio=ratio, use_rand=False)
                ctx = PlanContext(grid=(side, side))
                plan = config.make_plan(x, ctx)
                plan_s = seconds(lambda: config.make_plan(x, ctx), device, args.repeats)
                merged = seconds(lambda: plan.unmerge(attn(plan.merge(x))), device, args.repeats)
                print(f"| {side * side} | {ratio:g} | {base * 1e3:.3f} | {plan_s * 1e3:.3f} | {merged * 1e3:.3f} | "
                      f"{base / (plan_s + merged):.2f}x | {base / (plan_s / args.blocks + merged):.2f}x |", flush=True)


if __name__ == "__main__":
    main()
