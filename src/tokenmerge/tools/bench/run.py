"""One bench run: every model x resolution x variant, in interleaved rounds, and its table rows."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import statistics
import types
from collections.abc import Callable

import torch
from torch import nn

from ...hooks import floor_warnings_off
from ...models import example_inputs
from ..caches import CacheSpec, cache_enabled
from ..options import UNPATCHED, Size
from ..reports import log
from ..tiny import build_denoiser
from .measure import LiveBytes, compiled_runs, count_flops, measure, plan_seconds, weight_bytes
from .report import CSV_FIELDS
from .variants import FIELD_OPTIONS, TimedVariant, make_variant
from .zoo import MODELS, TINY_SIZE, is_unet, latent_size, model_config, size_label


def bench_resolution(denoiser: nn.Module, size: Size, args: argparse.Namespace) -> list[TimedVariant]:
    """Every variant of one model at one resolution: warm-up, interleaved timed rounds, FLOPs."""
    inputs, kwargs = example_inputs(denoiser, size, args.images, args.device, args.dtype, args.seed)
    timesteps = run_timesteps(args.steps) if args.cache is not None else None

    def make_step(model: nn.Module) -> Callable[[], None]:
        def step() -> None:  # --steps calls in one patched run: its clock advances, plans are reused (plan_every)
            with torch.no_grad():
                for index in range(args.steps):
                    if timesteps is None:
                        model(*inputs, **kwargs)
                    else:  # a run of steps, as a sampler makes it (the caches follow the timestep)
                        model(inputs[0], timesteps[index], *inputs[2:], **kwargs)
        return step

    step = make_step(denoiser)

    fields = {name: getattr(args, name) for name in FIELD_OPTIONS}
    latent = latent_size(size)
    variants = [make_variant(UNPATCHED, None, denoiser, latent, args.device, args.use_rand, args.seed)]
    variants += [make_variant(method, ratio, denoiser, latent, args.device, args.use_rand, args.seed, share, fields,
                              mode)
                 for ratio in args.ratios for method in args.methods if method != UNPATCHED
                 for share in (args.share_plan if method != "tomesd" else ("block",))
                 for mode in (args.attention if method != "tomesd" else ("default",))]
    if args.cache is not None:
        variants += [with_cache(v, args.cache, denoiser, timesteps) for v in variants]
    runnable = [v for v in variants if v.status == "ok"]
    with (compiled_runs(runnable, denoiser, make_step, args) if args.compile
          else contextlib.nullcontext({id(v): functools.partial(measure, v, denoiser, step, args.device)
                                       for v in runnable})) as runs:
        for _ in range(args.warmup):
            for variant in runnable:
                runs[id(variant)]()
        for variant in runnable:
            variant.peak_bytes = None  # the warm-up's peaks (first allocations, kernel selection) do not count
        for round_index in range(args.repeats):
            for variant in runnable:
                variant.times.append(runs[id(variant)]() / args.steps)
            log(f"  {size_label(size)} px: round {round_index + 1}/{args.repeats} done")
    for variant in runnable:
        with variant.patch(denoiser), (LiveBytes() if args.device.type != "cuda" else contextlib.nullcontext()) as live:
            variant.flops = count_flops(step) // args.steps
        if live is not None:
            variant.peak_bytes = weight_bytes(denoiser) + live.peak
        if variant.config is not None:
            variant.plan_seconds = plan_seconds(variant, denoiser, step, args.device) / args.steps
    return variants


def run_timesteps(steps: int) -> torch.Tensor:
    """``steps`` timesteps evenly spaced from 999 down, each a CPU tensor, as a sampler's run gives them."""
    return torch.linspace(999, 0, steps + 1)[:-1].round().long()


def with_cache(variant: TimedVariant, cache: CacheSpec, denoiser: nn.Module, timesteps: torch.Tensor) -> TimedVariant:
    """``variant`` with a caching accelerator stacked (``--cache``), named ``METHOD+CACHE``: the cache on a stand-in
    pipeline (the denoiser as its ``unet``, a scheduler of the run's timesteps), enabled for each timed run."""
    name = f"{variant.method}+{cache.label}" if variant.method != UNPATCHED else cache.label
    if variant.status != "ok":
        return dataclasses.replace(variant, method=name, times=[])
    if not is_unet(denoiser):
        return TimedVariant(name, variant.ratio, status="unsupported",
                            note=f"{cache.name} is timed on U-Nets (DeepCache's helper wraps a U-Net pipeline)")
    pipe = types.SimpleNamespace(unet=denoiser, scheduler=types.SimpleNamespace(timesteps=timesteps))

    @contextlib.contextmanager
    def patch(model: nn.Module):
        with cache_enabled(cache, pipe), variant.patch(model):
            yield

    return dataclasses.replace(variant, method=name, patch=patch, times=[], skipped={})


def sizes_for(model: str, args: argparse.Namespace) -> tuple[Size, ...]:
    if args.sizes:
        return args.sizes
    if args.tiny:
        return (TINY_SIZE,)
    return MODELS[model].gpu_sizes if args.device.type == "cuda" else MODELS[model].gpu_sizes[:1]


def run_bench(args: argparse.Namespace) -> list[dict]:
    """Bench every model and resolution; one row (a dict of CSV_FIELDS) per variant."""
    rows = []
    with floor_warnings_off():  # the table's notes name the skipped blocks; every round re-patches
        for model in args.models:
            rows += bench_model(model, args)
    return rows


def bench_model(model: str, args: argparse.Namespace) -> list[dict]:
    """Build one model's full-size (or tiny) architecture and bench each of its resolutions."""
    config = model_config(model, args.tiny)
    log(f"{model}: building {config['_class_name']} ({'tiny' if args.tiny else 'full size'}, random weights) "
        f"on {args.device} {args.dtype_name}")
    denoiser = build_denoiser(config, args.device, args.dtype, args.seed)
    rows = []
    for size in sizes_for(model, args):
        rows += table_rows(model, size, bench_resolution(denoiser, size, args), args.device.type)
    del denoiser
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table_rows(model: str, size: Size, variants: list[TimedVariant], device_type: str) -> list[dict]:
    base = variants[0]  # unpatched
    base_median = statistics.median(base.times) if base.times else None
    rows = []
    for v in variants:
        row = dict.fromkeys(CSV_FIELDS)
        row.update(model=model, size=size_label(size), method=v.method, ratio=v.ratio, status=v.status, note=v.note)
        if v.times:
            median = statistics.median(v.times)
            row.update(median_s=median, min_s=min(v.times), max_s=max(v.times), runs=len(v.times),
                       speedup=base_median / median, gflops=v.flops / 1e9,
                       flop_bound=base.flops / v.flops if v.flops else None)
            row["achieved"] = row["speedup"] / row["flop_bound"] if row["flop_bound"] else None
            if v.plan_seconds is not None:
                row.update(plan_s=v.plan_seconds, plan_share=v.plan_seconds / median)
            row["peak_mem_mib"] = v.peak_bytes / 2**20 if v.peak_bytes is not None else None
            notes = [v.note]
            if v.skipped:
                notes.append(f"{len(v.skipped)} block(s) below {v.config.floor(device_type)} not merged "
                             f"({', '.join(sorted({str(n) for n in v.skipped.values()}))} tokens)")
            if v.method != UNPATCHED and v.flops == base.flops:
                notes.append("merges nothing (FLOPs unchanged)")
            row["note"] = "; ".join(filter(None, notes))
        rows.append(row)
    return rows
