"""``tokenmerge demo``: the main job on the embedded testbed, offline, in a minute or two on a small CPU.

Generates a handful of held-out captions unpatched, with ToMe and with importance merging at a high ratio (same
seeds), prints the table of ``tokenmerge eval`` (time, speed-up, PSNR/SSIM to unpatched, judge accuracy), and
writes ``demo.png``: the images of every method above the importance and computation maps of importance merging.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image

from ..api import patched
from ..methods import ImportanceMerge, ToMe
from . import viz
from .options import at_least
from .runtime import resolve_device

DEMO_SEED = 0


def run_demo(args: argparse.Namespace) -> Path:
    from ..testbed.data import sample_scenes
    from ..testbed.pipeline import load_testbed
    from .evaluate import EvalError, PromptSet, evaluate

    if not 0 < args.ratio <= 0.75:
        args.usage_error(f"--ratio must be in (0, 0.75] (both methods' range), got {args.ratio:g}")
    device = resolve_device(args.device, args.usage_error)
    pipe = load_testbed(args.model).to(device)
    scenes = sample_scenes("heldout", args.prompts)
    prompts = PromptSet([scene.caption for scene in scenes], scenes, source="testbed heldout split")
    # min_tokens=0: the demo shows merging on any device; on a GPU the automatic floor would skip the testbed's
    # small blocks at this batch size (too little work for merging to pay there), and the table would say so.
    methods = [ToMe(ratio=args.ratio, seed=DEMO_SEED, min_tokens=0),
               ImportanceMerge(ratio=args.ratio, seed=DEMO_SEED, min_tokens=0)]
    try:
        evaluate(pipe, methods=methods, prompts=prompts, steps=args.steps, batch=args.prompts, out=args.out,
                 device=str(device), grid_prompts=args.prompts, progress=False)
    except EvalError as err:
        args.usage_error(str(err))

    # The maps of importance merging on the first prompt, at the first step, the first merging step and the last.
    first_merge = max(1, int(methods[1].prune_steps * args.steps))
    recorder = viz.MapRecorder({0, first_merge, args.steps // 2, args.steps - 1})
    with patched(pipe, methods[1], on_plan=recorder):
        pipe(prompts.prompts[:1], num_inference_steps=args.steps, generator=torch.Generator(device).manual_seed(0))
    maps = viz.save_maps_figure(recorder.maps, args.out / "maps_importance.png")
    path = args.out / "demo.png"
    stack_vertically([Image.open(args.out / "grid.png"), Image.open(maps)]).save(path)
    print(f"wrote {path} (images of every method, then importance and computation maps of importance merging "
          f"on prompt 0: {prompts.prompts[0]!r})")
    return path


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    width = max(image.width for image in images)
    canvas = Image.new("RGB", (width, sum(image.height for image in images)), "white")
    top = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (0, top))
        top += image.height
    return canvas


def register(commands) -> argparse.ArgumentParser:
    demo = commands.add_parser("demo", help="the main job: merging on the embedded testbed, compared and judged",
                               description=__doc__.splitlines()[0])
    demo.add_argument("--out", type=Path, default=Path("outputs/demo"), help="folder for demo.png and the tables")
    demo.add_argument("--ratio", type=float, default=0.75, help="merge ratio of both methods (default 0.75)")
    demo.add_argument("--prompts", type=at_least(1), default=8, help="held-out captions generated (default 8)")
    demo.add_argument("--steps", type=at_least(2), default=20, help="denoising steps (default 20)")
    demo.add_argument("--model", type=Path, default=None, help="a saved testbed folder (default: the shipped one)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.set_defaults(handler=run_demo, usage_error=demo.error)
    return demo
