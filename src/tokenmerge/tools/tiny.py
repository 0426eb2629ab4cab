"""Tiny random-weight diffusion models built from configs, for tests and offline demos.

They have the architectures of SD 1.x (conv projections, 8 heads), SD 2.x (linear projections,
per-level head dims) and SDXL (no attention at the top level, two text encoders, added conditions),
with few channels, so they run in seconds on a CPU. Their images are noise: the weights are random.
Beyond the SD U-Net: an LCM U-Net (guidance embedding), PixArt-alpha and DiT transformers, an AnimateDiff
``UNetMotionModel``, and a Zero123++-like reference-attention U-Net (:class:`ReferenceUNet`).

    python -m tokenmerge.tools.tiny OUT_DIR [--kind sd1|sd2|sdxl]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

KINDS = ("sd1", "sd2", "sdxl")

_UNET_CONFIGS = {
    "sd1": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        cross_attention_dim=32,
    ),
    "sd2": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=32,
    ),
    "sdxl": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4, 8),
        transformer_layers_per_block=(1, 1, 2),
        use_linear_projection=True,
        cross_attention_dim=64,  # two text encoders of width 32, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    ),
}


def unet_config(kind: str) -> dict:
    """Keyword arguments of ``UNet2DConditionModel`` for a tiny model of the given architecture."""
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {KINDS}")
    return dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
                **_UNET_CONFIGS[kind])


def tiny_unet(kind: str = "sd1", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(kind)).eval()


#: A PixArt-alpha transformer (``ada_norm_single``, T5-width captions, learned sigma) with few channels.
PIXART_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4, cross_attention_dim=16,
    attention_bias=True, sample_size=16, patch_size=2, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
    norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=32,
)
#: A DiT (``ada_norm_zero``, class-conditional, learned sigma) with few channels.
DIT_CONFIG = dict(
    num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=4, sample_size=16,
    patch_size=2, num_embeds_ada_norm=1000, norm_num_groups=16,
)
#: An AnimateDiff ``UNetMotionModel``: attention and motion modules at levels 0 and 1.
MOTION_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlockMotion", "CrossAttnDownBlockMotion", "DownBlockMotion"),
    up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion", "CrossAttnUpBlockMotion"),
    cross_attention_dim=32, num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=16,
)


LCM_TIME_COND_DIM = 16  # the tiny LCM's guidance embedding (LCM_Dreamshaper_v7: 256)


def tiny_lcm_unet(seed: int = 0):
    """An SD 1.x U-Net with LCM's guidance embedding (``time_cond_proj_dim``): the ``"lcm"`` family."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config("sd1"), time_cond_proj_dim=LCM_TIME_COND_DIM).eval()


def tiny_pixart(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(**PIXART_CONFIG).eval()


def tiny_dit(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(**DIT_CONFIG).eval()


def tiny_motion_unet(seed: int = 0):
    from diffusers import UNetMotionModel

    torch.manual_seed(seed)
    return UNetMotionModel(**MOTION_CONFIG).eval()


#: The tiny Zero123++-like U-Net: SD 2 layout (linear projections, per-level heads), attention in three levels.
ZERO123PP_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(32, 32, 64, 64), attention_head_dim=(2, 2, 4, 4), use_linear_projection=True,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=32,
)


class ReferenceAttnProcessor:
    """Zero123++'s reference attention, written from its description (App. B): in ``mode="w"`` a self-attention
    stores its input under its name; in ``mode="r"`` it appends the stored reference tokens to its keys and values.
    Other calls (cross-attention, no mode) are plain attention."""

    def __init__(self, name: str) -> None:
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.name = name
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, mode=None,
                 ref_dict=None, **kwargs):
        if encoder_hidden_states is None and mode is not None:
            context = hidden_states
            if mode == "w":
                ref_dict[self.name] = hidden_states
            elif mode == "r":
                reference = ref_dict.pop(self.name)
                context = torch.cat([hidden_states, reference.expand(hidden_states.shape[0], -1, -1)], dim=1)
            return self.inner(attn, hidden_states, context, attention_mask)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask)


class ReferenceUNet(torch.nn.Module):
    """A Zero123++-like denoiser: an SD 2 U-Net as ``.unet``; each call runs the reference latent first
    (``mode="w"``), then the tiled views (``mode="r"``), as Zero123++'s ``RefOnlyNoisedUNet`` does."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet = unet
        unet.set_attn_processor({name: ReferenceAttnProcessor(name) for name in unet.attn_processors})

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None, return_dict=True):
        reference = cross_attention_kwargs["cond_lat"]
        ref_dict: dict = {}
        self.unet(reference, timestep, encoder_hidden_states[-reference.shape[0]:],
                  cross_attention_kwargs={"mode": "w", "ref_dict": ref_dict})
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=return_dict,
                         cross_attention_kwargs={"mode": "r", "ref_dict": ref_dict})


def tiny_zero123pp(seed: int = 0) -> ReferenceUNet:
    """A Zero123++-like reference-attention U-Net (SD 2 layout, 4 levels, attention in the first three)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return ReferenceUNet(UNet2DConditionModel(**ZERO123PP_UNET_CONFIG)).eval()


def _char_tokenizer(max_length: int = 77):
    """A CLIP tokenizer whose vocabulary is CLIP's 256 byte symbols (no merges): built offline."""
    from transformers import CLIPTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab))
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(Path(folder) / "vocab.json"), str(Path(folder) / "merges.txt"),
                             model_max_length=max_length)


def _text_encoder(with_projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                            vocab_size=514, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                            pad_token_id=513, projection_dim=32)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_pipeline(kind: str = "sd1", seed: int = 0):
    """A complete tiny text-to-image pipeline (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = tiny_unet(kind, seed)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(16, 16, 16, 16), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        sample_size=128).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    if kind == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, unet=unet, scheduler=scheduler, text_encoder=_text_encoder(), tokenizer=_char_tokenizer(),
            text_encoder_2=_text_encoder(with_projection=True), tokenizer_2=_char_tokenizer(),
        )
    return StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, text_encoder=_text_encoder(),
                                   tokenizer=_char_tokenizer(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, kind: str = "sd1", seed: int = 0) -> Path:
    """Build a tiny pipeline and ``save_pretrained`` it (safetensors) to ``path``."""
    path = Path(path)
    tiny_pipeline(kind, seed).save_pretrained(path, safe_serialization=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Save a tiny random-weight Stable Diffusion pipeline.")
    parser.add_argument("out", help="folder to write the pipeline to")
    parser.add_argument("--kind", choices=KINDS, default="sd1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(save_tiny_pipeline(args.out, args.kind, args.seed))


if __name__ == "__main__":
    main()
