"""Model adapters: one per denoiser family. An adapter knows which transformer blocks to patch,
the token grid of each, how to read the denoiser's inputs and output, and its family's preset."""

from __future__ import annotations

import torch
from torch import nn

from .base import Adapter, PatchTarget

__all__ = ["Adapter", "PatchTarget", "adapter_for", "adapters", "example_inputs", "prepare_pipeline", "tiny_configs"]


def adapters() -> tuple[type[Adapter], ...]:
    """Every adapter, most specific first (imported here: the video and multi-view ones use the hooks module)."""
    from .animatediff import AnimateDiffAdapter
    from .flux import FluxAdapter
    from .sd3 import SD3Adapter
    from .transformer import DiTAdapter, PixArtAdapter
    from .unet import UNetAdapter
    from .wan import WanAdapter
    from .zero123pp import Zero123PlusAdapter

    return (AnimateDiffAdapter, Zero123PlusAdapter, UNetAdapter, PixArtAdapter, DiTAdapter, SD3Adapter, FluxAdapter,
            WanAdapter)


def adapter_for(denoiser: nn.Module) -> Adapter:
    """The adapter that handles ``denoiser``, or a ``ValueError`` listing what is supported."""
    for adapter in adapters():
        if adapter.handles(denoiser):
            return adapter(denoiser)
    supported = "; ".join(a.description for a in adapters())
    raise ValueError(
        f"tokenmerge does not support {type(denoiser).__name__}: supported denoisers are {supported}. "
        "Pass a diffusers pipeline (e.g. StableDiffusionPipeline) or its denoiser (pipe.unet / pipe.transformer)."
    )


def prepare_pipeline(pipeline: object) -> None:
    """Let each family bring a pipeline to the denoiser its calls will run (:meth:`Adapter.prepare_pipeline`)."""
    for adapter in adapters():
        adapter.prepare_pipeline(pipeline)


def example_inputs(denoiser: nn.Module, size: int | tuple[int, int], images: int = 1,
                   device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one call of ``denoiser`` as its family's pipeline makes it (:meth:`Adapter.example_inputs`)."""
    return adapter_for(denoiser).example_inputs(size, images, device, dtype, seed)


def tiny_configs() -> dict[str, dict]:
    """Every family's tiny model configs by name (``sd1``, ``sd2``, ``sdxl``, ``lcm``, ``animatediff``, ...)."""
    return {name: config for adapter in adapters() for name, config in adapter.tiny_configs.items()}
