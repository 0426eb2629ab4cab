"""Diffusion transformers: PixArt-alpha/Sigma (``PixArtTransformer2DModel``) and DiT (``DiTTransformer2DModel``).

Both are a stack of ``BasicTransformerBlock``s on one ``H/p x W/p`` grid of patch tokens (patch size ``p``)
with AdaLN conditioning: PixArt's ``ada_norm_single`` (timestep) plus text cross-attention, DiT's
``ada_norm_zero`` (timestep and class label) and no cross-attention. The per-channel gates act the same on an
unmerged output, so merging around ``attn1``/``attn2``/``ff`` is exact with respect to the block's arithmetic.

Placement: ``layers=(start, end)`` patches block ``i`` of ``L`` when ``start * L <= i < end * L``; the
PixArt and DiT presets use the middle half, ``(0.25, 0.75)`` (7-20 of PixArt's 28 blocks, Sec. 4.1).
Both predict a learned variance next to the noise (``out_channels = 2 * in_channels``); CFG importance
uses the noise channels only, pooled to the patch grid like every importance map.
DiT's pipeline batches CFG as ``[cond; uncond]`` (class labels, then the null class 1000): ``cond_first``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..methods.base import default_of
from .base import Adapter, ExampleShape, PatchTarget
from .blocks import find_blocks


class TransformerAdapter(Adapter):
    """Shared by the DiT-style families: blocks by fraction of depth, patch grid, learned-sigma channels."""

    family = "pixart"
    class_name = ""
    latent_argument = "hidden_states"
    #: The processor of a joint image-text attention (SD3, FLUX), which takes no attention mask for a size bias and
    #: computes the image keys from the image tokens themselves; None: attention over the image tokens alone.
    joint_attention: str | None = None

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(denoiser)
        self.patch_size = denoiser.config.patch_size
        self.importance_channels = slice(0, denoiser.config.in_channels)

    @classmethod
    def handles(cls, denoiser: nn.Module) -> bool:
        import diffusers

        model_class = getattr(diffusers, cls.class_name, None)  # None: a family newer than the installed diffusers
        return model_class is not None and isinstance(denoiser, model_class)

    def all_targets(self) -> list[PatchTarget]:
        return [PatchTarget(name, block, 0, kind=kind)
                for name, block, kind in find_blocks(self.denoiser.transformer_blocks, prefix="transformer_blocks")]

    def targets(self, config) -> list[PatchTarget]:
        found = self.all_targets()
        start, end = config.layers if config.layers is not None else (0.0, 1.0)
        first, stop = block_range(start, end, len(found))
        return found[first:stop]

    def check(self, config) -> None:
        name = type(config).__name__
        if self.joint_attention and (config.proportional_attention or not config.merge_queries):
            raise ValueError(
                f"tokenmerge: {name}(proportional_attention={config.proportional_attention}, merge_queries="
                f"{config.merge_queries}) cannot run on {type(self.denoiser).__name__}: its joint attention "
                f"({self.joint_attention}) takes no attention mask for a size bias and computes the image keys from "
                "the image tokens themselves. Use proportional_attention=False and merge_queries=True (the family "
                "preset)."
            )
        if "max_downsample" in config.explicit_fields() and config.max_downsample != default_of(config, "max_downsample"):
            raise ValueError(
                f"tokenmerge: {name}.max_downsample counts U-Net levels, but {type(self.denoiser).__name__} is a "
                "transformer on one grid: place merging with layers=(start, end) instead, e.g. layers=(0.25, 0.75)"
            )
        super().check(config)

    def example_inputs(self, size: int | tuple[int, int], *args, **kwargs) -> tuple[tuple, dict]:
        height, width = (size, size) if isinstance(size, int) else size
        step = 8 * self.patch_size
        if height % step or width % step:
            raise ValueError(f"{type(self.denoiser).__name__}: size {size} is not a multiple of {step} pixels "
                             f"(VAE factor 8 x patch size {self.patch_size})")
        return super().example_inputs(size, *args, **kwargs)

    def grid(self, latent_hw: tuple[int, int], target: PatchTarget, num_tokens: int) -> tuple[int, int]:
        height, width = latent_hw[0] // self.patch_size, latent_hw[1] // self.patch_size
        if height * width != num_tokens:
            raise RuntimeError(
                f"tokenmerge: block {target.name} got {num_tokens} tokens but a {latent_hw[0]}x{latent_hw[1]} latent "
                f"in patches of {self.patch_size} gives a {height}x{width} grid"
            )
        return height, width


def block_range(start: float, end: float, num_blocks: int) -> tuple[int, int]:
    """``[first, stop)`` block indices for the fraction range ``[start, end)`` of ``num_blocks``."""
    # The epsilon absorbs float error: 0.75 * 28 must give 21, not 22.
    return math.ceil(start * num_blocks - 1e-9), math.ceil(end * num_blocks - 1e-9)


class PixArtAdapter(TransformerAdapter):
    family = "pixart"
    class_name = "PixArtTransformer2DModel"
    description = "PixArtTransformer2DModel (PixArt-alpha, PixArt-Sigma)"
    text_tokens = 120  # T5
    #: ``ada_norm_single``, T5-width captions, learned sigma, few channels.
    tiny_configs = {"pixart": dict(
        _class_name="PixArtTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=8, num_layers=4, cross_attention_dim=16, attention_bias=True, sample_size=16, patch_size=2,
        activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
        norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32,
    )}

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """Latent, T5 states, timestep, and the resolution / aspect-ratio conditions."""
        config = self.denoiser.config
        conditions = {"resolution": torch.tensor([[s.height, s.width]] * s.batch, dtype=s.dtype, device=s.device),
                      "aspect_ratio": torch.ones(s.batch, 1, dtype=s.dtype, device=s.device)}
        timestep = torch.full((s.batch,), 500, device=s.device)
        return (s.randn(s.batch, config.in_channels, *s.latent), s.text(config.caption_channels), timestep), {
            "added_cond_kwargs": conditions}


class DiTAdapter(TransformerAdapter):
    family = "dit"
    class_name = "DiTTransformer2DModel"
    description = "DiTTransformer2DModel (DiT, class-conditional)"
    cond_first = True
    #: ``ada_norm_zero``, class-conditional, learned sigma, few channels.
    tiny_configs = {"dit": dict(
        _class_name="DiTTransformer2DModel", num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=8, num_layers=4, sample_size=16, patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=16,
    )}

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """Class-conditional, ``[cond; null class]`` as ``DiTPipeline`` batches it."""
        images = s.batch // 2
        labels = torch.tensor([1] * images + [1000] * images, device=s.device)
        latent = s.randn(s.batch, self.denoiser.config.in_channels, *s.latent)
        return (latent, torch.full((s.batch,), 500, device=s.device), labels), {}

