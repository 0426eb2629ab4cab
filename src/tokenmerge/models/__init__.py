"""Model adapters: one per denoiser family. An adapter knows which transformer blocks to patch,
the token grid of each, and how to read the denoiser's inputs and output."""

from __future__ import annotations

from torch import nn

from .unet import UNetAdapter

ADAPTERS = (UNetAdapter,)


def adapter_for(denoiser: nn.Module) -> UNetAdapter:
    """The adapter that handles ``denoiser``, or a ``ValueError`` listing what is supported."""
    for adapter in ADAPTERS:
        if adapter.handles(denoiser):
            return adapter(denoiser)
    supported = ", ".join(a.description for a in ADAPTERS)
    raise ValueError(
        f"tokenmerge does not support {type(denoiser).__name__}: supported denoisers are {supported}. "
        "Pass a diffusers pipeline (e.g. StableDiffusionPipeline) or its .unet."
    )
