"""The caching accelerators ``bench --cache`` and ``eval --cache`` stack with merging.

A spec is ``NAME`` or ``NAME:key=value,...``:

* ``deepcache[:interval=3,branch=0]``: DeepCache's ``DeepCacheSDHelper`` on a pipeline's U-Net (the deep features
  reused for ``interval - 1`` steps out of ``interval``; ``branch``: the shallow branch's depth). Needs a pipeline with
  ``unet`` and ``scheduler`` (bench makes a stand-in) and ``pip install DeepCache``.
* ``first-block[:threshold=0.05]``, ``pab[:skip=2]``, ``taylorseer-lite[:interval=3,warmup=2]``: diffusers' cache hooks
  (``FirstBlockCacheConfig``, ``PyramidAttentionBroadcastConfig`` on the spatial attention over the whole run,
  ``TaylorSeerCacheConfig(use_lite_mode=True)``) on a denoiser with ``enable_cache`` (FLUX, Wan, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

#: name -> (its options and their defaults, what it needs).
CACHES = {
    "deepcache": ({"interval": 3, "branch": 0}, "a U-Net pipeline"),
    "first-block": ({"threshold": 0.05}, "a denoiser with enable_cache (diffusers' CacheMixin)"),
    "pab": ({"skip": 2}, "a denoiser with enable_cache (diffusers' CacheMixin)"),
    "taylorseer-lite": ({"interval": 3, "warmup": 2}, "a denoiser with enable_cache (diffusers' CacheMixin)"),
}


@dataclass(frozen=True)
class CacheSpec:
    name: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        given = ",".join(f"{key}={value:g}" for key, value in self.options.items())
        return f"{self.name}:{given}" if given else self.name


def parse_cache(text: str) -> CacheSpec:
    """``"deepcache:interval=3"`` -> ``CacheSpec("deepcache", {"interval": 3})``; a clear error for anything else."""
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    if name not in CACHES:
        raise ValueError(f"unknown cache {name!r}; known caches: {', '.join(CACHES)} (e.g. deepcache:interval=3)")
    defaults = CACHES[name][0]
    options = {}
    for item in filter(str.strip, rest.split(",")):
        key, has_value, value = item.partition("=")
        key = key.strip()
        if not has_value or key not in defaults:
            raise ValueError(f"bad option {item.strip()!r} for {name}: write key=value with a key among "
                             f"{', '.join(defaults)}")
        try:
            options[key] = type(defaults[key])(value)
        except ValueError:
            raise ValueError(f"bad value {value!r} for {name}'s {key}: a {type(defaults[key]).__name__}") from None
    return CacheSpec(name, options)


def option(spec: CacheSpec, key: str):
    return spec.options.get(key, CACHES[spec.name][0][key])


def check(spec: CacheSpec, pipe) -> None:
    """Raise, naming what is missing, if ``spec``'s cache cannot run on ``pipe``."""
    if spec.name == "deepcache":
        if not hasattr(getattr(pipe, "unet", None), "down_blocks"):
            raise ValueError(f"cache deepcache needs {CACHES['deepcache'][1]}; {type(pipe).__name__} has no U-Net")
        try:
            import DeepCache  # noqa: F401
        except ImportError:
            raise ValueError("cache deepcache needs the DeepCache package: pip install DeepCache") from None
        return
    denoiser = getattr(pipe, "transformer", None) or getattr(pipe, "unet", None)
    if not hasattr(denoiser, "enable_cache"):
        raise ValueError(f"cache {spec.name} needs {CACHES[spec.name][1]}; {type(denoiser).__name__} has none"
                         + (": use deepcache on a U-Net" if getattr(pipe, "unet", None) is not None else ""))


@contextlib.contextmanager
def cache_enabled(spec: CacheSpec, pipe) -> Iterator[None]:
    """``spec``'s cache on ``pipe`` (a pipeline, or an object with ``unet`` and ``scheduler``) for a ``with`` block."""
    check(spec, pipe)
    if spec.name == "deepcache":
        from DeepCache import DeepCacheSDHelper

        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=option(spec, "interval"), cache_branch_id=option(spec, "branch"))
        helper.enable()
        try:
            yield
        finally:
            helper.disable()
        return
    denoiser = getattr(pipe, "transformer", None) or pipe.unet
    denoiser.enable_cache(diffusers_config(spec, pipe))
    try:
        yield
    finally:
        denoiser.disable_cache()


def diffusers_config(spec: CacheSpec, pipe):
    from diffusers import hooks

    if spec.name == "first-block":
        return hooks.FirstBlockCacheConfig(threshold=option(spec, "threshold"))
    if spec.name == "pab":
        return hooks.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=option(spec, "skip"), spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: getattr(pipe, "current_timestep", None) or 500)
    return hooks.TaylorSeerCacheConfig(cache_interval=option(spec, "interval"),
                                       disable_cache_before_step=option(spec, "warmup"), use_lite_mode=True)
