"""``auto_ratio``: the smallest merge ratio that reaches a target speed-up, measured on this machine.

Merging pays differently on every device, model and resolution (on a GPU at 512 px it may not pay at all),
so the ratio is chosen from a short calibration rather than a table: the denoiser is timed unpatched, then
at increasing ratios, on one call of the actual input size; the first ratio whose median speed-up reaches
the target is chosen (larger ratios cost quality and are not timed). If none reaches it, the fastest ratio
measured is chosen when it beats the unpatched denoiser, else ratio 0 (merging cannot pay here: nothing is
merged); the result says so.

    result = tokenmerge.auto_ratio(pipe, tokenmerge.ToMe(), target_speedup=1.5, size=1024)
    tokenmerge.apply(pipe, result.config)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .api import apply, current_config, find_denoiser, patched, remove, state_of
from .hooks import floor_warnings_off
from .methods.base import MethodConfig
from .models import example_inputs

log = logging.getLogger("tokenmerge")
#: Ratios tried by default, in order (those above the config's max_ratio are left out).
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75)
Timer = Callable[[Callable[[], object]], float]


def timed(call: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events (synced once, on the end event) on GPU, ``time.perf_counter`` elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_s = time.perf_counter()
    call()
    return time.perf_counter() - start_s


@dataclass(frozen=True)
class AutoRatio:
    """What :func:`auto_ratio` chose and measured.

    Attributes:
        config: the given config with the chosen ratio, ready for :func:`tokenmerge.apply`.
        ratio: the chosen ratio (0.0 when no ratio was faster than the unpatched denoiser).
        target: the target speed-up.
        reached: whether the chosen ratio reaches the target.
        speedups: median speed-up of every ratio timed, in the order timed.
        baseline_s: median seconds of one unpatched denoiser call.
    """

    config: MethodConfig
    ratio: float
    target: float
    reached: bool
    speedups: dict[float, float]
    baseline_s: float

    def __str__(self) -> str:
        measured = ", ".join(f"{r:g}: {s:.2f}x" for r, s in self.speedups.items())
        if self.reached:
            verdict = f"ratio {self.ratio:g} reaches the target {self.target:g}x"
        elif self.ratio > 0:
            verdict = f"no ratio reaches {self.target:g}x; the fastest, {self.ratio:g}, is chosen"
        else:
            verdict = "no ratio is faster than the unpatched denoiser: merging cannot pay here, ratio 0 (off)"
        return f"tokenmerge.auto_ratio({type(self.config).__name__}): {verdict} (speed-ups {measured})"


def choose_ratio(speedups: dict[float, float], target: float) -> tuple[float, bool]:
    """``(ratio, reached)``: the smallest ratio with ``speed-up >= target``; else the fastest ratio if it
    beats the unpatched denoiser (``speed-up > 1``); else ``(0.0, False)``."""
    reaching = [ratio for ratio, speedup in speedups.items() if speedup >= target]
    if reaching:
        return min(reaching), True
    if speedups:
        fastest = max(speedups, key=lambda ratio: (speedups[ratio], -ratio))
        if speedups[fastest] > 1.0:
            return fastest, False
    return 0.0, False


def auto_ratio(model: object, config: MethodConfig, target_speedup: float, *,
               size: int | tuple[int, int] | None = None,
               inputs: tuple[tuple, dict] | None = None, ratios: Sequence[float] | None = None, repeats: int = 3,
               warmup: int = 1, timer: Timer | None = None) -> AutoRatio:
    """Time the denoiser of ``model`` unpatched and with ``config`` at increasing ratios; choose the smallest
    ratio whose median speed-up reaches ``target_speedup``.

    Args:
        model: a diffusers pipeline or its denoiser (a patch on it is restored afterwards).
        config: the method and its settings; its ``ratio`` is replaced.
        target_speedup: wanted speed-up of a denoiser call, > 1.
        size: image size in pixels, one side of a square or ``(height, width)``, of a CFG batch (two
            latents, random text), or
        inputs: ``(args, kwargs)`` of one denoiser call, exactly as it will run. Give one of the two.
        ratios: ratios to try, in increasing order (default ``DEFAULT_RATIOS`` up to ``config.max_ratio()``).
        repeats: timed calls per ratio (the median counts); warmup: untimed calls before them.
        timer: ``timer(call) -> seconds``; default: CUDA events on GPU, ``time.perf_counter`` on CPU.
    """
    if isinstance(target_speedup, bool) or not isinstance(target_speedup, (int, float)) or not target_speedup > 1:
        raise ValueError(f"auto_ratio: target_speedup must be a number > 1 (e.g. 1.5 for 1.5x), got {target_speedup!r}")
    if (size is None) == (inputs is None):
        raise ValueError("auto_ratio: give either size= (pixels, e.g. 1024) or inputs= ((args, kwargs) of one "
                         "denoiser call), not both or neither")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"auto_ratio: {name} must be an int >= {low}, got {value!r}")
    top = config.max_ratio()
    ratios = tuple(ratios) if ratios is not None else tuple(r for r in DEFAULT_RATIOS if r <= top)
    if not ratios or any(not 0 < r <= top for r in ratios) or list(ratios) != sorted(set(ratios)):
        raise ValueError(f"auto_ratio: ratios must be increasing, in (0, {top:g}] for {type(config).__name__}; "
                         f"got {ratios!r}")
    denoiser, _ = find_denoiser(model)
    if inputs is None:
        param = next(denoiser.parameters())
        inputs = example_inputs(denoiser, size, 1, param.device, param.dtype)
    args, kwargs = inputs
    if timer is None:
        device = next(denoiser.parameters()).device
        timer = lambda call: timed(call, device)  # noqa: E731

    def call() -> None:
        with torch.no_grad():
            denoiser(*args, **kwargs)

    def median_seconds() -> float:
        for _ in range(warmup):
            call()
        return statistics.median(timer(call) for _ in range(repeats))

    previous = state_of(denoiser)
    remove(denoiser)
    try:
        baseline = median_seconds()
        speedups = {}
        for tried, ratio in enumerate(ratios):
            # A block below the floor is logged at the first ratio; the later ones would say it again.
            quiet = floor_warnings_off() if tried else contextlib.nullcontext()
            with patched(denoiser, dataclasses.replace(config, ratio=ratio)), quiet:
                speedups[ratio] = baseline / median_seconds()
            if speedups[ratio] >= target_speedup:
                break  # larger ratios cost quality; the smallest that reaches the target is the answer
    finally:
        if previous is not None and current_config(denoiser) is None:
            apply(denoiser, previous.config, on_plan=previous.on_plan)
    ratio, reached = choose_ratio(speedups, target_speedup)
    result = AutoRatio(dataclasses.replace(config, ratio=ratio), ratio, target_speedup, reached, speedups, baseline)
    (log.info if reached else log.warning)(str(result))
    return result
