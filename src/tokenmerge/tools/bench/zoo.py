"""The models ``bench`` builds: full-size architectures from the shipped configs (random weights), or tiny ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

from torch import nn

from ...models import adapter_for, tiny_configs
from ..options import Size, parse_names


@dataclass(frozen=True)
class ModelSpec:
    title: str
    config_file: str  # under tokenmerge/configs
    tiny_kind: str  # its family's tiny model for --tiny (tokenmerge.models.tiny_configs: sd1, lcm, pixart, ...)
    gpu_sizes: tuple[Size, ...]  # default resolutions on GPU; the first is the model's native one


MODELS = {
    "sd15": ModelSpec("SD 1.5", "sd15_unet.json", "sd1", (512, 1024, 2048)),
    "sd21": ModelSpec("SD 2.1", "sd21_unet.json", "sd2", (768,)),
    "sdxl": ModelSpec("SDXL", "sdxl_unet.json", "sdxl", (1024, 2048)),
    "pixart": ModelSpec("PixArt-alpha", "pixart_alpha_transformer.json", "pixart", (1024,)),
    "dit": ModelSpec("DiT-XL/2", "dit_xl2_256_transformer.json", "dit", (256, 512)),
    "lcm": ModelSpec("LCM (SD 1.5)", "lcm_sd15_unet.json", "lcm", (512, 1024)),
    "animatediff": ModelSpec("AnimateDiff (SD 1.5)", "animatediff_sd15_unet.json", "animatediff", (512,)),
    "zero123pp": ModelSpec("Zero123++ (SD 2)", "zero123pp_unet.json", "zero123pp", ((960, 640),)),
    "sd35m": ModelSpec("SD3.5 Medium", "sd35_medium_transformer.json", "sd35", (1024,)),
    "flux1dev": ModelSpec("FLUX.1-dev", "flux1_dev_transformer.json", "flux", (1024,)),
    "wan21": ModelSpec("Wan 2.1 T2V 1.3B (81 frames)", "wan21_t2v_1_3b_transformer.json", "wan", ((480, 832),)),
}

TINY_SIZE = 128  # the tiny configs' sample_size (16) x 8


def model_config(name: str, tiny: bool = False) -> dict:
    """The diffusers config (``_class_name`` included) of a model: shipped full-size, or tiny."""
    spec = MODELS[parse_names(name, MODELS, "model")[0]]
    if tiny:
        return dict(tiny_configs()[spec.tiny_kind])
    return json.loads(resources.files("tokenmerge").joinpath("configs", spec.config_file).read_text())


def is_unet(denoiser: nn.Module) -> bool:
    return type(denoiser).__name__ == "UNet2DConditionModel"


def family(denoiser: nn.Module) -> str:
    """The denoiser's tokenmerge family (``sd``, ``lcm``, ``animatediff``, ``pixart``, ``dit``, ``zero123pp``)."""
    return adapter_for(denoiser).family


def pixels(size: Size) -> tuple[int, int]:
    """``(height, width)`` in pixels."""
    return (size, size) if isinstance(size, int) else size


def latent_size(size: Size) -> tuple[int, int]:
    """The latent ``(height, width)`` of an image size (VAE factor 8)."""
    height, width = pixels(size)
    return height // 8, width // 8


def size_label(size: Size) -> str:
    return str(size) if isinstance(size, int) else f"{size[0]}x{size[1]}"
