"""Per-family defaults: the settings the importance paper (Sec. 4.1, Appendix B) used on each model family.

``tokenmerge.apply(pipe, config)`` resolves the config against the preset of the denoiser's family: every field
the caller did not pass takes the preset's value (or, where the preset says nothing, the method's default); a field
passed explicitly is never overridden. ``"*"`` holds what applies to every method (placement), a method's name
(:data:`tokenmerge.methods.METHODS`) what applies to that method only.

>>> tokenmerge.presets.resolve(tokenmerge.ImportanceMerge(ratio=0.5), "animatediff")
ImportanceMerge(ratio=0.5, pool=0.8, ..., prune_steps=0.1333...)

=============  =========================================================================================
family         preset (paper)
=============  =========================================================================================
sd             none: the method defaults are the paper's SD settings
lcm            ImportanceMerge: ``importance="crossattn"`` (no CFG in a consistency model; App. A, Tab. 11)
pixart         blocks 7-20 of 28 (``layers=(0.25, 0.75)``), self- and cross-attention merged;
               ImportanceMerge and ToMe match by grid distance (App. B)
dit            not in the paper: PixArt's placement (middle half, self-attention; DiT has no cross-attention)
animatediff    ImportanceMerge: ``pool=0.8``, pruning in the first 4 of 30 steps; temporal merging off
zero123pp      first two and last two U-Net blocks (``max_downsample=2``); ImportanceMerge: ``pool=0.6``,
               pruning in the first 10 of 50 steps; one key per merged slot (``proportional_attention=False``:
               its reference attention extends the keys inside its own processor)
sd3            not in the paper: every block's attention (measured FLOPs and one-step error, docs/models.md), one
               key per merged slot (``proportional_attention=False``: the joint attention takes no mask)
flux           not in the paper: every block's attention in both streams (the same measurement), one key per slot;
               ImportanceMerge: ``importance="crossattn"`` from the joint attention (guidance-distilled: no CFG batch)
wan            every block's self-attention (the same measurement), each frame on its own grid, one key per slot;
               ImportanceMerge: the paper's video settings (AnimateDiff's): ``pool=0.8``, pruning in the first 4/30
=============  =========================================================================================
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

from .methods.base import MethodConfig, _same, config_fields, default_of

PRESETS: dict[str, dict[str, dict[str, object]]] = {
    "sd": {},
    "lcm": {"importance": {"importance": "crossattn"}},
    "pixart": {
        "*": {"layers": (0.25, 0.75), "merge_crossattn": True},
        "importance": {"match": "grid"},
        "tome": {"match": "grid"},
    },
    "dit": {"*": {"layers": (0.25, 0.75)}},
    "animatediff": {"importance": {"pool": 0.8, "prune_steps": 4 / 30}},
    # Its reference attention appends the reference tokens to the keys inside its processor: one key per slot.
    "zero123pp": {"*": {"max_downsample": 2, "proportional_attention": False},
                  "importance": {"pool": 0.6, "prune_steps": 10 / 50}},
    # Every block's attention: the placement with the most FLOPs per unit of one-step error measured
    # (benchmarks/placement_flops.py, placement_fidelity.py; docs/models.md). The joint attention
    # (JointAttnProcessor2_0) takes no attention mask: one key per slot.
    "sd3": {"*": {"layers": (0.0, 1.0), "proportional_attention": False}},
    # The same measurement and the same joint attention (FluxAttnProcessor); no CFG batch: importance from the joint
    # attention's share of the text.
    "flux": {"*": {"layers": (0.0, 1.0), "proportional_attention": False}, "importance": {"importance": "crossattn"}},
    # Every block's self-attention (measured as SD3's and FLUX's), per frame; the paper's video settings for
    # ImportanceMerge (AnimateDiff: pool 0.8, pruning in the first 4 of 30 steps); one key per slot
    # (WanAttnProcessor passes the mask unshaped).
    "wan": {"*": {"layers": (0.0, 1.0), "proportional_attention": False},
            "importance": {"pool": 0.8, "prune_steps": 4 / 30}},
}


def preset(family: str, method: type[MethodConfig] | MethodConfig) -> dict[str, object]:
    """The field values the family's preset gives ``method`` (a config class or instance)."""
    if family not in PRESETS:
        raise ValueError(f"unknown model family {family!r}; known families: {', '.join(PRESETS)}")
    cls = method if isinstance(method, type) else type(method)
    names = {f.name for f in config_fields(cls)}
    table = PRESETS[family]
    values = {**table.get("*", {}), **table.get(cls.name, {})}
    return {name: value for name, value in values.items() if name in names}


def resolve(config: MethodConfig, family: str) -> MethodConfig:
    """``config`` with every field the caller left out set from the family's preset, else to the method's default.

    The same object when nothing changes. Resolving a resolved config for another family gives what resolving the
    original would: the preset's fields stay "not given".
    """
    not_given = config.not_given()
    values = preset(family, config)
    target = {name: values.get(name, default_of(config, name)) for name in not_given}
    changes = {name: value for name, value in target.items() if not _same(getattr(config, name), value)}
    if not changes:
        return config
    resolved = dataclasses.replace(config, **changes)
    object.__setattr__(resolved, "_not_given", MappingProxyType(target))
    return resolved
