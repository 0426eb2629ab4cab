"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): one sequence of ``frames x H x W`` video tokens, 3-D rotary positions.

Each ``WanTransformerBlock`` runs a self-attention (``attn1``) over the tokens of every frame, rotated by 3-D rotary
rows (``rotary_emb``: time, height, width), a cross-attention to the text (``attn2``; Wan's image-to-video models
add the CLIP image tokens to its keys) and an MLP (``ffn``); the AdaLN modulation (one per video, or per token in
Wan 2.2 TI2V) acts outside them, so merging around the three keeps the block's arithmetic.

* Plans: the methods plan per frame, on the frame's ``H/2 x W/2`` patch grid, or per group of frames with
  ``frames_per_cell`` (:mod:`tokenmerge.frames`); attention then runs over the kept tokens of every frame.
* Rotary: the processor broadcasts its rows against the queries, so a merged call is given each kept token's own
  row (:func:`tokenmerge.rotary.kept_rows`): a kept token sits at its own time, row and column.
* CFG: ``WanPipeline`` runs the conditional and unconditional predictions as two calls per step; the second reuses
  the first's plans, and ``importance="cfg"`` is ``|cond - uncond|`` across them, per frame.
* Wan 2.2 A14B's two experts (``transformer`` for the high-noise steps, ``transformer_2`` for the rest) are patched
  together: one step clock, one importance signal, the same placement in each.

Keys are one per merged slot and queries are merged: the processor passes the attention mask to the kernel without
shaping it, and rotates queries and keys by the same rows (size-aware keys and K/V-only raise). Needs diffusers >=
0.35 (``WanAttention``, rotary rows as ``(cos, sin)``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..frames import FrameLayout
from .base import ExampleShape, PatchTarget
from .blocks import find_blocks
from .transformer import TransformerAdapter, block_range

#: Wan's UMT5 prompt length (the pipeline pads the prompt to it).
WAN_TEXT_TOKENS = 512
#: Video frames of the example inputs (Wan 2.1's 81 at 16 fps: 21 latent frames).
VIDEO_FRAMES = 81


class WanAdapter(TransformerAdapter):
    family = "wan"
    class_name = "WanTransformer3DModel"
    description = "WanTransformer3DModel (Wan 2.1, Wan 2.2 with both experts, diffusers >= 0.35)"
    guided = False  # WanPipeline runs CFG as two calls
    holds_frames = True
    text_tokens = WAN_TEXT_TOKENS
    #: diffusers' fast-test layout (2 heads of 12, 3-D rotary axes 4+4+4), 4 blocks.
    tiny_configs = {"wan": dict(
        _class_name="WanTransformer3DModel", patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
        in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=4, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )}

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(denoiser)
        self.patch_size = tuple(denoiser.config.patch_size)  # (frames, height, width)
        self.importance_channels = slice(None)
        self.second_expert: nn.Module | None = None  # Wan 2.2's transformer_2
        self.frames = 1  # latent frames of the current call, per patch of time

    def attach(self, pipeline: object) -> None:
        second = getattr(pipeline, "transformer_2", None)
        if isinstance(second, nn.Module) and second is not self.denoiser:
            if not isinstance(second, type(self.denoiser)) or second.config.patch_size != self.denoiser.config.patch_size:
                raise ValueError(
                    f"tokenmerge: the pipeline's second expert (transformer_2: {type(second).__name__}) is not a "
                    f"{type(self.denoiser).__name__} of the same patch size: its steps would run unmerged"
                )
            self.second_expert = second

    @property
    def experts(self) -> tuple[nn.Module, ...]:
        return (self.denoiser,) if self.second_expert is None else (self.denoiser, self.second_expert)

    @property
    def call_sites(self) -> tuple[nn.Module, ...]:
        return self.experts

    def all_targets(self) -> list[PatchTarget]:
        return [target for expert in range(len(self.experts)) for target in self._expert_targets(expert)]

    def _expert_targets(self, expert: int) -> list[PatchTarget]:
        prefix = "blocks" if expert == 0 else "transformer_2.blocks"
        found = [PatchTarget(name, block, 0, kind=kind)
                 for name, block, kind in find_blocks(self.experts[expert].blocks, prefix=prefix)]
        if not found:
            raise ValueError(
                "tokenmerge: Wan merging needs diffusers >= 0.35 (WanAttention, rotary rows as (cos, sin)); upgrade "
                "diffusers"
            )
        return found

    def targets(self, config) -> list[PatchTarget]:
        """``layers`` of each expert's depth."""
        start, end = config.layers if config.layers is not None else (0.0, 1.0)
        placed = []
        for expert in range(len(self.experts)):
            found = self._expert_targets(expert)
            first, stop = block_range(start, end, len(found))
            placed += found[first:stop]
        return placed

    def importance_targets(self) -> list[PatchTarget]:
        """Each expert's last block: ``importance="crossattn"`` reads its text cross-attention."""
        return [self._expert_targets(expert)[-1] for expert in range(len(self.experts))]

    def check(self, config) -> None:
        name = type(config).__name__
        if config.proportional_attention or not config.merge_queries:
            raise ValueError(
                f"tokenmerge: {name}(proportional_attention={config.proportional_attention}, merge_queries="
                f"{config.merge_queries}) cannot run on {type(self.denoiser).__name__}: its self-attention "
                "(WanAttnProcessor) passes the attention mask to the kernel unshaped and rotates queries and keys by "
                "the same rotary rows. Use proportional_attention=False and merge_queries=True (the family preset)."
            )
        if config.temporal_ratio > 0:
            raise ValueError(
                f"tokenmerge: {name}.temporal_ratio merges frames in the temporal layers of a video U-Net; "
                f"{type(self.denoiser).__name__} has none (its one attention sees every frame): merge across frames "
                "with frames_per_cell=2 instead"
            )
        super().check(config)

    def latent_size(self, sample: torch.Tensor, read) -> tuple[int, int]:
        """``(H, W)`` of the 5-D latent ``(B, C, F, H, W)``; its frames (per patch of time) are kept for the plans."""
        if sample.ndim != 5:
            raise ValueError(f"tokenmerge: a Wan call with a latent of shape {tuple(sample.shape)}: expected "
                             "(batch, channels, frames, height, width)")
        self.frames = sample.shape[2] // self.patch_size[0]
        return tuple(sample.shape[-2:])

    def grid(self, latent_hw: tuple[int, int], target: PatchTarget, num_tokens: int) -> tuple[int, int]:
        """One frame's patch grid."""
        height, width = latent_hw[0] // self.patch_size[1], latent_hw[1] // self.patch_size[2]
        if self.frames * height * width != num_tokens:
            raise RuntimeError(
                f"tokenmerge: block {target.name} got {num_tokens} tokens but {self.frames} frames of a "
                f"{latent_hw[0]}x{latent_hw[1]} latent in patches of {self.patch_size} give {self.frames}x{height}x"
                f"{width}"
            )
        return height, width

    def frame_layout(self, grid: tuple[int, int], config) -> FrameLayout:
        return FrameLayout(self.frames, *grid, config.frames_per_cell)

    @staticmethod
    def prediction(output: object) -> torch.Tensor:
        """The prediction ``(B, C, F, H, W)`` folded per frame, ``(B * F, C, H, W)``, as the plans see the frames."""
        eps = output[0] if isinstance(output, (tuple, list)) else output.sample
        batch, channels, frames, height, width = eps.shape
        return eps.transpose(1, 2).reshape(batch * frames, channels, height, width)

    @property
    def vae_scale(self) -> int:
        """Pixels per latent pixel: 16 for Wan 2.2 TI2V's VAE (48 channels), else 8."""
        return 16 if self.denoiser.config.out_channels == 48 else 8

    def example_inputs(self, size, *args, **kwargs):
        height, width = (size, size) if isinstance(size, int) else size
        step = self.vae_scale * self.patch_size[1]
        if height % step or width % step:
            raise ValueError(f"WanTransformer3DModel: size {size} is not a multiple of {step} pixels (VAE factor "
                             f"{self.vae_scale} x patch size {self.patch_size[1]})")
        return super(TransformerAdapter, self).example_inputs(size, *args, **kwargs)

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """A latent of ``VIDEO_FRAMES`` frames (4 per latent frame after the first), UMT5 states, a timestep."""
        config = self.denoiser.config
        frames = 1 + (VIDEO_FRAMES - 1) // 4
        latent = s.randn(s.batch, config.in_channels, frames, s.height // self.vae_scale, s.width // self.vae_scale)
        kwargs = {"encoder_hidden_states": s.text(config.text_dim),
                  "timestep": torch.full((s.batch,), 500.0, device=s.device, dtype=s.dtype)}
        return (latent,), kwargs

