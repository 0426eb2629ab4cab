"""``apply``, ``remove`` and ``patched``: find the denoiser, choose its adapter, install the hooks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

from torch import nn

from . import caches
from .hooks import install_denoiser_hooks, merged_parts
from .methods.base import MethodConfig
from .models import adapter_for, prepare_pipeline
from .presets import resolve
from .signals import install_crossattn_importance
from .state import PatchState, PlanEvent, is_signal

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


def experts_of(model: object) -> list[nn.Module]:
    """The denoisers a model runs: its denoiser, and beside it a pipeline's second expert (Wan 2.2's
    ``transformer_2``)."""
    denoiser, pipeline = find_denoiser(model)
    second = getattr(pipeline, "transformer_2", None)
    return [denoiser, second] if isinstance(second, nn.Module) and second is not denoiser else [denoiser]


def patches_in(denoiser: nn.Module) -> list[tuple[nn.Module, PatchState]]:
    """``(module, state)`` of every patch at or inside ``denoiser``: a wrapper made around a patched model (Zero123++
    wraps its U-Net inside its first call) holds the patch beneath it."""
    return [(module, module.__dict__[STATE_ATTR]) for module in denoiser.modules() if STATE_ATTR in module.__dict__]


def state_of(model: object) -> PatchState | None:
    """The patch of a pipeline's or a bare denoiser's model, or None."""
    found = patches_in(find_denoiser(model)[0])
    return found[0][1] if found else None


def nothing_to_patch(config: MethodConfig, adapter) -> str:
    """Why ``config`` finds nothing to patch in the adapter's denoiser, and what would help (if anything does)."""
    name, model = type(config).__name__, type(adapter.denoiser).__name__
    found = adapter.all_targets()
    if not found:
        owners = attention_owners(adapter.denoiser)
        where = f"its attention is in {', '.join(owners)}" if owners else "it has no attention layers"
        return (
            f"tokenmerge: {name} would patch nothing in {model}: it has no transformer block tokenmerge can patch "
            f"({where}; tokenmerge merges around the parts of a registered block, diffusers' BasicTransformerBlock), "
            "so no placement or ratio can help: this model is not supported"
        )
    placed = adapter.targets(config)
    if not placed:
        return (
            f"tokenmerge: {name} would patch nothing in {model}: layers={config.layers} selects none of its "
            f"{len(found)} blocks (block i of L is patched when start * L <= i < end * L); widen layers, e.g. "
            "layers=(0.25, 0.75)"
        )
    fields = {"merge_attn": "self_attention", "merge_crossattn": "cross_attention", "merge_mlp": "mlp"}
    present = [field for field, part in fields.items()
               if any(target.part(getattr(target.kind, part)) is not None for target in placed)]
    on = ", ".join(f"{field}={getattr(config, field)}" for field in fields)
    return (
        f"tokenmerge: {name} would patch nothing in {model}: its blocks in the placement have none of the parts "
        f"{on} asks for; set {' or '.join(f'{field}=True' for field in present)}"
    )


def attention_owners(denoiser: nn.Module) -> list[str]:
    """The classes of the modules that hold the denoiser's attention layers (for the unsupported-model message)."""
    from diffusers.models.attention_processor import Attention

    modules = dict(denoiser.named_modules())
    owners = set()
    for path, module in modules.items():
        if isinstance(module, Attention):
            parent = path.rpartition(".")[0]
            while parent and isinstance(modules[parent], (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
                parent = parent.rpartition(".")[0]
            owners.add(type(modules[parent]).__name__)
    return sorted(owners)


def refuse_compiled(denoiser: nn.Module, action: str) -> None:
    """Patching or unpatching through a ``torch.compile`` wrapper (the denoiser, or a model inside it) would silently
    not take effect: dynamo does not guard module hooks (``skip_nnmodule_hook_guards``), so code compiled before
    keeps running as it was traced."""
    compiled = next((module for module in denoiser.modules()
                     if isinstance(getattr(module, "_orig_mod", None), nn.Module)), None)
    if compiled is None:
        return
    original = type(compiled._orig_mod).__name__
    where = "the denoiser is" if compiled is denoiser else f"the denoiser holds {original} as"
    fix = ("tokenmerge.apply(pipe, config) first, then compile (pipe.unet = torch.compile(pipe.unet))"
           if action == "apply" else
           "put the uncompiled module back (pipe.unet = pipe.unet._orig_mod), then tokenmerge.remove(pipe) (and "
           "compile again if wanted)")
    raise ValueError(
        f"tokenmerge.{action}: {where} a torch.compile wrapper of {original}. Its compiled code does not see hooks "
        f"{'added' if action == 'apply' else 'removed'} after it was traced (torch.compile does not guard module "
        f"hooks), so this would silently not take effect. Do: {fix}."
    )


def apply(model: Model, config: MethodConfig, *, on_plan: Callable[[PlanEvent], None] | None = None) -> Model:
    """Patch ``model`` (a pipeline or its denoiser) with a token-merging method; returns ``model``.

    Applying again replaces the earlier patch. ``on_plan``, if given, is called with a
    :class:`~tokenmerge.state.PlanEvent` for every plan built (used by the CLI's maps; temporal plans of video
    models are not reported). Fields of ``config`` that were not passed take the preset of the model's family
    (:mod:`tokenmerge.presets`); :func:`current_config` returns the resolved config.
    """
    if not isinstance(config, MethodConfig):
        raise ValueError(
            f"tokenmerge.apply needs a method config such as tokenmerge.ToMe() or tokenmerge.ImportanceMerge(), "
            f"got {type(config).__name__}"
        )
    denoiser, pipeline = find_denoiser(model)
    if pipeline is not None:
        prepare_pipeline(pipeline)
        denoiser, pipeline = find_denoiser(model)
    refuse_compiled(denoiser, "apply")
    adapter = adapter_for(denoiser)
    if pipeline is not None:
        adapter.attach(pipeline)
    for expert in adapter.experts[1:]:
        refuse_compiled(expert, "apply")
    config = resolve(config, adapter.family)
    adapter.check(config)
    patches = [(target, adapter.submodules(config, target)) for target in adapter.targets(config)]
    patches = [(target, submodules) for target, submodules in patches if submodules]
    if not patches:
        raise ValueError(nothing_to_patch(config, adapter))
    temporal = [(target, adapter.submodules(config, target)) for target in adapter.temporal_targets(config)]
    if config.temporal_ratio > 0 and not temporal:
        raise ValueError(
            f"tokenmerge: {type(config).__name__}.temporal_ratio={config.temporal_ratio} but no motion-module block "
            f"runs at the merged levels of {type(denoiser).__name__}; raise max_downsample or leave it at 0"
        )
    caches.scan({part: where for target, submodules in patches + temporal
                 for part, where in merged_parts(target, submodules).items()})  # raises for a cache it cannot stack with
    crossattn = is_signal(config.signal, "crossattn")
    if crossattn:
        adapter.importance_targets()  # raises, naming the alternatives, on a model without cross-attention
    remove(model)
    state = PatchState(config, adapter, pipeline, on_plan)
    install_denoiser_hooks(state)
    adapter.install(state)
    for target, submodules in patches + temporal:
        adapter.make_patch(state, target).install(submodules)
    if crossattn:
        install_crossattn_importance(state, adapter)
    for expert in adapter.experts:
        setattr(expert, STATE_ATTR, state)
    return model


def remove(model: Model) -> Model:
    """Undo :func:`apply`: every hook and all state go; outputs are those of the unpatched model.

    A patch beneath the pipeline's denoiser (a wrapper made after patching, or a compiled one) is found there."""
    experts = experts_of(model)
    found = [patch for expert in experts for patch in patches_in(expert)]
    if found:
        for expert in experts:
            refuse_compiled(expert, "remove")
    for module, state in found:
        del module.__dict__[STATE_ATTR]
        for handle in state.handles:
            handle.remove()
        state.handles.clear()
    return model


def skipped_blocks(model: object) -> dict[str, int]:
    """Blocks the last denoiser call left unmerged because they were below the floor (``config.min_tokens``).

    ``{block name: tokens}``; empty when every patched block merged (or the model is not patched).
    """
    state = state_of(model)
    return dict(state.skipped) if state is not None else {}


def current_config(model: object) -> MethodConfig | None:
    """The config ``model`` is patched with, or None."""
    state = state_of(model)
    return state.config if state is not None else None


@contextlib.contextmanager
def patched(model: Model, config: MethodConfig, **kwargs) -> Iterator[Model]:
    """Patch ``model`` for the duration of a ``with`` block; an earlier patch is restored afterwards."""
    state = state_of(model)
    apply(model, config, **kwargs)
    try:
        yield model
    finally:
        remove(model)
        if state is not None:
            apply(model, state.config, on_plan=state.on_plan)
