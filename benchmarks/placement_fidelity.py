"""Testbed-free fidelity by placement: the relative error of one merged denoiser step against the unmerged one, on
a family's architecture at its full block count but a narrow width (random weights, seeded), at a native token
grid. A proxy where no trained weights can be loaded: it says how far merging moves the output of a deep stack of
this family's blocks, not how an image changes; read it beside placement_flops.py.

    python benchmarks/placement_fidelity.py --model flux1dev --size 1024
    python benchmarks/placement_fidelity.py --model wan21 --size 240x416
"""

from __future__ import annotations

import argparse

import torch

import tokenmerge
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench
from tokenmerge.tools.options import one_size
from tokenmerge.tools.tiny import build_denoiser

from placement_flops import PLACEMENTS

#: The config fields that set a transformer's width, per class: (heads, head dim, text width, pooled width).
NARROW = {
    "FluxTransformer2DModel": dict(num_attention_heads=4, attention_head_dim=16, joint_attention_dim=64,
                                   pooled_projection_dim=64, axes_dims_rope=(4, 6, 6)),
    "SD3Transformer2DModel": dict(num_attention_heads=4, attention_head_dim=16, joint_attention_dim=64,
                                  caption_projection_dim=64, pooled_projection_dim=64),
    "WanTransformer3DModel": dict(num_attention_heads=4, attention_head_dim=16, text_dim=64, ffn_dim=384),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="flux1dev")
    parser.add_argument("--ratios", default="0.5,0.75")
    parser.add_argument("--size", type=one_size, default=512, help="pixels, N or HxW (the token grid of this size)")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    config = bench.model_config(args.model)
    config.update(NARROW[config["_class_name"]])
    ratios = [float(r) for r in args.ratios.split(",")]
    rows = {}
    for seed in range(args.seeds):
        denoiser = build_denoiser(config, torch.device("cpu"), torch.float32, seed=seed)
        inputs, kwargs = example_inputs(denoiser, args.size, 1, "cpu", torch.float32, seed=seed)
        if "encoder_hidden_states" in kwargs:  # a short prompt: the fidelity does not depend on the text length
            kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"][:, :32]
            if "txt_ids" in kwargs:
                kwargs["txt_ids"] = kwargs["txt_ids"][:32]
        with torch.no_grad():
            reference = denoiser(*inputs, **kwargs)[0]
            for layers in PLACEMENTS:
                for merge_mlp in (False, True):
                    for ratio in ratios:
                        merged_config = tokenmerge.ToMe(ratio=ratio, layers=layers, merge_mlp=merge_mlp, min_tokens=0,
                                                        seed=seed)
                        with tokenmerge.patched(denoiser, merged_config):
                            out = denoiser(*inputs, **kwargs)[0]
                        error = ((out - reference).norm() / reference.norm()).item()
                        rows.setdefault(layers, {}).setdefault((merge_mlp, ratio), []).append(error)
    print(f"{args.model} ({config['_class_name']}, full depth, width 64, random weights, {args.seeds} seeds) at "
          f"{bench.size_label(args.size)} px: relative error of one ToMe step, mean over seeds")
    header = [f"attention {r:g}" for r in ratios] + [f"+ merge_mlp {r:g}" for r in ratios]
    print("| layers | " + " | ".join(header) + " |")
    print("| --- |" + " --- |" * len(header))
    for layers, cells in rows.items():
        values = [sum(cells[(m, r)]) / len(cells[(m, r)]) for m in (False, True) for r in ratios]
        print(f"| {layers} | " + " | ".join(f"{v:.3f}" for v in values) + " |", flush=True)


if __name__ == "__main__":
    main()
