"""One evaluation: every prompt batch and seed, unpatched then each variant from the same noise, scored."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...api import patched
from ...methods.base import MethodConfig
from ...state import is_signal
from ...testbed.data import ATTRIBUTES, Scene, render
from ..runtime import resolve_device, synchronize
from .metrics import (
    ClipFeatures,
    JudgeFeatures,
    Scores,
    inception_module,
    judge_correct,
    load_reference_image,
    lpips_status,
    make_lpips,
    region_psnr,
    to_uint8,
)
from .prompts import DEFAULT_SPLIT, PromptSet, check_metric_paths, load_model, load_prompts
from .report import EvalResult, _rows, write_results
from ..caches import CacheSpec, cache_enabled, parse_cache
from ..caches import check as check_cache
from .variants import DEFAULT_METHODS, NOISE_FLOOR, REFERENCE, EvalError, Variant, parse_methods


def shard(items: Sequence, num_processes: int, process_index: int) -> list:
    """The contiguous part of ``items`` process ``process_index`` of ``num_processes`` takes, as accelerate's
    ``split_between_processes``: the first ``len % num_processes`` processes take one more."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index {process_index} out of range for {num_processes} processes")
    size, extra = divmod(len(items), num_processes)
    start = process_index * size + min(process_index, extra)
    return list(items[start : start + size + (process_index < extra)])


def batches_of(count: int, batch: int) -> list[list[int]]:
    """Prompt indices ``0..count-1`` in batches of ``batch`` (the last may be shorter)."""
    return [list(range(start, min(start + batch, count))) for start in range(0, count, batch)]


def batch_seed(seed: int, first_index: int) -> int:
    """The generator seed of the batch starting at prompt ``first_index``: distinct noise in every batch, the
    same for the reference and every method, and independent of how batches are spread over processes."""
    return int(np.random.SeedSequence([seed, first_index]).generate_state(1)[0])


def real_jitter_seed(index: int, seed: int) -> int:
    """Jitter seed of the real testbed image that stands for prompt ``index`` at ``seed`` in the FD."""
    return int(np.random.SeedSequence([0x7E57, index, seed]).generate_state(1)[0])


def _generate(pipe, prompts: list[str], steps: int, seed: int, device: torch.device, options: dict) -> torch.Tensor:
    generator = torch.Generator(device).manual_seed(seed)
    images = pipe(prompt=prompts, num_inference_steps=steps, generator=generator, output_type="pt", **options).images
    return images.float().clamp(0, 1)


def evaluate(
    model: Any = None, *, methods: str | Sequence[str | MethodConfig] = DEFAULT_METHODS,
    ratios: Sequence[float] | None = None, prompts: str | Path | Sequence[str] | PromptSet | None = None,
    split: str = DEFAULT_SPLIT, count: int | None = None, seeds: Sequence[int] = (0,), steps: int = 20,
    guidance: float | None = None, batch: int = 16, height: int | None = None, width: int | None = None,
    out: str | Path | None = None, device: str = "auto", dtype: str = "float32",
    clip_model: str | Path | None = None, fid_reference: str | Path | None = None,
    inception_weights: str | Path | None = None, image_root: str | Path | None = None,
    save_images: bool = False, grid_prompts: int = 6, progress: bool = True, noise_floor: bool = False,
    cache: str | CacheSpec | None = None, log: Callable[[str], None] = print,
) -> EvalResult:
    """Evaluate token-merging methods against the unpatched model; write the result files to ``out``.

    ``model``: None for the testbed, a pipeline folder (or saved testbed), or a loaded pipeline. ``methods`` and
    ``ratios``: see :func:`parse_methods`. ``prompts``: a file (see :func:`load_prompts`), a list of prompts or a
    :class:`PromptSet`; None takes ``count`` captions of the testbed ``split``. ``guidance`` None keeps the
    pipeline's default scale. Inputs are checked before any model loads; a bad one raises :class:`EvalError`.
    Runs on one process as is, or sharded under ``accelerate launch`` (every process returns the same rows).
    ``noise_floor``: add a row of the unpatched model from other noise (:data:`NOISE_FLOOR`).
    ``cache``: a caching accelerator (:mod:`tokenmerge.tools.caches`, e.g. ``"deepcache:interval=3"``) adds a row of
    it alone and one of it stacked with each method, all against the same unpatched reference.
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    variants = [REFERENCE, *([NOISE_FLOOR] if noise_floor else []), *parse_methods(methods, ratios)]
    if cache is not None:
        try:
            cache = cache if isinstance(cache, CacheSpec) else parse_cache(cache)
        except ValueError as err:
            raise EvalError(str(err)) from None
        merged = [v for v in variants if v.config is not None]
        variants += [dataclasses.replace(REFERENCE, cache=cache), *(dataclasses.replace(v, cache=cache) for v in merged)]
    if isinstance(prompts, PromptSet):
        prompt_set = prompts
    elif isinstance(prompts, (str, Path)) or prompts is None:
        prompt_set = load_prompts(prompts, split, count)
    else:
        prompt_set = PromptSet.from_prompts(list(prompts)[:count])
    seeds = tuple(int(seed) for seed in seeds)
    if not seeds:
        raise EvalError("no seeds: give at least one, e.g. --seeds 0")
    for name, value in (("steps", steps), ("batch", batch), ("grid_prompts", grid_prompts)):
        if value < 1:
            raise EvalError(f"{name} must be at least 1, got {value}")
    if guidance is not None and guidance <= 1:
        users = [v.label for v in variants if v.config is not None and is_signal(v.config.signal, "cfg")]
        if users:
            raise EvalError(f"{', '.join(users)} read token importance from classifier-free guidance, which "
                            f"guidance {guidance:g} turns off; use a guidance scale above 1")
    references = check_metric_paths(clip_model, fid_reference, inception_weights, image_root)

    # On CPU, accelerate needs cpu=True to see a multi-process (torchrun / accelerate launch) run as one.
    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    main = state.is_main_process
    say = log if main else (lambda message: None)
    notes: list[str] = []

    def note(message: str) -> None:
        notes.append(message)
        say(message)

    def bad_device(message: str) -> None:
        raise EvalError(message)

    from ...testbed.pipeline import IMAGE_SIZE, TestbedPipeline

    if model is None or isinstance(model, (str, Path)):
        if state.num_processes > 1 and device in ("auto", "cuda"):
            run_device = state.device
        else:
            run_device = resolve_device(device, bad_device)
        pipe = load_model(model, dtype).to(run_device)
        model_name = "testbed" if model is None else str(model)
    else:
        pipe = model
        run_device = pipe.device if device == "auto" else resolve_device(device, bad_device)
        pipe.to(run_device)
        model_name = type(pipe).__name__
    pipe.set_progress_bar_config(disable=True)
    if cache is not None:
        try:
            check_cache(cache, pipe)
        except ValueError as err:
            raise EvalError(str(err)) from None
    testbed = isinstance(pipe, TestbedPipeline)
    options: dict[str, Any] = {}
    if guidance is not None:
        options["guidance_scale"] = guidance
    if height is not None or width is not None:
        if testbed:
            raise EvalError(f"--height/--width do not apply to the testbed: its images are {IMAGE_SIZE}x{IMAGE_SIZE}")
        options.update({key: value for key, value in (("height", height), ("width", width)) if value is not None})

    judge = None
    if testbed and prompt_set.scenes is not None:
        from ...testbed.judge import load_judge

        judge = load_judge(IMAGE_SIZE).to(run_device)
    elif testbed:
        note("judge metrics (accuracy, FD) skipped: not every prompt is a testbed caption")
    else:
        note("judge metrics (accuracy, FD) are for the testbed only: null for this model")
    lpips_metric = None
    lpips_skip = lpips_status()
    if lpips_skip:
        note(lpips_skip)
    else:
        lpips_metric = make_lpips().to(run_device)
    clip_metric = None
    if clip_model is not None:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor

        clip_metric = CLIPScore(model_name_or_path=lambda: (ClipFeatures(CLIPModel.from_pretrained(clip_model)),
                                                            CLIPProcessor.from_pretrained(clip_model)))
        clip_metric.to(run_device)

    fd_features = JudgeFeatures(judge) if judge is not None else None
    fid_features = None
    real: dict[str, Any] = {}
    if references:
        from torchmetrics.image.fid import FrechetInceptionDistance

        real["fid"] = FrechetInceptionDistance(feature=inception_module(inception_weights),
                                               reset_real_features=False).to(run_device)
        fid_features = real["fid"].inception
    if fd_features is not None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        real["fd"] = FrechetInceptionDistance(feature=fd_features, normalize=True,
                                              reset_real_features=False).to(run_device)
    scores = {v.label: Scores(judge is not None, fd_features, lpips_metric is not None, clip_metric is not None,
                              fid_features).to(run_device) for v in variants}

    all_batches = batches_of(len(prompt_set.prompts), batch)
    my_batches = shard(all_batches, state.num_processes, state.process_index)
    out = Path(out) if out is not None else None
    grid_cells: list[tuple[str, int, np.ndarray]] = []

    with torch.no_grad():
        # Warm-up, untimed: first kernels and allocations must not count against the first variant timed.
        warm_prompts = [prompt_set.prompts[i] for i in all_batches[0]]
        for variant in variants:
            with _patched(pipe, variant, 0):
                image_shape = _generate(pipe, warm_prompts, min(steps, 2), 0, run_device, options).shape
        bar = tqdm(total=len(my_batches) * len(seeds) * len(variants), desc="tokenmerge eval", unit="call",
                   disable=not (progress and main))
        for batch_indices in my_batches:
            batch_prompts = [prompt_set.prompts[i] for i in batch_indices]
            batch_scenes = [prompt_set.scenes[i] for i in batch_indices] if judge is not None else None
            for seed_position, seed in enumerate(seeds):
                noise_seed = batch_seed(seed, batch_indices[0])
                turn = (batch_indices[0] // batch * len(seeds) + seed_position) % len(variants)
                outputs = {}
                for variant in variants[turn:] + variants[:turn]:  # rotate who runs first
                    with _patched(pipe, variant, noise_seed):
                        synchronize(run_device)
                        start = time.perf_counter()
                        outputs[variant.label] = _generate(pipe, batch_prompts, steps, noise_seed + variant.noise_offset,
                                                           run_device, options)
                        synchronize(run_device)
                        seconds = time.perf_counter() - start
                    scores[variant.label].metrics["seconds"].update(seconds)
                    scores[variant.label].metrics["images"].update(len(batch_indices))
                    bar.update(1)
                _score_batch(outputs, scores, batch_indices, batch_prompts, batch_scenes, seed, judge, real,
                             lpips_metric, clip_metric)
                for variant in variants:
                    images = to_uint8(outputs[variant.label]).permute(0, 2, 3, 1).cpu().numpy()
                    for index, image in zip(batch_indices, images):
                        if seed_position == 0 and index < grid_prompts:
                            grid_cells.append((variant.label, index, image))
                        if save_images and out is not None:
                            folder = out / "images" / variant.folder
                            folder.mkdir(parents=True, exist_ok=True)
                            Image.fromarray(image).save(folder / f"{index:05d}_seed{seed}.png")
        bar.close()
        my_references = shard(references, state.num_processes, state.process_index)
        for chunk in batches_of(len(my_references), batch):
            pixels = np.stack([load_reference_image(my_references[i], image_shape[2], image_shape[3]) for i in chunk])
            real["fid"].update(torch.from_numpy(pixels).permute(0, 3, 1, 2).to(run_device), real=True)

    # Every process computes (the metric states are summed across processes), in the same order.
    computed = {v.label: scores[v.label].compute(real) for v in variants}
    rows = _rows(variants, computed)
    grid_cells = gather_object(grid_cells)
    settings = {
        "model": model_name, "methods": [v.label for v in variants[1:]], "prompts": prompt_set.source,
        "count": len(prompt_set.prompts), "seeds": list(seeds), "steps": steps, "guidance": guidance,
        "batch": batch, "image_size": list(image_shape[2:]), "device": str(run_device), "dtype": dtype,
        "processes": state.num_processes, "grid_prompts": prompt_set.prompts[:grid_prompts],
    }
    result = EvalResult(rows, notes, settings)
    if main and out is not None:
        result.files = write_results(result, out, variants, grid_cells, grid_prompts, log)
    state.wait_for_everyone()
    return result


def _patched(pipe, variant: Variant, noise_seed: int):
    """The variant's patch for one call (a no-op context for the reference); unseeded configs get the call's seed."""
    import contextlib

    stack = contextlib.ExitStack()
    if variant.cache is not None:
        stack.enter_context(cache_enabled(variant.cache, pipe))
    if variant.config is not None:
        config = variant.config
        if config.seed is None:
            config = dataclasses.replace(config, seed=noise_seed)
        stack.enter_context(patched(pipe, config))
    return stack


def _score_batch(outputs: dict[str, torch.Tensor], scores: dict[str, Scores], batch_indices: list[int],
                 prompts: list[str], scenes: list[Scene] | None, seed: int, judge, real: dict[str, Any],
                 lpips_metric, clip_metric) -> None:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    reference = outputs[REFERENCE.label]
    if "fd" in real:
        from ...testbed.judge import to_tensor

        pixels = np.stack([np.asarray(render(scenes[k], reference.shape[-1], jitter_seed=real_jitter_seed(i, seed)))
                           for k, i in enumerate(batch_indices)])
        real["fd"].update(to_tensor(pixels).to(reference.device), real=True)
    for label, images in outputs.items():
        metrics = scores[label].metrics
        metrics["psnr"].update(peak_signal_noise_ratio(images, reference, data_range=1.0, reduction="none",
                                                       dim=(1, 2, 3)))
        metrics["ssim"].update(images, reference)
        if lpips_metric is not None:
            metrics["lpips"].update(lpips_metric(images, reference), weight=len(images))
            lpips_metric.reset()
        if judge is not None:
            for name, psnr in region_psnr(images, reference, scenes).items():
                metrics[name].update(psnr)
            correct = judge_correct(judge, images, scenes).float()
            metrics["accuracy"].update(correct.all(dim=1).float())
            for column, name in enumerate(ATTRIBUTES):
                metrics[f"accuracy_{name}"].update(correct[:, column])
            metrics["fd"].update(images, real=False)
        if clip_metric is not None:
            metrics["clip_score"].update(clip_metric(to_uint8(images), prompts), weight=len(images))
            clip_metric.reset()
        if "fid" in metrics:
            metrics["fid"].update(to_uint8(images), real=False)
