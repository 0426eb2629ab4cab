"""``tokenmerge bench``: time one denoiser step with and without token merging, on full-size architectures.

    tokenmerge bench --models sd15 --sizes 512 --ratios 0.5 --methods unpatched,tomesd,tome,importance

The denoisers are built from the architecture configs shipped in ``tokenmerge/configs`` (no weights are downloaded:
the weights are random, which does not change the cost of a step). For every model and resolution, every variant
(method x ratio, and the unpatched baseline) runs one step on a CFG batch (``[uncond; cond]``,
batch ``2 x --images``; LCM: ``--images``, no CFG; AnimateDiff: videos of 16 frames; Zero123++: six views tiled
in a 960x640 image, after a reference pass; each family's inputs come from its adapter's ``example_inputs``;
``--steps S`` makes a sample S calls of one run, reported per call): warm-up, then ``--repeats`` interleaved
rounds (one run of each variant per round), so that drifts of the machine hit all variants alike. With
``--compile MODE`` every variant is a copy of the denoiser, patched once and ``torch.compile``'d (compiled in
at least two warm-up rounds), so the rounds time compiled steps without re-patching. Per variant it reports:

* time: median, min and max of the runs; CUDA events on GPU (the bench syncs only on the end event; the
  U-Net itself copies its CPU timestep to the device first thing, when nothing is queued yet),
  ``time.perf_counter`` on CPU;
* peak memory, weights included: ``torch.cuda.max_memory_allocated`` during the timed runs on GPU; on CPU, where
  the allocator keeps no peak (and a process RSS would mostly measure its caching), the most bytes of tensors
  alive at once during the FLOP-counting run (:class:`LiveBytes`), plus the weights;
* FLOPs of one step, from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention;
  not elementwise ops, gathers or sorting), the FLOP-bound speed-up ``unpatched FLOPs / variant FLOPs``
  and the achieved fraction of it, ``speed-up / FLOP bound``.

``tomesd`` runs side by side on image U-Nets, LCM included (``tomesd.apply_patch``, same ratio and ``use_rand``).
ImportanceMerge gets a fixed random importance map and ``prune_steps=0``, so its single step is in the
merge phase; on LCM it keeps its preset's ``importance="crossattn"`` (a first step: destinations per 2x2 cell).
Transformers (PixArt-alpha, DiT-XL/2) are patched with their family presets (the middle half of
the blocks; ``tokenmerge.presets``). A method that does not apply to a model (``tokenmerge.apply`` raises
``ValueError``) is reported as ``unsupported`` instead of stopping the run.
Writes ``bench.md``, ``bench.csv`` and ``bench.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import os
import statistics
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..api import apply, patched, remove, skipped_blocks
from ..hooks import floor_warnings_off
from ..methods import METHODS as CONFIGS
from ..methods import ImportanceMerge
from ..methods.base import SHARE_PLAN, config_fields
from ..models import adapter_for, example_inputs, tiny_configs
from ..presets import preset
from .options import ATTENTION_MODES, UNPATCHED, Size, at_least, name_list, parse_names, ratio_list, size_list
from .reports import log, markdown_table as table_of, write_csv
from .runtime import DTYPES, resolve_device, synchronize, timed
from .tiny import build_denoiser


@dataclass(frozen=True)
class ModelSpec:
    title: str
    config_file: str  # under tokenmerge/configs
    tiny_kind: str  # its family's tiny model for --tiny (tokenmerge.models.tiny_configs: sd1, lcm, pixart, ...)
    gpu_sizes: tuple[Size, ...]  # default resolutions on GPU; the first is the model's native one


MODELS = {
    "sd15": ModelSpec("SD 1.5", "sd15_unet.json", "sd1", (512, 1024, 2048)),
    "sd21": ModelSpec("SD 2.1", "sd21_unet.json", "sd2", (768,)),
    "sdxl": ModelSpec("SDXL", "sdxl_unet.json", "sdxl", (1024, 2048)),
    "pixart": ModelSpec("PixArt-alpha", "pixart_alpha_transformer.json", "pixart", (1024,)),
    "dit": ModelSpec("DiT-XL/2", "dit_xl2_256_transformer.json", "dit", (256, 512)),
    "lcm": ModelSpec("LCM (SD 1.5)", "lcm_sd15_unet.json", "lcm", (512, 1024)),
    "animatediff": ModelSpec("AnimateDiff (SD 1.5)", "animatediff_sd15_unet.json", "animatediff", (512,)),
    "zero123pp": ModelSpec("Zero123++ (SD 2)", "zero123pp_unet.json", "zero123pp", ((960, 640),)),
}
#: What a bench run may time: the unpatched baseline, the tomesd package, and every tokenmerge method.
METHODS = (UNPATCHED, "tomesd", *CONFIGS)
TINY_SIZE = 128  # the tiny configs' sample_size (16) x 8
CPU_DEFAULTS = dict(models=("sd15",), ratios=(0.5,), methods=("unpatched", "tomesd", "tome", "importance"),
                    repeats=3, warmup=1)
GPU_DEFAULTS = dict(models=tuple(MODELS), ratios=(0.3, 0.5, 0.7, 0.75),
                    methods=("unpatched", "tomesd", "tome", "importance"), repeats=10, warmup=3)
CSV_FIELDS = ("model", "size", "method", "ratio", "status", "median_s", "min_s", "max_s", "runs", "speedup",
              "gflops", "flop_bound", "achieved", "plan_s", "plan_share", "peak_mem_mib", "note")



# -- models and inputs ------------------------------------------------------------------------------
def model_config(name: str, tiny: bool = False) -> dict:
    """The diffusers config (``_class_name`` included) of a model: shipped full-size, or tiny."""
    spec = MODELS[parse_names(name, MODELS, "model")[0]]
    if tiny:
        return dict(tiny_configs()[spec.tiny_kind])
    return json.loads(resources.files("tokenmerge").joinpath("configs", spec.config_file).read_text())


def is_unet(denoiser: nn.Module) -> bool:
    return type(denoiser).__name__ == "UNet2DConditionModel"


def family(denoiser: nn.Module) -> str:
    """The denoiser's tokenmerge family (``sd``, ``lcm``, ``animatediff``, ``pixart``, ``dit``, ``zero123pp``)."""
    return adapter_for(denoiser).family


def pixels(size: Size) -> tuple[int, int]:
    """``(height, width)`` in pixels."""
    return (size, size) if isinstance(size, int) else size


def latent_size(size: Size) -> tuple[int, int]:
    """The latent ``(height, width)`` of an image size (VAE factor 8)."""
    height, width = pixels(size)
    return height // 8, width // 8


def size_label(size: Size) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"


# -- variants ---------------------------------------------------------------------------------------
@dataclass
class Variant:
    """One (method, ratio) on one model and resolution, and what was measured."""

    method: str
    ratio: float | None
    patch: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None
    status: str = "ok"
    note: str = ""
    times: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    flops: int | None = None
    config: object | None = None  # the tokenmerge config, None for unpatched and tomesd
    plan_seconds: float | None = None
    skipped: dict[str, int] = field(default_factory=dict)  # blocks below the floor (min_tokens): name -> tokens


@contextlib.contextmanager
def tomesd_patched(denoiser: nn.Module, ratio: float, use_rand: bool) -> Iterator[None]:
    import tomesd

    tomesd.apply_patch(denoiser, ratio=ratio, use_rand=use_rand)
    try:
        yield
    finally:
        tomesd.remove_patch(denoiser)


#: Config fields the bench's options set on every tokenmerge method (None: each method's default).
FIELD_OPTIONS = ("max_downsample", "min_tokens", "match_window", "plan_every", "merge_mlp")


def method_config(method: str, ratio: float, latent: tuple[int, int], device: torch.device, use_rand: bool, seed: int,
                  share_plan: str = "block", fields: dict | None = None, family: str = "sd"):
    """The tokenmerge config of a method with the given config ``fields``; ImportanceMerge's importance is a fixed
    random map on ``device``, unless the family's preset names a signal (LCM: ``"crossattn"``, no CFG), which is
    kept."""
    options = {name: value for name, value in (fields or {}).items() if value is not None}
    if share_plan != "block":
        options["share_plan"] = share_plan
    config_class = CONFIGS[method]
    missing = sorted(set(options) - {field.name for field in config_fields(config_class)})
    if missing:
        raise ValueError(f"{config_class.__name__} has no {', '.join(missing)} field")
    if method == "tome":
        options["use_rand"] = use_rand
    if method == "importance":
        if "importance" not in preset(family, ImportanceMerge):
            options["importance"] = torch.rand(*latent, generator=torch.Generator().manual_seed(seed)).to(device)
        options["prune_steps"] = 0.0
    return config_class(ratio=ratio, seed=seed, **options)


def make_variant(method: str, ratio: float | None, denoiser: nn.Module, latent: tuple[int, int], device: torch.device,
                 use_rand: bool, seed: int, share_plan: str = "block", fields: dict | None = None,
                 attention: str = "default") -> Variant:
    """A variant to time; tokenmerge methods planned per level are named ``METHOD+level``, and those in another
    attention mode (:data:`ATTENTION_MODES`) ``METHOD/MODE``."""
    if method == UNPATCHED:
        return Variant(method, None, lambda model: contextlib.nullcontext())
    if method == "tomesd":
        if not is_unet(denoiser):  # UNetMotionModel too: tomesd reads the grid from a 4-D latent
            return Variant(method, ratio, status="skipped", note="tomesd patches image U-Nets only")
        try:
            import tomesd  # noqa: F401
        except ImportError:
            return Variant(method, ratio, status="skipped", note="tomesd is not installed (pip install tomesd)")
        note = "tomesd clamps the ratio to 0.75 silently" if ratio > 0.75 else ""
        return Variant(method, ratio, lambda model: tomesd_patched(model, ratio, use_rand), note=note)
    name = method if share_plan == "block" else f"{method}+{share_plan}"
    if attention != "default":
        name = f"{name}/{attention}"
        fields = {**(fields or {}), **ATTENTION_MODES[attention]}
    try:
        config = method_config(method, ratio, latent, device, use_rand, seed, share_plan, fields, family(denoiser))
    except ValueError as err:  # e.g. a ratio out of the method's range
        return Variant(name, ratio, status="invalid", note=str(err).splitlines()[0])
    try:
        apply(denoiser, config)  # raises ValueError for a denoiser without an adapter or a config it rejects
    except ValueError as err:
        return Variant(name, ratio, status="unsupported", note=str(err).split(". ")[0])
    finally:
        remove(denoiser)
    return Variant(name, ratio, lambda model: patched(model, config), config=config)


# -- measuring --------------------------------------------------------------------------------------
def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def count_flops(step: Callable[[], object]) -> int:
    """FLOPs of one call. FlopCounterMode knows the CUDA attention kernels; the CPU one is added here."""
    from torch.utils.flop_counter import FlopCounterMode

    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    with FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _cpu_sdpa_flops} if cpu_sdpa else {}) as mode:
        step()
    return mode.get_total_flops()


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the tensors that ops make while it is active and that are still referenced, and their
    peak: the memory a step needs, without any allocator's caching or rounding. Views and in-place results of an
    op's inputs (a weight's transpose, say) add nothing; a storage counts until its last reference dies.
    On the meta device, with attention modelled as flash attention, it came within 3% of the H100's
    ``torch.cuda.max_memory_allocated`` for SD 1.5 at 2048 px (benchmarks/meta_step.py, docs/benchmarks.md)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.bytes = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()  # one Python object per storage while it lives
                if id(storage) not in self._live and id(storage) not in inputs:
                    self._live[id(storage)] = storage.nbytes()
                    self.bytes += storage.nbytes()
                    weakref.finalize(storage, self._free, id(storage))
        self.peak = max(self.peak, self.bytes)
        return out

    def _free(self, key: int) -> None:
        self.bytes -= self._live.pop(key)


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage once)."""
    storages = {id(t.untyped_storage()): t.untyped_storage().nbytes()
                for t in itertools.chain(module.parameters(), module.buffers())}
    return sum(storages.values())


def plan_seconds(variant: Variant, denoiser: nn.Module, step: Callable[[], object], device: torch.device) -> float:
    """Seconds spent in the config's ``make_plan`` during one step (an extra, untimed run); also records the
    blocks that run left unmerged (``min_tokens``) in ``variant.skipped``.

    The method's class is wrapped for the run; on GPU every plan is bracketed by device syncs, so the figure
    includes their latency and is an upper bound of the plans' share of a step.
    """
    cls = type(variant.config)
    original = cls.make_plan
    spent = [0.0]

    def make_plan(self, x, ctx):
        synchronize(device)
        start = time.perf_counter()
        plan = original(self, x, ctx)
        synchronize(device)
        spent[0] += time.perf_counter() - start
        return plan

    cls.make_plan = make_plan
    try:
        with variant.patch(denoiser):
            step()
            variant.skipped = skipped_blocks(denoiser)
    finally:
        cls.make_plan = original
    return spent[0]


def measure(variant: Variant, denoiser: nn.Module, step: Callable[[], object], device: torch.device) -> float:
    """One timed run of a variant (patching and unpatching happen outside the timed region)."""
    with variant.patch(denoiser):
        return measure_patched(variant, step, device, weights=None)


def measure_patched(variant: Variant, step: Callable[[], object], device: torch.device, weights: int | None) -> float:
    """One timed run of an already patched model. With ``weights`` (bytes; other models share the device: the
    compiled copies) the peak is the step's growth over what was allocated before it, plus those weights."""
    if device.type == "cuda":
        allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(step, device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        if weights is not None:
            peak = peak - allocated + weights
        variant.peak_bytes = max(variant.peak_bytes or 0, peak)
    return seconds


@contextlib.contextmanager
def compiled_runs(variants: list[Variant], denoiser: nn.Module, make_step: Callable[[nn.Module], Callable[[], None]],
                  args: argparse.Namespace) -> Iterator[dict[int, Callable[[], float]]]:
    """``--compile``: each variant gets its own copy of the denoiser, patched for the whole resolution and compiled
    once (in the warm-up), so the interleaved rounds neither re-patch nor recompile. Yields, per variant id, a
    function that times one run."""
    import torch._dynamo

    dynamo = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    with contextlib.ExitStack() as stack:
        stack.callback(torch._dynamo.reset)  # last: the compiled copies' graphs go with them
        stack.enter_context(dynamo.patch(**{limit: max(8, 4 * len(variants))}))
        runs = {}
        for variant in variants:
            model = copy.deepcopy(denoiser)
            stack.enter_context(variant.patch(model))
            compiled = torch.compile(model, mode=None if args.compile == "default" else args.compile,
                                     backend=args.compile_backend)
            step, weights = make_step(compiled), weight_bytes(model)
            runs[id(variant)] = functools.partial(measure_patched, variant, step, args.device, weights)
        yield runs


def bench_resolution(denoiser: nn.Module, size: Size, args: argparse.Namespace) -> list[Variant]:
    """Every variant of one model at one resolution: warm-up, interleaved timed rounds, FLOPs."""
    inputs, kwargs = example_inputs(denoiser, size, args.images, args.device, args.dtype, args.seed)

    def make_step(model: nn.Module) -> Callable[[], None]:
        def step() -> None:  # --steps calls in one patched run: its clock advances, plans are reused (plan_every)
            with torch.no_grad():
                for _ in range(args.steps):
                    model(*inputs, **kwargs)
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
    return args


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


def table_rows(model: str, size: Size, variants: list[Variant], device_type: str) -> list[dict]:
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


# -- output -----------------------------------------------------------------------------------------
def fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    if value is None or value == "":
        return "-"
    return f"{value:{spec}}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


TABLE_HEADER = ("model", "px", "method", "ratio", "median s", "min s", "max s", "speed-up", "GFLOPs", "FLOP bound",
                "achieved", "plan s", "plan %", "peak MiB", "note")


def markdown_table(rows: list[dict]) -> str:
    def cells(r: dict) -> tuple:
        note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        return (r["model"], r["size"], r["method"], fmt(r["ratio"], "g"), fmt(r["median_s"], ".4f"),
                fmt(r["min_s"], ".4f"), fmt(r["max_s"], ".4f"), fmt(r["speedup"], ".2f", "x"), fmt(r["gflops"], ".4g"),
                fmt(r["flop_bound"], ".2f", "x"), fmt(r["achieved"], ".0%"), fmt(r["plan_s"], ".4f"),
                fmt(r["plan_share"], ".1%"), fmt(r["peak_mem_mib"], ".0f"), note)

    return table_of(TABLE_HEADER, map(cells, rows)) + "\n"


def write_plot(rows: list[dict], path: Path) -> Path:
    """Speed-up vs ratio, one panel per model and resolution, one colour per method; dashed: the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = [r for r in rows if r["status"] == "ok" and r["method"] != UNPATCHED]
    panels = list(dict.fromkeys((r["model"], r["size"]) for r in merged))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.8), squeeze=False)
    names = list(dict.fromkeys([*METHODS, *(r["method"] for r in merged)]))  # METHOD+level variants too
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}
    for ax, (model, size) in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in merged):
            points = sorted((r["ratio"], r["speedup"], r["flop_bound"]) for r in merged
                            if (r["model"], r["size"], r["method"]) == (model, size, method))
            if points:
                ratios, speedups, bounds = zip(*points)
                ax.plot(ratios, speedups, "o-", color=colors[method], label=method)
                ax.plot(ratios, bounds, "x--", color=colors[method], alpha=0.7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"{MODELS[model].title}, {size} px", xlabel="merge ratio", ylabel="speed-up (step)")
        ax.legend(title="x, dashed: FLOP bound", fontsize=8, title_fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no merged variant ran", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every default spelled out."""
    def join(values) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else size_label(v) if isinstance(v, tuple) else str(v)
                        for v in values)

    sizes = f" --sizes {join(args.sizes)}" if args.sizes else ""
    return (f"tokenmerge bench --models {join(args.models)}{sizes} --ratios {join(args.ratios)} "
            f"--methods {join(args.methods)} --share-plan {join(args.share_plan)} "
            f"{f'--attention {join(args.attention)} ' if args.attention != ('default',) else ''}--repeats {args.repeats} "
            f"--warmup {args.warmup} --images {args.images} "
            f"{f'--max-downsample {args.max_downsample} ' if args.max_downsample else ''}"
            f"{f'--min-tokens {args.min_tokens} ' if args.min_tokens is not None else ''}"
            f"{f'--match-window {args.match_window} ' if args.match_window is not None else ''}"
            f"{f'--plan-every {args.plan_every} ' if args.plan_every is not None else ''}"
            f"{'--merge-mlp ' if args.merge_mlp else ''}"
            f"{f'--steps {args.steps} ' if args.steps != 1 else ''}"
            f"{f'--compile {args.compile} --compile-backend {args.compile_backend} ' if args.compile else ''}"
            f"--{'' if args.use_rand else 'no-'}use-rand --device {args.device} --dtype {args.dtype_name} "
            f"--seed {args.seed}{' --tiny' if args.tiny else ''} --out {args.out}")


# -- command line -----------------------------------------------------------------------------------
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
    table = markdown_table(rows)
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
