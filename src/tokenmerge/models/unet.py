"""Stable Diffusion U-Nets (SD 1.x, SD 2.x, SDXL; LCM): ``UNet2DConditionModel``.

Level ``l`` of the U-Net works on a ``ceil(H / 2^l) x ceil(W / 2^l)`` grid of the ``H x W`` latent
(every downsampler is a stride-2 convolution with padding 1). ``down_blocks[i]`` runs at level ``i``,
the mid block at the lowest level and ``up_blocks[i]`` at level ``L - 1 - i``.

A U-Net with a guidance embedding (``time_cond_proj_dim``: latent consistency models) is the ``"lcm"``
family: it runs without classifier-free guidance, so its preset takes importance from cross-attention.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arguments import Signature
from .base import Adapter, ExampleShape, PatchTarget
from .blocks import find_blocks

__all__ = ["PatchTarget", "TINY_CONFIGS", "UNetAdapter", "unet_targets"]

_TINY_BASE = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                  norm_num_groups=16, block_out_channels=(32, 64, 64))
_SD = dict(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
#: Tiny random-weight U-Nets of each architecture, for tests and ``bench --tiny``: SD 1.x (conv projections, 8-dim
#: heads), SD 2.x (linear projections, per-level heads), SDXL (no attention at the top level, two text encoders,
#: added conditions) and LCM (SD 1.x with a guidance embedding).
TINY_CONFIGS = {
    "sd1": dict(_TINY_BASE, **_SD, attention_head_dim=8),
    "sd2": dict(_TINY_BASE, **_SD, attention_head_dim=(2, 4, 8), use_linear_projection=True),
    "sdxl": dict(
        _TINY_BASE,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
        cross_attention_dim=64,  # two text encoders of width 32, concatenated
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
    "lcm": dict(_TINY_BASE, **_SD, attention_head_dim=8, time_cond_proj_dim=16),  # LCM_Dreamshaper_v7: 256
}


def unet_targets(unet: nn.Module, keep=lambda name: True) -> list[PatchTarget]:
    """Every transformer block (:mod:`.blocks`) of a U-Net whose name passes ``keep``, with its level and stage."""
    depth = len(unet.down_blocks)
    stages = [(f"down_blocks.{i}", block, i, "down") for i, block in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        stages.append(("mid_block", unet.mid_block, depth - 1, "mid"))
    stages += [(f"up_blocks.{i}", block, depth - 1 - i, "up") for i, block in enumerate(unet.up_blocks)]
    return [PatchTarget(name, block, level, stage, level == depth - 1, kind=kind)
            for path, module, level, stage in stages for name, block, kind in find_blocks(module, keep, path)]


class UNetAdapter(Adapter):
    description = "UNet2DConditionModel (SD 1.x, SD 2.x, SDXL, LCM)"
    tiny_configs = TINY_CONFIGS

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(denoiser)
        self.unet = denoiser
        if getattr(denoiser.config, "time_cond_proj_dim", None):
            self.family = "lcm"
            self.guided = False  # a consistency model runs without classifier-free guidance

    @staticmethod
    def handles(denoiser: nn.Module) -> bool:
        from diffusers import UNet2DConditionModel

        return isinstance(denoiser, UNet2DConditionModel)

    def all_targets(self) -> list[PatchTarget]:
        """Every transformer block with the level it runs at."""
        return unet_targets(self.unet)

    def targets(self, config) -> list[PatchTarget]:
        """Blocks of the ``max_downsample`` highest-resolution levels that have attention."""
        found = self.all_targets()
        if not found:
            return []
        first = min(t.level for t in found)
        levels = config.max_downsample_levels()
        return [t for t in found if t.level - first < levels]

    def install(self, state) -> None:
        """Refuse a call from a reference-attention wrapper made after the U-Net was patched on its own (Zero123++
        wraps its U-Net inside its first call): the plain patch would merge the reference pass too, silently."""
        signature = Signature.of(self.unet)

        def refuse_reference_wrapper(module, args, kwargs):
            options = signature.read(args, kwargs, "cross_attention_kwargs")
            if isinstance(options, dict) and "ref_dict" in options:
                raise ValueError(
                    f"tokenmerge: this {type(module).__name__} was patched on its own but now runs inside a "
                    "reference-attention wrapper (Zero123++'s RefOnlyNoisedUNet: its calls carry mode/ref_dict), "
                    "whose reference pass must not be merged. Patch the pipeline, tokenmerge.apply(pipe, config), or "
                    "the wrapper: tokenmerge.remove(pipe); pipe.prepare(); tokenmerge.apply(pipe.unet, config)."
                )

        state.handles.append(self.unet.register_forward_pre_hook(refuse_reference_wrapper, with_kwargs=True))

    def check(self, config) -> None:
        if config.layers is not None:
            raise ValueError(
                f"tokenmerge: {type(config).__name__}.layers places merging in transformer denoisers (PixArt, DiT); "
                f"{type(self.denoiser).__name__} is a U-Net: leave layers=None and use max_downsample"
            )
        super().check(config)

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

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """Latent, CPU timestep, CLIP states; SDXL adds its pooled embedding and size ids, LCM its guidance embedding.

        The timestep is a CPU tensor: tokenmerge's step clock reads it without a device-to-host sync, and the U-Net
        copies it to the device first thing in its forward.
        """
        config, kwargs = self.unet.config, {}
        if config.addition_embed_type == "text_time":  # SDXL: pooled text embedding and 6 size/crop ids
            pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
            time_ids = torch.tensor([s.height, s.width, 0, 0, s.height, s.width], dtype=s.dtype, device=s.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": s.randn(s.batch, pooled),
                                           "time_ids": time_ids.expand(s.batch, 6)}
        if getattr(config, "time_cond_proj_dim", None):  # LCM: the guidance-scale embedding
            kwargs["timestep_cond"] = s.randn(s.batch, config.time_cond_proj_dim)
        latent = s.randn(s.batch, config.in_channels, *s.latent)
        return (latent, torch.tensor(500), s.text(config.cross_attention_dim)), kwargs
