"""The ``tokenmerge bench`` command line: its options, the device-dependent defaults, ``main``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ...methods.base import SHARE_PLAN
from ..options import ATTENTION_MODES, at_least, name_list, parse_names, ratio_list, size_list
from ..caches import CacheSpec, parse_cache
from ..reports import write_csv
from ..runtime import DTYPES, resolve_device
from .report import CSV_FIELDS, bench_table, command_line, write_plot
from .run import run_bench
from .variants import METHODS
from .zoo import MODELS, TINY_SIZE, size_label

CPU_DEFAULTS = dict(models=("sd15",), ratios=(0.5,), methods=("unpatched", "tomesd", "tome", "importance"),
                    repeats=3, warmup=1)

GPU_DEFAULTS = dict(models=tuple(MODELS), ratios=(0.3, 0.5, 0.7, 0.75),
                    methods=("unpatched", "tomesd", "tome", "importance"), repeats=10, warmup=3)


def complete_args(args: argparse.Namespace, usage_error: Callable[[str], None]) -> argparse.Namespace:
    """Fill the device-dependent defaults (CPU: a small set; GPU: the full one) and parse the name lists."""
    args.device = resolve_device(args.device, usage_error)
    gpu = args.device.type == "cuda"
    if args.dtype == "auto":
        args.dtype = "float16" if gpu else "float32"
    args.dtype_name, args.dtype = args.dtype, DTYPES[args.dtype]
    defaults = GPU_DEFAULTS if gpu else CPU_DEFAULTS
    try:
        args.models = parse_names(args.models, MODELS, "model") if args.models else defaults["models"]
        args.methods = parse_names(args.methods, METHODS, "method") if args.methods else defaults["methods"]
    except ValueError as err:
        usage_error(str(err))
    for name in ("ratios", "repeats", "warmup"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.compile:  # the copies share diffusers' code: the first round compiles, the second settles the shapes
        args.warmup = max(args.warmup, 2)
        import torch._dynamo as dynamo

        backends = dynamo.list_backends(exclude_tags=())
        if args.compile_backend not in backends:
            usage_error(f"--compile-backend {args.compile_backend!r} is not a torch.compile backend; use one of "
                        f"{', '.join(backends)} (inductor for speed)")
    elif args.compile_backend != "inductor":
        usage_error("--compile-backend is only used with --compile MODE (e.g. --compile default)")
    if args.cache is not None and (args.steps < 2 or args.compile):
        usage_error("--cache times a run of steps: give --steps 2 or more (e.g. --steps 10), without --compile")
    return args


def cache_spec(text: str) -> CacheSpec:
    """``--cache``: a cache with a fixed schedule (an adaptive one's skips depend on the trained weights' outputs,
    which bench's random weights do not have)."""
    try:
        spec = parse_cache(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if spec.name != "deepcache":
        raise argparse.ArgumentTypeError(
            f"bench times random weights, so it stacks only caches with a fixed schedule (deepcache); measure "
            f"{spec.name} on a trained model with tokenmerge eval --cache {text}")
    return spec


def register(commands) -> argparse.ArgumentParser:
    """Add the ``bench`` subcommand to the CLI's subparsers."""
    bench = commands.add_parser(
        "bench", help="time one denoiser step per model, method, ratio and resolution (FLOPs, memory, tomesd)",
        description="Time one denoiser step (CFG batch) of full-size architectures with random weights, unpatched, "
                    "with tomesd and with tokenmerge methods; write a markdown table, a CSV and a plot. "
                    "Defaults: on CPU a small set (sd15 at 512 px, ratio 0.5, 3 repeats), on GPU the full one.",
    )
    bench.add_argument("--models", help=f"comma-separated, from {','.join(MODELS)} (CPU default: sd15; GPU: all)")
    bench.add_argument("--sizes", type=size_list,
                       help="image sizes in pixels, e.g. 512,1024 (default: the model's native size on CPU; on GPU "
                            + "; ".join(f"{k} {','.join(map(size_label, s.gpu_sizes))}" for k, s in MODELS.items())
                            + f"; {TINY_SIZE} with --tiny)")
    bench.add_argument("--ratios", type=ratio_list, help="merge ratios (CPU default 0.5; GPU 0.3,0.5,0.7,0.75)")
    bench.add_argument("--methods", help=f"comma-separated, from {','.join(METHODS)} (default: "
                                         f"{','.join(CPU_DEFAULTS['methods'])}; unpatched always runs as the baseline)")
    bench.add_argument("--max-downsample", type=int, choices=(1, 2, 4, 8), default=None,
                       help="tokenmerge methods merge this many attention levels (max_downsample field; default: "
                            "each method's, 1 = the highest-resolution attention level)")
    bench.add_argument("--min-tokens", type=at_least(0), default=None,
                       help="tokenmerge methods' min_tokens field: merge only blocks with at least this many tokens "
                            "(0: every block; default: the automatic floor of the device, docs/methods.md)")
    bench.add_argument("--match-window", type=at_least(0), default=None,
                       help="ToMe/ToFu match_window field: match each source within this many cells of its own "
                            "(O(N) plans; default: every destination, tomesd's matching)")
    bench.add_argument("--plan-every", type=at_least(1), default=None,
                       help="tokenmerge methods' plan_every field: build plans every this many steps and reuse them "
                            "in between (default: each method's, 1); time it with --steps")
    bench.add_argument("--merge-mlp", action="store_true", default=None,
                       help="tokenmerge methods' merge_mlp field: merge around the feed-forward too (the step's peak "
                            "memory is there; default: each method's, off)")
    bench.add_argument("--steps", type=at_least(1), default=1,
                       help="denoiser calls per timed sample, in one patched run (its step clock advances, so "
                            "plan_every reuses plans); times, FLOPs and plan time are reported per call (default 1)")
    bench.add_argument("--cache", type=cache_spec, metavar="SPEC",
                       help="stack a caching accelerator with a fixed schedule: deepcache[:interval=3,branch=0] "
                            "(U-Nets): every variant is timed again with it (named METHOD+CACHE, the cache alone "
                            "CACHE) over a run of --steps timesteps from 999 down (needs --steps >= 2)")
    bench.add_argument("--compile", choices=("default", "reduce-overhead", "max-autotune"), default=None,
                       help="time torch.compile'd denoisers (this mode), unpatched and patched alike: each variant "
                            "is a patched copy compiled once in the warm-up (default: eager)")
    bench.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    bench.add_argument("--share-plan", type=name_list(SHARE_PLAN, "share_plan mode"), default=("block",),
                       help="plan per block and/or per U-Net level (share_plan field), e.g. block,level: each "
                            "tokenmerge method runs once per mode; level variants are named METHOD+level "
                            "(default: block)")
    bench.add_argument("--attention", type=name_list(ATTENTION_MODES, "attention mode"), default=("default",),
                       help=f"self-attention modes, from {','.join(ATTENTION_MODES)}: default = the method's own, "
                            "plain = one key per merged slot (the papers'), sized = size-aware keys "
                            "(proportional_attention), kv = K/V-only merging (merge_queries=False), -channel = the "
                            "bias as a q/k channel (bias_via); each tokenmerge method runs once per mode, named "
                            "METHOD/MODE (default: default, named METHOD)")
    bench.add_argument("--repeats", type=at_least(1), help="interleaved timed rounds (CPU default 3; GPU 10)")
    bench.add_argument("--warmup", type=at_least(0), help="untimed rounds first (CPU default 1; GPU 3)")
    bench.add_argument("--images", type=at_least(1), default=1,
                       help="images (videos) per step; the batch is 2 x images (CFG), images for lcm")
    bench.add_argument("--use-rand", action=argparse.BooleanOptionalAction, default=True,
                       help="random destination per 2x2 cell for tomesd and ToMe (default: on, as tomesd)")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    bench.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="auto: float16 on CUDA, float32 on CPU")
    bench.add_argument("--seed", type=int, default=0, help="seed of the weights, inputs and merging RNGs")
    bench.add_argument("--out", type=Path, default=Path("outputs/bench"), help="folder for bench.md/.csv/.png")
    bench.add_argument("--tiny", action="store_true", help="tiny configs (tokenmerge.tools.tiny) instead of full size")
    bench.set_defaults(handler=run_command, usage_error=bench.error)
    return bench


def run_command(args: argparse.Namespace) -> list[dict]:
    complete_args(args, args.usage_error)
    rows = run_bench(args)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
                else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)")
    batch = f"batch {2 * args.images} (CFG)" + (f"; lcm: {args.images} (no CFG)" if "lcm" in args.models else "")
    title = (f"One denoiser step, {batch}, {machine} {args.dtype_name}, "
             f"{args.warmup} warm-up + {args.repeats} interleaved rounds, torch {torch.__version__}"
             f"{', tiny configs' if args.tiny else ''}\n\n")
    table = bench_table(rows)
    print(title + table)
    (args.out / "bench.md").write_text(f"{title}```\n{command_line(args)}\n```\n\n{table}")
    written = [args.out / "bench.md", write_csv(rows, args.out / "bench.csv", CSV_FIELDS), write_plot(rows, args.out / "bench.png")]
    print("wrote " + ", ".join(map(str, written)))
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m tokenmerge.tools.bench ...``: the same as ``tokenmerge bench ...``."""
    parser = argparse.ArgumentParser(prog="tokenmerge")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    return args.handler(args)


if __name__ == "__main__":
    main()
