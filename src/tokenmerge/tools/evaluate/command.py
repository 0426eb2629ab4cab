"""The ``tokenmerge eval`` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from ...testbed.data import SPLIT_SEEDS
from ..options import number_list, positive_int
from ..runtime import DTYPES
from .prompts import DEFAULT_COUNT, DEFAULT_SPLIT
from .report import EvalResult
from .run import evaluate
from .variants import DEFAULT_METHODS, KNOWN_METHODS, EvalError


def register(commands) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to ``tokenmerge``'s subparsers."""
    parser = commands.add_parser(
        "eval", help="measure the quality and speed-up of merging methods against the unpatched model",
        description="Generate with every method x ratio and unpatched from the same seeds; write fidelity, "
                    "judge metrics (testbed), CLIP score and FID (real models, local weights), timings, a plot "
                    "and an image grid. See docs/quality.md.",
    )
    parser.add_argument("--model", help="pipeline folder (safetensors weights; a saved testbed too) or Hub id in "
                                        "the local cache; default: the shipped testbed generator")
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f'comma-separated methods, each optionally with its ratio, e.g. "tome:0.5,importance:0.7";'
                             f' known: {", ".join(KNOWN_METHODS)} (default: all). The unpatched reference always runs')
    parser.add_argument("--ratios", type=number_list(float, "0.5,0.7"),
                        help="ratios for the methods named without one (every method x ratio); default: each "
                             "method's default ratio")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", type=Path,
                        help="text file, one prompt per line (or a COCO-style captions .json: first caption per image)")
    source.add_argument("--split", choices=tuple(SPLIT_SEEDS),
                        help=f"testbed split whose captions are the prompts (default {DEFAULT_SPLIT})")
    parser.add_argument("--count", type=positive_int,
                        help=f"number of prompts (default: {DEFAULT_COUNT} from a split, all of a file)")
    parser.add_argument("--seeds", type=number_list(int, "0,1,2"), default=(0,), help="seeds (default 0)")
    parser.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the pipeline's)")
    parser.add_argument("--batch", type=positive_int, default=16, help="prompts per pipeline call (default 16)")
    parser.add_argument("--height", type=positive_int, help="image height (default: the model's; not the testbed)")
    parser.add_argument("--width", type=positive_int, help="image width (default: the model's; not the testbed)")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json/.csv/.md and the figures")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--clip-model", type=Path, help="local CLIP folder (e.g. openai/clip-vit-base-patch16): "
                                                        "adds CLIP score")
    parser.add_argument("--fid-reference", type=Path,
                        help="reference images for FID: a folder, or a COCO-style captions .json listing them")
    parser.add_argument("--inception-weights", type=Path,
                        help="FID Inception weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth)")
    parser.add_argument("--image-root", type=Path,
                        help="folder the COCO file's file_name entries are relative to (default: the file's folder)")
    parser.add_argument("--save-images", action="store_true",
                        help="also write every image to OUT/images/<method>-<ratio>/ (e.g. for clean-fid)")
    parser.add_argument("--grid-prompts", type=positive_int, default=6, help="prompts (columns) in grid.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--noise-floor", action="store_true",
                        help="add a row of the unpatched model from other noise: the sampling noise of accuracy and "
                             "FD, against which the methods' differences are read")
    parser.add_argument("--cache", metavar="SPEC",
                        help="stack a caching accelerator: adds a row of it alone and one of it with each method, "
                             "against the same unpatched reference; deepcache[:interval=3,branch=0] (U-Net "
                             "pipelines, the testbed), first-block[:threshold=0.05], pab[:skip=2], "
                             "taylorseer-lite[:interval=3,warmup=2] (denoisers with enable_cache)")
    parser.set_defaults(handler=run_eval, usage_error=parser.error)
    return parser


def run_eval(args: argparse.Namespace) -> EvalResult:
    try:
        return evaluate(
            args.model, methods=args.methods, ratios=args.ratios, prompts=args.prompts,
            split=args.split or DEFAULT_SPLIT, count=args.count, seeds=args.seeds, steps=args.steps,
            guidance=args.guidance, batch=args.batch, height=args.height, width=args.width, out=args.out,
            device=args.device, dtype=args.dtype, clip_model=args.clip_model, fid_reference=args.fid_reference,
            inception_weights=args.inception_weights, image_root=args.image_root, save_images=args.save_images,
            grid_prompts=args.grid_prompts, progress=not args.no_progress, noise_floor=args.noise_floor,
            cache=args.cache,
        )
    except EvalError as err:
        args.usage_error(str(err))
