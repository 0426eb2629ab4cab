"""Shared fixtures: tiny random-weight U-Nets of each architecture and matching inputs."""

from __future__ import annotations

import pytest
import torch

from tokenmerge.tools.tiny import KINDS, tiny_unet


def unet_inputs(unet, batch: int = 2, height: int = 16, width: int = 16, seed: int = 0, dtype=torch.float32):
    """Positional and keyword arguments for one U-Net call (SDXL's added conditions included)."""
    gen = torch.Generator().manual_seed(seed)
    args = (
        torch.randn(batch, 4, height, width, generator=gen).to(dtype),
        torch.tensor(500),
        torch.randn(batch, 7, unet.config.cross_attention_dim, generator=gen).to(dtype),
    )
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=gen).to(dtype),
            "time_ids": torch.randn(batch, 6, generator=gen).to(dtype),
        }
    return args, kwargs


def add_lora(unet) -> None:
    """A PEFT LoRA adapter on every attention projection, with non-zero weights (skips without peft)."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def run(unet, args, kwargs, timestep=None) -> torch.Tensor:
    if timestep is not None:
        args = (args[0], torch.tensor(timestep), *args[2:])
    with torch.no_grad():
        return unet(*args, **kwargs).sample


@pytest.fixture(params=KINDS)
def any_unet(request):
    return tiny_unet(request.param)


@pytest.fixture
def sd1_unet():
    return tiny_unet("sd1")


@pytest.fixture
def sdxl_unet():
    return tiny_unet("sdxl")
