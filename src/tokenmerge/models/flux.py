"""FLUX.1 (``FluxTransformer2DModel``): double-stream blocks, then single-stream blocks over ``[text; image]``.

The latent arrives packed, ``(B, N, 64)``: one token per 2x2 latent patch, in raster order of an ``H x W`` grid
that only the position ids (``img_ids``, ``(N, 3)``: ``(0, row, col)``) tell; the grid is read from them once per
ids tensor (the pipeline builds it once per run: one device-to-host read per generation, none per step).

* Double-stream ``FluxTransformerBlock``: a joint attention with separate text projections, returning
  ``(image, text)``, then the image MLP (``ff``) and the text's (``ff_context``). The image tokens are merged as on
  SD3 (:mod:`.sd3`); the text never.
* Single-stream ``FluxSingleTransformerBlock``: the block joins ``[text; image]`` and runs the attention and an MLP
  branch (``proj_mlp``) side by side, joined by ``proj_out``. The image rows are merged into both branches (the
  text rows pass whole), stay merged through ``proj_out`` and are unmerged after it: the gate and the residual act
  on the full sequence, so the block's arithmetic is kept.
* Rotary positions (``image_rotary_emb``, applied inside the processor after the q/k norms): a merged call rotates
  each kept token by its own row (:mod:`tokenmerge.rotary`).

FLUX.1-dev is guidance-distilled (the guidance scale is an input, ``guidance``), and the pipeline's true CFG runs
the conditional and unconditional predictions as two calls: there is no CFG batch, so the preset's importance is
``"crossattn"``, read from the last double-stream block's joint attention: each image token's share of attention on
the text (:func:`tokenmerge.signals.joint_text_map`); ``importance="cfg"`` raises. Keys are one per slot (the
processor takes no mask and computes its keys from the image tokens): size-aware keys and K/V-only raise.
Needs diffusers >= 0.35 (single-stream blocks that take the text apart, ``FluxAttention``).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

from .base import ExampleShape, PatchTarget
from .blocks import find_blocks
from .transformer import TransformerAdapter

#: FLUX.1-dev's T5 prompt length (schnell: 256).
FLUX_TEXT_TOKENS = 512


class FluxAdapter(TransformerAdapter):
    family = "flux"
    class_name = "FluxTransformer2DModel"
    description = "FluxTransformer2DModel (FLUX.1, diffusers >= 0.35)"
    joint_attention = "FluxAttnProcessor"
    latent_argument = "hidden_states"
    guided = False
    text_tokens = FLUX_TEXT_TOKENS
    #: diffusers' fast-test layout (width 32, rotary axes 4+4+8), two blocks of each stream; FLUX.1-dev's guidance
    #: embedding.
    tiny_configs = {"flux": dict(
        _class_name="FluxTransformer2DModel", patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8), guidance_embeds=True,
    )}

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__(denoiser)
        self.token_hw: tuple[int, int] | None = None
        self._ids_seen = lambda: None  # a weak reference to the ids the grid was read from

    def all_targets(self) -> list[PatchTarget]:
        blocks = [*find_blocks(self.denoiser.transformer_blocks, prefix="transformer_blocks"),
                  *find_blocks(self.denoiser.single_transformer_blocks, prefix="single_transformer_blocks")]
        if not blocks:
            raise ValueError(
                "tokenmerge: FLUX merging needs diffusers >= 0.35, whose single-stream blocks take the text apart "
                "(FluxSingleTransformerBlock(hidden_states, encoder_hidden_states, ...)); upgrade diffusers"
            )
        return [PatchTarget(name, block, 0, kind=kind) for name, block, kind in blocks]

    def importance_target(self) -> PatchTarget:
        """The last double-stream block: its joint attention has the text apart (``importance="crossattn"``)."""
        return [t for t in self.all_targets() if t.name.startswith("transformer_blocks.")][-1]

    def latent_size(self, sample: torch.Tensor, read) -> tuple[int, int]:
        """The token grid from ``img_ids``; square where they cannot be read (meta tensors: FLOP counts)."""
        ids = read("img_ids")
        if ids is None:
            raise ValueError("tokenmerge: a FLUX call without img_ids: the token grid is unknown")
        ids = ids[0] if ids.ndim == 3 else ids
        tokens = sample.shape[1]
        if self._ids_seen() is not ids:
            if ids.is_meta:
                side = math.isqrt(tokens)
                if side * side != tokens:
                    raise ValueError(f"tokenmerge: {tokens} FLUX tokens on the meta device: not a square grid")
                self.token_hw = (side, side)
            else:
                low, high = ids[:, 1:].amin(0).tolist(), ids[:, 1:].amax(0).tolist()
                self.token_hw = (int(high[0] - low[0]) + 1, int(high[1] - low[1]) + 1)
            self._ids_seen = weakref.ref(ids)
        height, width = self.token_hw
        if height * width != tokens:
            raise ValueError(
                f"tokenmerge: this FLUX call has {tokens} image tokens but their ids span a {height}x{width} grid: "
                "tokens beyond the latent's (a reference image concatenated, as FLUX Kontext does) are not supported"
            )
        return self.token_hw

    def prediction(self, output: object) -> torch.Tensor:
        """The packed prediction ``(B, N, C)`` as ``(B, C, H, W)`` on the token grid."""
        packed = output[0] if isinstance(output, (tuple, list)) else output.sample
        return packed.transpose(1, 2).reshape(packed.shape[0], packed.shape[2], *self.token_hw)

    def example_inputs(self, size, *args, **kwargs):
        height, width = (size, size) if isinstance(size, int) else size
        if height % 16 or width % 16:
            raise ValueError(f"FluxTransformer2DModel: size {size} is not a multiple of 16 pixels (VAE factor 8 x "
                             "2x2 packing)")
        return super(TransformerAdapter, self).example_inputs(size, *args, **kwargs)

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """Packed latent, T5 states, pooled CLIP, position ids, a timestep in [0, 1] and (dev) the guidance."""
        config = self.denoiser.config
        rows, cols = s.height // 16, s.width // 16
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1)
        img_ids = torch.cat([torch.zeros(rows * cols, 1), grid.reshape(-1, 2).float()], dim=1).to(s.device, s.dtype)
        kwargs = {"encoder_hidden_states": s.text(config.joint_attention_dim),
                  "pooled_projections": s.randn(s.batch, config.pooled_projection_dim),
                  "timestep": torch.full((s.batch,), 0.5, device=s.device, dtype=s.dtype),
                  "img_ids": img_ids, "txt_ids": torch.zeros(s.text_tokens, 3, device=s.device, dtype=s.dtype)}
        if config.guidance_embeds:
            kwargs["guidance"] = torch.full((s.batch,), 3.5, device=s.device, dtype=s.dtype)
        return (s.randn(s.batch, rows * cols, config.in_channels),), kwargs
