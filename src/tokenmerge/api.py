"""``apply``, ``remove`` and ``patched``: find the denoiser, choose its adapter, install the hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch import nn

from .hooks import BlockPatch, install_denoiser_hooks
from .methods.base import MethodConfig
from .models import adapter_for
from .state import PatchState, PlanEvent

Model = TypeVar("Model")
STATE_ATTR = "_tokenmerge"


def find_denoiser(model: object) -> tuple[nn.Module, object | None]:
    """``(denoiser, pipeline or None)`` for a diffusers pipeline or a bare denoiser module."""
    for name in ("unet", "transformer"):
        denoiser = getattr(model, name, None)
        if isinstance(denoiser, nn.Module) and not isinstance(model, nn.Module):
            return denoiser, model
    if isinstance(model, nn.Module):
        return model, None
    raise ValueError(
        f"tokenmerge.apply expects a diffusers pipeline or its denoiser module (e.g. pipe.unet), "
        f"got {type(model).__name__}"
    )


def apply(model: Model, config: MethodConfig, *, on_plan: Callable[[PlanEvent], None] | None = None) -> Model:
    """Patch ``model`` (a pipeline or its denoiser) with a token-merging method; returns ``model``.

    Applying again replaces the earlier patch. ``on_plan``, if given, is called with a
    :class:`~tokenmerge.state.PlanEvent` for every plan built (used by the CLI's maps).
    """
    if not isinstance(config, MethodConfig):
        raise ValueError(
            f"tokenmerge.apply needs a method config such as tokenmerge.ToMe() or tokenmerge.ImportanceMerge(), "
            f"got {type(config).__name__}"
        )
    denoiser, pipeline = find_denoiser(model)
    adapter = adapter_for(denoiser)
    targets = adapter.targets(config.max_downsample_levels())
    patches = []
    for target in targets:
        submodules = [
            getattr(target.block, name)
            for name, wanted in (("attn1", config.merge_attn), ("attn2", config.merge_crossattn),
                                 ("ff", config.merge_mlp))
            if wanted and getattr(target.block, name, None) is not None
        ]
        if submodules:
            patches.append((target, submodules))
    if not patches:
        raise ValueError(
            f"tokenmerge: {type(config).__name__} would patch nothing in {type(denoiser).__name__}: no transformer "
            f"block with the requested submodules (attn1={config.merge_attn}, attn2={config.merge_crossattn}, "
            f"ff={config.merge_mlp}) in the first {config.max_downsample_levels()} attention level(s). "
            "Raise max_downsample or enable another submodule."
        )
    remove(model)
    state = PatchState(config, adapter, pipeline, on_plan)
    install_denoiser_hooks(state, denoiser)
    for target, submodules in patches:
        BlockPatch(state, target).install(submodules)
    setattr(denoiser, STATE_ATTR, state)
    return model


def remove(model: Model) -> Model:
    """Undo :func:`apply`: every hook and all state go; outputs are those of the unpatched model."""
    denoiser, _ = find_denoiser(model)
    state = denoiser.__dict__.pop(STATE_ATTR, None)
    if state is not None:
        for handle in state.handles:
            handle.remove()
        state.handles.clear()
    return model


def skipped_blocks(model: object) -> dict[str, int]:
    """Blocks the last denoiser call left unmerged because they had fewer than ``config.min_tokens`` tokens.

    ``{block name: tokens}``; empty when every patched block merged (or the model is not patched).
    """
    state = getattr(find_denoiser(model)[0], STATE_ATTR, None)
    return dict(state.skipped) if state is not None else {}


def current_config(model: object) -> MethodConfig | None:
    """The config ``model`` is patched with, or None."""
    state = getattr(find_denoiser(model)[0], STATE_ATTR, None)
    return state.config if state is not None else None


@contextlib.contextmanager
def patched(model: Model, config: MethodConfig, **kwargs) -> Iterator[Model]:
    """Patch ``model`` for the duration of a ``with`` block; an earlier patch is restored afterwards."""
    state = getattr(find_denoiser(model)[0], STATE_ATTR, None)
    apply(model, config, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if state is not None:
            apply(model, state.config, on_plan=state.on_plan)
