"""Caching accelerators stacked with merging: what each does to the parts tokenmerge merges around.

Caches reuse work across steps; merging cuts the work of each step. Where they meet, a part's output:

* is not computed because its whole block is skipped (DeepCache's deep branch, diffusers' ``FirstBlockCache`` and
  ``MagCache``, TaylorSeer's inactive blocks): nothing to do. A skipped block builds no plan (plans are built when a
  part first needs one), and its output never passes through a merge;
* is an earlier call's output handed back as it was (``PyramidAttentionBroadcast``): it was merged under that call's
  plan, so it is unmerged with that plan (``hooks.BlockPatch._plan_of``), exactly what broadcasting the attention of
  a merged model means;
* is extrapolated from several earlier outputs (TaylorSeer on a part, FasterCache's attention approximation): those
  outputs hold tokens merged under different plans, so no plan can unmerge their combination. Refused, naming what
  stacks instead.

:func:`scan` looks at the merged parts when ``apply`` runs and at every denoiser call (a cache may be enabled after
``apply``), outside any compiled graph.

diffusers keeps its hooks in ``module._diffusers_hook`` (a ``HookRegistry`` replacing the module's ``forward``);
tokenmerge's hooks are torch hooks around that ``forward``, so both run in either order of enabling and each is
removed without touching the other.
"""

from __future__ import annotations

from torch import nn

#: diffusers' name for the hook that hands back an earlier output as it was.
REUSING_HOOK = "pyramid_attention_broadcast"
#: diffusers' names for hooks that extrapolate a module's output from earlier ones, with the cache's name.
EXTRAPOLATING_HOOKS = {"taylorseer_cache": "TaylorSeer", "faster_cache_block": "FasterCache"}


def _hook(module: nn.Module, name: str) -> object | None:
    registry = module.__dict__.get("_diffusers_hook")
    return None if registry is None else registry.hooks.get(name)


def reuses_outputs(module: nn.Module) -> bool:
    """Whether a cache may hand back an earlier output of ``module`` as it was (PyramidAttentionBroadcast)."""
    return _hook(module, REUSING_HOOK) is not None


def extrapolating_cache(module: nn.Module) -> str | None:
    """The name of a cache that extrapolates ``module``'s output from earlier steps, or None. TaylorSeer's inactive
    modules (its lite mode's blocks) are skipped whole, not extrapolated."""
    for hook_name, cache in EXTRAPOLATING_HOOKS.items():
        hook = _hook(module, hook_name)
        if hook is None:
            continue
        inactive = getattr(getattr(hook, "state_manager", None), "_init_kwargs", {}).get("is_inactive", False)
        if not inactive:
            return cache
    return None


def scan(parts: dict[nn.Module, tuple[str, str]]) -> frozenset[nn.Module]:
    """The parts whose earlier outputs a cache may hand back; raises if a cache extrapolates a part's output.

    ``parts``: the parts tokenmerge merges around, module -> (its name, the config field that leaves it whole)."""
    for module, (name, field) in parts.items():
        cache = extrapolating_cache(module)
        if cache is None:
            continue
        raise ValueError(
            f"tokenmerge: {cache} is enabled on {name}, which tokenmerge merges: {cache} extrapolates its output from "
            "earlier steps, whose tokens were merged under other plans, so the result would be meaningless. Stack a "
            "cache that skips whole blocks or reuses outputs as they were (DeepCache, FirstBlockCache, MagCache, "
            "PyramidAttentionBroadcast, TaylorSeerCacheConfig(use_lite_mode=True)), keep the cache off the merged "
            f"parts (its identifiers), or leave this part whole ({field}=False)."
        )
    return frozenset(module for module in parts if reuses_outputs(module))
