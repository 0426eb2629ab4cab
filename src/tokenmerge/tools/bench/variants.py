"""What ``bench`` times: the unpatched baseline, tomesd, and every tokenmerge method in every mode asked for."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ...api import apply, patched, remove
from ...methods import METHODS as CONFIGS
from ...methods import ImportanceMerge
from ...methods.base import config_fields
from ...presets import preset
from ..options import ATTENTION_MODES, UNPATCHED
from .zoo import family, is_unet

#: What a bench run may time: the unpatched baseline, the tomesd package, and every tokenmerge method.
METHODS = (UNPATCHED, "tomesd", *CONFIGS)


@dataclass
class TimedVariant:
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
                 attention: str = "default") -> TimedVariant:
    """A variant to time; tokenmerge methods planned per level are named ``METHOD+level``, and those in another
    attention mode (:data:`ATTENTION_MODES`) ``METHOD/MODE``."""
    if method == UNPATCHED:
        return TimedVariant(method, None, lambda model: contextlib.nullcontext())
    if method == "tomesd":
        if not is_unet(denoiser):  # UNetMotionModel too: tomesd reads the grid from a 4-D latent
            return TimedVariant(method, ratio, status="skipped", note="tomesd patches image U-Nets only")
        try:
            import tomesd  # noqa: F401
        except ImportError:
            return TimedVariant(method, ratio, status="skipped", note="tomesd is not installed (pip install tomesd)")
        note = "tomesd clamps the ratio to 0.75 silently" if ratio > 0.75 else ""
        return TimedVariant(method, ratio, lambda model: tomesd_patched(model, ratio, use_rand), note=note)
    name = method if share_plan == "block" else f"{method}+{share_plan}"
    if attention != "default":
        name = f"{name}/{attention}"
        fields = {**(fields or {}), **ATTENTION_MODES[attention]}
    try:
        config = method_config(method, ratio, latent, device, use_rand, seed, share_plan, fields, family(denoiser))
    except ValueError as err:  # e.g. a ratio out of the method's range
        return TimedVariant(name, ratio, status="invalid", note=str(err).splitlines()[0])
    try:
        apply(denoiser, config)  # raises ValueError for a denoiser without an adapter or a config it rejects
    except ValueError as err:
        return TimedVariant(name, ratio, status="unsupported", note=str(err).split(". ")[0])
    finally:
        remove(denoiser)
    return TimedVariant(name, ratio, lambda model: patched(model, config), config=config)
