"""``tokenmerge generate``: one image with a method (and without it), timed, with its merge maps.

    tokenmerge generate --model DIR --prompt "a cute owl" --method importance --ratio 0.7 --out OUT --compare

``generate`` runs a diffusers pipeline with a token-merging method (and, with ``--compare``, without it, from
the same seed), and writes the images, a side-by-side comparison, the importance and computation maps of the
merged level, and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from ..api import apply, find_denoiser, remove, skipped_blocks
from ..calibrate import AutoRatio, auto_ratio
from ..methods.base import MethodConfig
from ..state import is_signal
from . import viz
from .options import ATTENTION_MODES, METHODS, UNPATCHED, positive_int, ratio_or_auto, step_list
from .runtime import DTYPES, load_pipeline, resolve_device, synchronize


@dataclass
class Run:
    """One timed pipeline call and where its image went."""

    method: str
    ratio: float | None
    seconds: float
    image: Image.Image
    path: Path

    @property
    def label(self) -> str:
        if self.ratio is None:
            return f"unpatched {self.seconds:.2f} s"
        return f"{self.method} r={self.ratio:g} {self.seconds:.2f} s"


def default_map_steps(steps: int) -> tuple[int, ...]:
    """First, about a quarter, half way and last: enough to see the pruning phase and the merging change."""
    return tuple(sorted({0, steps // 4, steps // 2, steps - 1}))


def register(commands) -> argparse.ArgumentParser:
    """Add the ``generate`` subcommand to the CLI's subparsers."""
    generate = commands.add_parser(
        "generate", help="generate an image with token merging (and without it, with --compare)",
        description="Generate an image with a token-merging method; time it; draw its merge maps.",
    )
    generate.add_argument("--model", required=True,
                          help="pipeline folder (safetensors weights) or Hugging Face Hub id")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--negative-prompt")
    generate.add_argument("--method", choices=(UNPATCHED, "none", *METHODS), default="importance",
                          help="a token-merging method, or unpatched (also: none) for the model alone")
    generate.add_argument("--ratio", type=ratio_or_auto, default=0.7,
                          help="fraction of tokens merged away (default 0.7), or 'auto': the smallest ratio that "
                               "reaches --target-speedup here, from a short calibration (tokenmerge.auto_ratio)")
    generate.add_argument("--target-speedup", type=float,
                          help="with --ratio auto: the wanted speed-up of a denoiser step, e.g. 1.5")
    generate.add_argument("--attention", choices=tuple(ATTENTION_MODES),
                          help="how merged self-attention runs: plain = one key per merged slot (the papers'), "
                               "sized = size-aware keys, kv = K/V-only merging, -channel = the size bias as a q/k "
                               "channel (default: the method's own)")
    generate.add_argument("--steps", type=positive_int, default=50, help="denoising steps (default 50)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the latents and of the merging RNG")
    generate.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    generate.add_argument("--height", type=positive_int, help="image height (default: the model's)")
    generate.add_argument("--width", type=positive_int, help="image width (default: the model's)")
    generate.add_argument("--out", required=True, type=Path, help="folder for the images, maps and summary.json")
    generate.add_argument("--compare", action="store_true",
                          help="also generate unpatched from the same seed and write compare.png "
                               "(ignored with --method unpatched)")
    generate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    generate.add_argument("--dtype", choices=DTYPES, default="float32")
    generate.add_argument("--map-steps", type=step_list,
                          help="0-based steps to draw maps at, e.g. 1,5,10 (default: first, 25%%, 50%%, last)")
    generate.set_defaults(handler=run_generate, usage_error=generate.error)
    return generate


def run_generate(args: argparse.Namespace) -> None:
    if args.method == "none":
        args.method = UNPATCHED
    config_class = METHODS.get(args.method)
    auto = args.ratio == "auto"
    if auto != (args.target_speedup is not None):
        args.usage_error("--ratio auto and --target-speedup go together: e.g. --ratio auto --target-speedup 1.5")
    if auto and config_class is None:
        args.usage_error("--ratio auto needs a merging --method, not none")
    try:
        options = {} if auto else {"ratio": args.ratio}  # auto: the method's default until calibrated
        options.update(ATTENTION_MODES.get(args.attention, {}))
        config = config_class(seed=args.seed, **options) if config_class else None
    except ValueError as err:
        args.usage_error(str(err))
    if config is not None and is_signal(config.signal, "cfg") and args.guidance <= 1:
        args.usage_error(f"--method {args.method} reads token importance from classifier-free guidance, which "
                         f"--guidance {args.guidance:g} turns off; use a guidance scale above 1")
    map_steps = args.map_steps or default_map_steps(args.steps)
    if map_steps[-1] >= args.steps:
        args.usage_error(f"--map-steps {map_steps[-1]} is past the last step ({args.steps - 1}; steps are 0-based)")
    device = resolve_device(args.device, args.usage_error)

    pipe = load_pipeline(args.model, DTYPES[args.dtype]).to(device)
    call = pipeline_call(pipe, args, device)
    call(1)  # warm-up: one-time costs (first kernels, allocations) must not count against the first timed run
    calibration = None
    if auto:
        size = (args.height or default_size(pipe), args.width or default_size(pipe))
        try:
            calibration = auto_ratio(pipe, config, args.target_speedup, size=size)
        except ValueError as err:
            args.usage_error(str(err))
        print(calibration)
        config = calibration.config

    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    if args.compare and config is not None:
        runs.append(timed_run(call, args.steps, device, args.out, UNPATCHED, None))
    recorder = viz.MapRecorder(map_steps)
    if config is not None:
        try:
            apply(pipe, config, on_plan=recorder)
        except ValueError as err:  # e.g. a denoiser tokenmerge has no adapter for
            raise SystemExit(f"tokenmerge: {err}") from err
    runs.append(timed_run(call, args.steps, device, args.out, args.method,
                          config.ratio if config else None))
    skipped = skipped_blocks(pipe)
    remove(pipe)
    if skipped:
        print(f"tokenmerge: {len(skipped)} block(s) below {config.floor(device.type)} were not merged: "
              f"{', '.join(f'{name} ({n} tokens)' for name, n in skipped.items())}")

    written = [run.path for run in runs]
    if len(runs) > 1:
        written.append(args.out / "compare.png")
        viz.side_by_side([run.image for run in runs], [run.label for run in runs]).save(written[-1])
    if recorder.maps:
        written.append(viz.save_maps_figure(recorder.maps, args.out / f"maps_{args.method}.png"))
    written.append(write_summary(args, config, runs, recorder, skipped, calibration))
    print_report(runs, written)


def default_size(pipe) -> int:
    """The pipeline's default image side in pixels: the denoiser's sample size times the VAE's scale."""
    return find_denoiser(pipe)[0].config.sample_size * pipe.vae_scale_factor


def pipeline_call(pipe, args: argparse.Namespace, device: torch.device) -> Callable[[int], Image.Image]:
    """``steps -> image``: the pipeline call every run shares, from a freshly seeded generator each time."""
    options = dict(prompt=args.prompt, guidance_scale=args.guidance, height=args.height, width=args.width)
    if args.negative_prompt is not None:
        options["negative_prompt"] = args.negative_prompt

    def call(steps: int) -> Image.Image:
        generator = torch.Generator(device).manual_seed(args.seed)
        return pipe(num_inference_steps=steps, generator=generator, **options).images[0]

    return call


def timed_run(call: Callable[[int], Image.Image], steps: int, device: torch.device, out: Path, method: str,
              ratio: float | None) -> Run:
    """Time one pipeline call by wall clock (the device finishes its queue on both sides) and save its image."""
    synchronize(device)
    start = time.perf_counter()
    image = call(steps)
    synchronize(device)
    seconds = time.perf_counter() - start
    path = out / f"{method}.png"
    image.save(path)
    return Run(method, ratio, seconds, image, path)


def write_summary(args: argparse.Namespace, config: MethodConfig | None, runs: list[Run],
                  recorder: viz.MapRecorder, skipped: dict[str, int] | None = None,
                  calibration: AutoRatio | None = None) -> Path:
    """``summary.json``: the settings and, per run, method, ratio, seconds and image (relative to the folder)."""
    summary = {
        "model": args.model,
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "steps": args.steps,
        "seed": args.seed,
        "guidance": args.guidance,
        "config": repr(config),
        "map_block": recorder.block,
        "map_steps": sorted(recorder.maps),
        "skipped_blocks": skipped or {},  # blocks below the floor (min_tokens), left unmerged: name -> tokens
        "auto_ratio": None if calibration is None else {
            "target_speedup": calibration.target, "ratio": calibration.ratio, "reached": calibration.reached,
            "speedups": {f"{r:g}": s for r, s in calibration.speedups.items()},
        },
        "runs": [
            {"method": run.method, "ratio": run.ratio, "seconds": run.seconds, "image": run.path.name}
            for run in runs
        ],
    }
    path = args.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def print_report(runs: list[Run], written: list[Path]) -> None:
    table = Table(title="tokenmerge generate")
    table.add_column("run")
    table.add_column("ratio", justify="right")
    table.add_column("seconds", justify="right")
    unpatched = next((run.seconds for run in runs if run.ratio is None), None)
    compared = len(runs) > 1
    if compared:
        table.add_column("speed-up", justify="right")
    for run in runs:
        row = [run.method, "-" if run.ratio is None else f"{run.ratio:g}", f"{run.seconds:.2f}"]
        if compared:
            row.append(f"{unpatched / run.seconds:.2f}x")
        table.add_row(*row)
    console = Console()
    console.print(table)
    console.print("wrote " + ", ".join(str(path) for path in written))
