"""Tiny random-weight Stable Diffusion models built from configs, for tests and offline demos.

They have the architectures of SD 1.x (conv projections, 8 heads), SD 2.x (linear projections,
per-level head dims) and SDXL (no attention at the top level, two text encoders, added conditions),
with few channels, so they run in seconds on a CPU. Their images are noise: the weights are random.

    python -m tokenmerge.tiny OUT_DIR [--kind sd1|sd2|sdxl]
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
