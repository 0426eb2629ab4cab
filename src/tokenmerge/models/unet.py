"""Stable Diffusion U-Nets (SD 1.x, SD 2.x, SDXL): ``UNet2DConditionModel``.

Level ``l`` of the U-Net works on a ``ceil(H / 2^l) x ceil(W / 2^l)`` grid of the ``H x W`` latent
(every downsampler is a stride-2 convolution with padding 1). ``down_blocks[i]`` runs at level ``i``,
the mid block at the lowest level and ``up_blocks[i]`` at level ``L - 1 - i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class PatchTarget:
    """One transformer block to patch and the U-Net level it runs at."""

    name: str
    block: nn.Module
    level: int


class UNetAdapter:
    description = "UNet2DConditionModel (SD 1.x, SD 2.x, SDXL)"

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self.num_levels = len(denoiser.down_blocks)

    @staticmethod
    def handles(denoiser: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(denoiser, UNet2DConditionModel)

    def all_targets(self) -> list[PatchTarget]:
        """Every ``BasicTransformerBlock`` with the level it runs at."""
        unet = self.denoiser
        depth = len(unet.down_blocks)
        stages = [(block, i) for i, block in enumerate(unet.down_blocks)]
        if unet.mid_block is not None:
            stages.append((unet.mid_block, depth - 1))
        stages += [(block, depth - 1 - i) for i, block in enumerate(unet.up_blocks)]
        names = {id(module): name for name, module in unet.named_modules()}
        targets = []
        for stage, level in stages:
            for module in stage.modules():
                if type(module).__name__ == "BasicTransformerBlock":
                    targets.append(PatchTarget(names[id(module)], module, level))
        return targets

    def targets(self, levels_from_top: int) -> list[PatchTarget]:
        """Blocks of the ``levels_from_top`` highest-resolution levels that have attention."""
        found = self.all_targets()
        if not found:
            return []
        first = min(t.level for t in found)
        return [t for t in found if t.level - first < levels_from_top]

    @staticmethod
    def grid(latent_hw: tuple[int, int], target: PatchTarget, num_tokens: int) -> tuple[int, int]:
        height, width = latent_hw
        for _ in range(target.level):
            height, width = (height + 1) // 2, (width + 1) // 2
        if height * width != num_tokens:
            raise RuntimeError(
                f"tokenmerge: block {target.name} got {num_tokens} tokens but a {latent_hw[0]}x{latent_hw[1]} "
                f"latent gives a {height}x{width} grid at level {target.level}; this U-Net layout is not supported"
            )
        return height, width

    @staticmethod
    def read_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor, object]:
        """The latent ``(B, C, H, W)`` and the timestep from the denoiser call."""
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        return sample, timestep

    @staticmethod
    def prediction(output: object) -> torch.Tensor:
        """The predicted noise ``(B, C, H, W)`` from the denoiser's return value."""
        return output[0] if isinstance(output, (tuple, list)) else output.sample

    # Every output channel is noise (no learned-variance channels on SD U-Nets).
    importance_channels = slice(None)
