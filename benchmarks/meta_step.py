"""Peak memory, FLOPs and kernels of one denoiser step, unpatched vs tomesd vs tokenmerge, on the meta device (no
weights in memory, no GPU: seconds on any machine). Peak = the bytes of the tensors alive at once, weights excluded.

    python benchmarks/meta_step.py --models sd15 --sizes 1024,2048 --ratios 0.5,0.75
    python benchmarks/meta_step.py --models sdxl --sizes 2048 --ratios 0.5,0.75 --max-downsample 2 \
        --share-plan level --methods "tome,tome[merge_mlp]"

On the meta device ``scaled_dot_product_attention`` would take its math path and hold the N x N scores; a GPU
runs flash attention, which holds none. Here it is modelled as that fused kernel: the output (and a ``(B, H, N)``
log-sum-exp) and nothing else. Everything else (the similarity matrices of the plans included) is counted as
eager PyTorch allocates it (a storage counts from the op that makes it until its last reference dies), without
the caching allocator's rounding and fragmentation. Kernels: the aten ops other than views, the attention one
kernel (benchmarks/plan_cost.py's count): on a GPU, where small steps are bound by launches, the count is what
their time follows.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from plan_cost import CountOps
from torch.overrides import TorchFunctionMode

import tokenmerge
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench
from tokenmerge.tools.options import size_list
from tokenmerge.tools.tiny import build_denoiser


class FusedAttention(TorchFunctionMode):
    """SDPA as flash attention allocates: its output and a float32 log-sum-exp, no score matrix."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, value = args[0], args[2] if len(args) > 2 else kwargs["value"]
            out = query.new_empty(*query.shape[:-1], value.shape[-1])
            lse = query.new_empty(query.shape[:-1], dtype=torch.float32)  # alive beside the output, then dropped
            del lse
            return out
        return func(*args, **kwargs)


def measure(step) -> tuple[float, int, int]:
    """Peak MiB of the tensors made during one call of ``step`` (not the weights nor the inputs), its FLOPs and
    its kernels."""
    with FusedAttention(), bench.LiveBytes() as live, CountOps() as kernels:
        step()
    return live.peak / 2**20, bench.count_flops(step), kernels.kernels  # FLOPs of the real attention (math path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15")
    parser.add_argument("--sizes", default="1024,2048")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--methods", default="tomesd,tome,tome[merge_mlp],importance,importance[merge_mlp]")
    parser.add_argument("--max-downsample", type=int, default=None, help="as tokenmerge bench's option")
    parser.add_argument("--share-plan", default="block", help="as tokenmerge bench's option (one value)")
    args = parser.parse_args()
    meta, dtype = torch.device("meta"), torch.float16
    print("| model | px | method | ratio | peak MiB (weights excluded) | vs unpatched | GFLOPs | FLOP bound "
          "| kernels |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        denoiser = build_denoiser(bench.model_config(model), meta, dtype)
        for size in size_list(args.sizes):
            inputs, kwargs = example_inputs(denoiser, size, 1, meta, dtype)

            def step() -> None:
                with torch.no_grad():
                    denoiser(*inputs, **kwargs)

            label = bench.size_label(size)
            base, base_flops, kernels = measure(step)
            print(f"| {model} | {label} | unpatched | - | {base:.0f} | 1.00x | {base_flops / 1e9:.0f} | 1.00x | "
                  f"{kernels} |", flush=True)
            for ratio in map(float, args.ratios.split(",")):
                for spec in args.methods.split(","):
                    method, _, options = spec.partition("[")
                    if method == "tomesd":
                        patch = bench.tomesd_patched(denoiser, ratio, use_rand=False)
                    else:
                        fields = {"max_downsample": args.max_downsample, "min_tokens": 0}
                        fields.update({name: True for name in options.rstrip("]").split(";") if name})
                        config = bench.method_config(method, ratio, bench.latent_size(size), meta, False, 0,
                                                     args.share_plan, fields, bench.family(denoiser))
                        patch = tokenmerge.patched(denoiser, config)
                    with patch:
                        peak, flops, kernels = measure(step)
                    print(f"| {model} | {label} | {spec} | {ratio:g} | {peak:.0f} | {peak / base:.2f}x | "
                          f"{flops / 1e9:.0f} | {base_flops / flops:.2f}x | {kernels} |", flush=True)


if __name__ == "__main__":
    main()
