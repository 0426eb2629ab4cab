"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``): joint image-text transformer blocks on one patch grid.

Each ``JointTransformerBlock`` runs one joint attention (``attn``, ``JointAttnProcessor2_0``): the image tokens
and the text tokens are projected apart and attend together in one softmax, and it returns ``(image, text)``.
Only the image tokens are merged: the attention is called on the merged image tokens with the whole text, its
image output is unmerged, the text output is left as it is; the image MLP (``ff``) is merged too and the text's
own MLP (``ff_context``) never. SD3.5's dual-attention blocks add a second attention over the image tokens only
(``attn2``), merged with ``merge_attn``. Positions are added once at the patch embedding (no rotary embedding),
so merged tokens carry their own; ControlNet residuals are added to the block's full-length output.

Keys are one per merged slot: ``JointAttnProcessor2_0`` takes no attention mask (size-aware keys would need one)
and computes the image keys from ``hidden_states`` (K/V-only would replace the text), so both raise here.
The pipeline batches CFG ``[uncond; cond]`` (``do_classifier_free_guidance``), so ``importance="cfg"`` applies;
``importance="crossattn"`` reads the last block's joint attention (its share of the text, as on FLUX).
SD3.5's skip-layer guidance makes a second call in some steps, on the conditional half with ``skip_layers``: that
call is left whole and is not counted as a step (:meth:`skips_call`), so the step clock, the pruning phase and the
CFG importance follow the sampler's steps.
"""

from __future__ import annotations

import torch
from .base import ExampleShape, PatchTarget
from .transformer import TransformerAdapter

#: SD3's prompt: CLIP-L and CLIP-G (77 tokens, padded to T5's width) then T5 (256 tokens).
SD3_TEXT_TOKENS = 77 + 256


class SD3Adapter(TransformerAdapter):
    family = "sd3"
    class_name = "SD3Transformer2DModel"
    description = "SD3Transformer2DModel (SD3, SD3.5)"
    text_tokens = SD3_TEXT_TOKENS
    joint_attention = "JointAttnProcessor2_0"
    #: diffusers' fast-test layout (joint attention of width 32), 4 blocks; SD3.5's variant with dual attention in
    #: the first two and q/k RMS norms.
    tiny_configs = {
        "sd3": dict(_class_name="SD3Transformer2DModel", sample_size=16, patch_size=2, in_channels=4, num_layers=4,
                    attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                    pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16),
        "sd35": dict(_class_name="SD3Transformer2DModel", sample_size=16, patch_size=2, in_channels=4, num_layers=4,
                     attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                     pooled_projection_dim=64, out_channels=4, pos_embed_max_size=16, qk_norm="rms_norm",
                     dual_attention_layers=(0, 1)),
    }

    def importance_target(self) -> PatchTarget:
        """The last block: ``importance="crossattn"`` reads its joint attention's share of the text."""
        return self.all_targets()[-1]

    def skips_call(self, read) -> bool:
        return read("skip_layers") is not None

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:
        """Latent, joint text states (CLIP + T5 width), pooled CLIP projections, a timestep per sample."""
        config = self.denoiser.config
        latent = s.randn(s.batch, config.in_channels, *s.latent)
        kwargs = {"encoder_hidden_states": s.text(config.joint_attention_dim),
                  "pooled_projections": s.randn(s.batch, config.pooled_projection_dim),
                  "timestep": torch.full((s.batch,), 500.0, device=s.device, dtype=s.dtype)}
        return (latent,), kwargs
