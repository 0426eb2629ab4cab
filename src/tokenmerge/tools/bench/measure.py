"""How ``bench`` measures one step: time, FLOPs, live memory, the plans' own time, compiled copies."""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import time
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ...api import skipped_blocks
from ..runtime import synchronize, timed
from .variants import TimedVariant


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


def plan_seconds(variant: TimedVariant, denoiser: nn.Module, step: Callable[[], object], device: torch.device) -> float:
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


def measure(variant: TimedVariant, denoiser: nn.Module, step: Callable[[], object], device: torch.device) -> float:
    """One timed run of a variant (patching and unpatching happen outside the timed region)."""
    with variant.patch(denoiser):
        return measure_patched(variant, step, device, weights=None)


def measure_patched(variant: TimedVariant, step: Callable[[], object], device: torch.device, weights: int | None) -> float:
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
def compiled_runs(variants: list[TimedVariant], denoiser: nn.Module, make_step: Callable[[nn.Module], Callable[[], None]],
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
