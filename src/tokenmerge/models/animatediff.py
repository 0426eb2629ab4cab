"""AnimateDiff: ``UNetMotionModel``, an SD U-Net with motion modules, on 5-D latents ``(B, C, F, H, W)``.

Spatial blocks see the frames folded into the batch (row ``b * F + f``), so every method merges each frame on
its own grid, exactly as on an image U-Net; with CFG the batch is ``[uncond frames; cond frames]`` and a frame
shares its plan with its own unconditional twin. CFG importance is per frame: the prediction is folded the
same way, so ``|eps_cond - eps_uncond|`` is a ``(B/2 * F, H, W)`` map, one per frame.

Temporal merging (motion modules: the tokens of one latent pixel are its ``F`` frames) is off by default, as
merging in time reduces motion (Sec. 4, Tab. 5 uses 0.2). ``temporal_ratio > 0`` merges frames in the
temporal self-attentions (``attn1`` and ``attn2``) of the motion modules at the same levels as the spatial
merging, with ToMe's matching along time: one destination per pair of consecutive frames (random within the
pair), the ``int(F * temporal_ratio)`` frames most similar to their destination merged into it. The method's
own rule (importance pool, pruning) is spatial only; the paper does not say how it merged in time.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..hooks import BlockPatch
from ..methods.base import PlanContext
from ..methods.tome import cell_matching
from ..plan import DEVICE_RNG, MergePlan, plan_from_matching
from .base import ExampleShape, PatchTarget
from .unet import UNetAdapter, unet_targets

#: Frames per video of the example inputs (the motion adapters' training length).
VIDEO_FRAMES = 16


def _is_motion(name: str) -> bool:
    return ".motion_modules." in name


class AnimateDiffAdapter(UNetAdapter):
    family = "animatediff"
    description = "UNetMotionModel (AnimateDiff, 5-D video latents)"
    #: Attention and motion modules at levels 0 and 1.
    tiny_configs = {"animatediff": dict(
        _class_name="UNetMotionModel", sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        norm_num_groups=16, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=32, num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=16,
    )}

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(denoiser)
        self.family = "animatediff"

    @staticmethod
    def handles(denoiser: nn.Module) -> bool:
        from diffusers import UNetMotionModel

        return isinstance(denoiser, UNetMotionModel)

    def all_targets(self) -> list[PatchTarget]:
        """The spatial transformer blocks (motion modules excluded)."""
        return unet_targets(self.unet, keep=lambda name: not _is_motion(name))

    def temporal_targets(self, config) -> list[PatchTarget]:
        if config.temporal_ratio <= 0:
            return []
        levels = {t.level for t in self.targets(config)}
        return [dataclasses.replace(t, temporal=True) for t in unet_targets(self.unet, keep=_is_motion)
                if t.level in levels]

    def check(self, config) -> None:
        if config.layers is not None:
            super().check(config)  # raises: layers is for transformers

    def submodules(self, config, target: PatchTarget) -> list[nn.Module]:
        if target.temporal:  # both attentions of a motion module are self-attention over the frames
            return target.modules((target.kind.self_attention, target.kind.cross_attention))
        return super().submodules(config, target)

    def make_patch(self, state, target: PatchTarget):
        return TemporalPatch(state, target) if target.temporal else BlockPatch(state, target)

    def grid(self, latent_hw: tuple[int, int], target: PatchTarget, num_tokens: int) -> tuple[int, int]:
        if target.temporal:
            return num_tokens, 1  # the frames of one latent pixel, a column
        return super().grid(latent_hw, target, num_tokens)

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """A 5-D latent ``(batch, C, frames, H, W)`` of ``VIDEO_FRAMES`` frames; the text states as the installed
        ``AnimateDiffPipeline`` passes them (:func:`text_per_frame`)."""
        config = self.unet.config
        latent = s.randn(s.batch, config.in_channels, VIDEO_FRAMES, *s.latent)
        return (latent, torch.tensor(500), text_per_frame(s.text(config.cross_attention_dim), VIDEO_FRAMES)), {}

    @staticmethod
    def prediction(output: object) -> torch.Tensor:
        """The noise ``(B, C, F, H, W)`` folded as the spatial blocks see it: ``(B * F, C, H, W)``."""
        eps = output[0] if isinstance(output, (tuple, list)) else output.sample
        batch, channels, frames, height, width = eps.shape
        return eps.transpose(1, 2).reshape(batch * frames, channels, height, width)


def text_per_frame(text: torch.Tensor, frames: int) -> torch.Tensor:
    """Text states ``(videos, L, D)`` as ``UNetMotionModel`` takes them: repeated per frame (``videos * frames``
    rows) since diffusers 0.31, whose pipeline repeats them; before, the model repeated them itself."""
    from diffusers import __version__

    before_0_31 = tuple(int(part) for part in __version__.split(".")[:2]) < (0, 31)
    return text if before_0_31 else text.repeat_interleave(frames, dim=0)


class TemporalPatch(BlockPatch):
    """A motion-module block: ToMe's matching along the frames, at ``config.temporal_ratio``."""

    def _build_plan(self, x: torch.Tensor) -> MergePlan | None:
        state = self.state
        ctx = PlanContext(grid=(x.shape[1], 1), generator=DEVICE_RNG, block=self.target.name,
                          level=self.target.level, stage=self.target.stage)
        with torch.no_grad():
            matching = cell_matching(x.detach(), ctx, state.config.temporal_ratio, sx=1, sy=2, use_rand=True)
        return None if matching is None else plan_from_matching(*matching, x.shape[1])
