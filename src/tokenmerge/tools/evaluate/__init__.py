"""``tokenmerge eval``: the quality and the speed-up of token-merging methods, against the unpatched model.

    tokenmerge eval --methods tome,importance --ratios 0.5,0.7 --split heldout --count 200 --seeds 0,1,2 --out OUT

For every prompt batch and seed the unpatched reference is generated once, then every method x ratio from the
same seed (in a rotating order, so that slow drifts of the machine spread evenly): the wall time of each call
gives the speed-up, measured in the same run. Each method's images are compared with the reference (PSNR,
SSIM, LPIPS when its weights are present). On the testbed, the judge reads every image (condition accuracy)
and the Fréchet distance of its features to real images of the same captions measures the distribution (FD).
On real models, CLIP score and FID come from local weights (``--clip-model``, ``--fid-reference`` with
``--inception-weights``).

Writes ``results.json``, ``results.csv``, ``results.md`` (also printed), ``quality_vs_speedup.png`` and
``grid.png`` to ``--out``. Under ``accelerate launch`` the prompt batches are sharded across the processes and
the metric states are summed over them (torchmetrics' distributed sync); the main process writes the files.
The metrics and their protocol are in docs/quality.md. :func:`evaluate` is the Python entry point.


Modules: ``variants`` (the method language), ``prompts`` (inputs), ``metrics``, ``run`` (the loop),
``report`` (files), ``command`` (the command line).
"""

from __future__ import annotations

from .command import register, run_eval
from .metrics import JudgeFeatures, frechet_distance, region_psnr
from .prompts import PromptSet, load_model, load_prompts, read_coco_captions, reference_images
from .report import GRID_CELL, RESULT_FILES, EvalResult, results_table
from .run import batches_of, evaluate, shard
from .variants import DEFAULT_METHODS, NOISE_FLOOR, REFERENCE, EvalError, Variant, method_name, parse_methods

__all__ = ["DEFAULT_METHODS", "EvalError", "EvalResult", "GRID_CELL", "JudgeFeatures", "NOISE_FLOOR", "PromptSet", "REFERENCE", "RESULT_FILES", "Variant", "batches_of", "evaluate", "frechet_distance", "load_model", "load_prompts", "method_name", "parse_methods", "read_coco_captions", "reference_images", "region_psnr", "register", "results_table", "run_eval", "shard"]
