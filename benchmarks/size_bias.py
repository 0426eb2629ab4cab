"""What size-aware keys and K/V-only merging cost in one self-attention: each mode against plain merging.

Times diffusers' ``Attention`` (SD 1.5's top level: 320 channels, 8 heads, batch 2 = one CFG pair) called through
tokenmerge's own block hooks (``hooks.BlockPatch``) with a fixed ToMe plan, for ``N`` tokens: 4096, 16384 and 65536
are SD 1.5's top level at 512, 1024 and 2048 px. Reports the unmerged attention and, per mode, the merged call
(merge, attention, unmerge; the plan is built once outside the timer, as it is the same in every mode).

    python benchmarks/size_bias.py --tokens 4096,16384,65536 --ratios 0.5,0.75 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers.models.attention_processor import Attention

from tokenmerge import ToMe
from tokenmerge.hooks import BlockPatch
from tokenmerge.methods.base import PlanContext
from tokenmerge.models.base import PatchTarget
from tokenmerge.state import PatchState
from tokenmerge.tools.options import ATTENTION_MODES


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def merged_call(attn: Attention, config: ToMe, plan):
    """``attn`` hooked exactly as a patched block's ``attn1``, with ``plan`` in place."""
    patch = BlockPatch(PatchState(config, adapter=None, pipeline=None), PatchTarget("attn1", torch.nn.Module(), 0))
    patch.install([attn])
    patch.plan = plan
    return patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4096,16384,65536")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--modes", default=",".join(mode for mode in ATTENTION_MODES if mode != "default"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    attn = Attention(320, heads=8, dim_head=40).eval()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (median), float32")
    print("| tokens | px | ratio | mode | seconds | vs unmerged | vs plain merging |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for tokens in map(int, args.tokens.split(",")):
        side = int(tokens ** 0.5)
        x = torch.randn(2, tokens, 320)
        with torch.no_grad():
            unmerged = timed(lambda: attn(x), args.repeats)
            print(f"| {tokens} | {side * 8} | - | unmerged | {unmerged:.4f} | 1.00x | |")
            for ratio in map(float, args.ratios.split(",")):
                plan = ToMe(ratio=ratio).make_plan(x, PlanContext(grid=(side, side), generator=torch.Generator()))
                plain = None
                for mode in args.modes.split(","):
                    config = ToMe(ratio=ratio, **ATTENTION_MODES[mode])
                    patch = merged_call(attn, config, plan)
                    try:
                        seconds = timed(lambda: attn(x), args.repeats)
                    finally:
                        for handle in patch.state.handles:
                            handle.remove()
                    plain = seconds if mode == "plain" else plain
                    versus = f"{plain / seconds:.2f}x" if plain else ""
                    print(f"| {tokens} | {side * 8} | {ratio:g} | {mode} | {seconds:.4f} | {unmerged / seconds:.2f}x "
                          f"| {versus} |", flush=True)


if __name__ == "__main__":
    main()
