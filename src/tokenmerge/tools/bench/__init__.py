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


Modules: ``zoo`` (models), ``variants`` (what is timed), ``measure`` (how), ``run`` (rounds and rows),
``report`` (files), ``command`` (the command line).
"""

from __future__ import annotations

from .command import CPU_DEFAULTS, GPU_DEFAULTS, complete_args, main, register, run_command
from .measure import LiveBytes, count_flops, weight_bytes
from .report import bench_table
from .run import run_bench, sizes_for
from .variants import METHODS, TimedVariant, make_variant, method_config, tomesd_patched
from .zoo import MODELS, family, latent_size, model_config, size_label

__all__ = ["CPU_DEFAULTS", "GPU_DEFAULTS", "LiveBytes", "METHODS", "MODELS", "TimedVariant", "complete_args", "count_flops", "family", "latent_size", "bench_table", "main", "make_variant", "method_config", "model_config", "register", "run_bench", "run_command", "size_label", "sizes_for", "tomesd_patched", "weight_bytes"]
