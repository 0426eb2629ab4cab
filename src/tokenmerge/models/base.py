"""What every model adapter shares: the patch target, and the defaults an adapter may override.

An adapter answers, for one denoiser family: which transformer blocks to patch (and at which level of
resolution), the token grid of a block, how to read the latent and timestep from the denoiser call, where
the predicted noise is in its output, and which family preset (:mod:`tokenmerge.presets`) applies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PatchTarget:
    """One transformer block to patch and the level of resolution it runs at.

    ``temporal``: a motion-module block of a video U-Net, whose tokens are the frames of one latent pixel.
    """

    name: str
    block: nn.Module
    level: int
    temporal: bool = False


class Adapter:
    """Defaults shared by the adapters; each family overrides what differs."""

    #: Key of the family in :data:`tokenmerge.presets.PRESETS`.
    family = "sd"
    description = ""
    #: Output channels that are noise (the rest, e.g. a learned variance, are left out of CFG importance).
    importance_channels = slice(None)
    #: True when the family's CFG batch is ``[cond; uncond]`` (DiT) rather than ``[uncond; cond]``.
    cond_first = False
    num_levels = 1

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser

    @staticmethod
    def handles(denoiser: nn.Module) -> bool:  # pragma: no cover
        raise NotImplementedError

    def all_targets(self) -> list[PatchTarget]:  # pragma: no cover
        raise NotImplementedError

    def targets(self, config) -> list[PatchTarget]:  # pragma: no cover
        """The blocks ``config`` patches (its placement fields, read the family's way)."""
        raise NotImplementedError

    def temporal_targets(self, config) -> list[PatchTarget]:
        """Motion-module blocks to merge in time (video families only)."""
        return []

    def check(self, config) -> None:
        """Raise ``ValueError`` for a config field that has no meaning on this family."""
        if config.temporal_ratio > 0:
            raise ValueError(
                f"tokenmerge: {type(config).__name__}.temporal_ratio={config.temporal_ratio} merges frames in the "
                f"temporal layers of a video model, but {type(self.denoiser).__name__} has none; leave it at 0"
            )

    def install(self, state) -> None:
        """Hooks of the family's own, beyond the blocks' (their handles go to ``state.handles``)."""

    def submodules(self, config, target: PatchTarget) -> list[nn.Module]:
        """The submodules of ``target`` that ``config`` merges around (``attn1``, ``attn2``, ``ff``)."""
        wanted = (("attn1", config.merge_attn), ("attn2", config.merge_crossattn), ("ff", config.merge_mlp))
        return [getattr(target.block, name) for name, on in wanted if on and getattr(target.block, name, None) is not None]

    def make_patch(self, state, target: PatchTarget):
        """The hook set of one target (a family may skip calls, e.g. Zero123++'s reference pass)."""
        from ..hooks import BlockPatch

        return BlockPatch(state, target)

    def skips_call(self) -> bool:
        """True while the denoiser runs a pass that must not be merged (Zero123++'s reference image)."""
        return False

    def importance_target(self) -> PatchTarget:
        """The final transformer block with cross-attention, whose map is ``importance="crossattn"``."""
        for target in reversed(self.all_targets()):
            attn2 = getattr(target.block, "attn2", None)
            if attn2 is not None and getattr(attn2, "is_cross_attention", False):
                return target
        raise ValueError(
            f"tokenmerge: importance='crossattn' reads the cross-attention map of the final transformer block, but "
            f"{type(self.denoiser).__name__} has no cross-attention (e.g. DiT is class-conditional). Use "
            "importance='cfg' (with classifier-free guidance) or pass a map: importance=<tensor or callable>."
        )

    @staticmethod
    def read_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
        """The latent and the timestep from the denoiser call ``(sample, timestep, ...)``."""
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return sample, timestep

    @staticmethod
    def prediction(output: object) -> torch.Tensor:
        """The predicted noise ``(B, C, H, W)`` from the denoiser's return value."""
        return output[0] if isinstance(output, (tuple, list)) else output.sample


def default_of(config, name: str):
    """The class default of field ``name`` of a method config."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)
