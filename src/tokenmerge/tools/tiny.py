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

import diffusers
import torch

from ..models import tiny_configs

#: The image U-Net kinds a tiny text-to-image pipeline can be built with.
KINDS = ("sd1", "sd2", "sdxl")


def build_denoiser(config: dict, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0, frozen: bool = True) -> torch.nn.Module:
    """A random-weight denoiser of the config's diffusers class (``_class_name``), built on ``device`` ('meta': no
    memory), in eval mode, without gradients unless ``frozen=False``.

    ``_wrapper`` names a class of this module that wraps the diffusers model as a community pipeline does
    (Zero123++'s reference-attention U-Net: :class:`ReferenceUNet`).
    """
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(diffusers, config["_class_name"]).from_config(config)
        if config.get("_wrapper"):
            model = globals()[config["_wrapper"]](model)
    # nn.Module.to: diffusers' own .to warns about casting, though these models keep no module in float32.
    return torch.nn.Module.to(model, device=device, dtype=dtype).eval().requires_grad_(not frozen)


def tiny_denoiser(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random-weight denoiser from its family adapter's config (:func:`tokenmerge.models.tiny_configs`)."""
    configs = tiny_configs()
    if name not in configs:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {', '.join(configs)}")
    return build_denoiser(configs[name], seed=seed, frozen=False)


def tiny_unet(kind: str = "sd1", seed: int = 0):
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {KINDS}")
    return tiny_denoiser(kind, seed)


def tiny_lcm_unet(seed: int = 0):
    """An SD 1.x U-Net with LCM's guidance embedding (``time_cond_proj_dim``): the ``"lcm"`` family."""
    return tiny_denoiser("lcm", seed)


def tiny_pixart(seed: int = 0):
    return tiny_denoiser("pixart", seed)


def tiny_dit(seed: int = 0):
    return tiny_denoiser("dit", seed)


def tiny_motion_unet(seed: int = 0):
    return tiny_denoiser("animatediff", seed)


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
    return tiny_denoiser("zero123pp", seed)


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
