"""What every model adapter shares: the patch target, and the defaults an adapter may override.

An adapter answers, for one denoiser family: which transformer blocks to patch (and at which level of
resolution), the token grid of a block, how to read the latent and timestep from the denoiser call, where
the predicted noise is in its output, and which family preset (:mod:`tokenmerge.presets`) applies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..frames import FrameLayout
from .blocks import BlockKind


@dataclass(frozen=True)
class PatchTarget:
    """One transformer block to patch, and where it sits: what a method may know of the denoiser's layout.

    Attributes:
        name: the block's module path in the denoiser.
        block: the block.
        level: the level of resolution it runs at (0 = the latent's; a transformer has one level).
        stage: ``"down"``, ``"mid"`` or ``"up"`` in a U-Net, ``"blocks"`` in a transformer (``PlanContext.stage``).
        bottleneck: True at a U-Net's lowest resolution (``PlanContext.bottleneck``).
        temporal: a motion-module block of a video U-Net, whose tokens are the frames of one latent pixel.
        kind: what the block is (:mod:`.blocks`): its token argument and the names of its attentions and MLP.
    """

    name: str
    block: nn.Module
    level: int
    stage: str = "blocks"
    bottleneck: bool = False
    temporal: bool = False
    kind: BlockKind = BlockKind()

    def part(self, name: str | None) -> nn.Module | None:
        """The block's submodule ``name`` (a :class:`BlockKind` attribute name), or None."""
        return None if name is None else getattr(self.block, name, None)

    def modules(self, names: tuple[str | None, ...]) -> list[nn.Module]:
        """The submodules ``names`` that the block has, in that order."""
        return [part for part in map(self.part, names) if part is not None]


@dataclass(frozen=True)
class ExampleShape:
    """What a family's example-input builder needs: the image size, the batch and a seeded ``randn``."""

    height: int
    width: int
    batch: int
    device: torch.device
    dtype: torch.dtype
    randn: Callable[..., torch.Tensor]
    text_tokens: int

    @property
    def latent(self) -> tuple[int, int]:
        return self.height // 8, self.width // 8

    def text(self, width: int) -> torch.Tensor:
        """Random text-encoder states of the family's prompt length (CLIP 77, PixArt's T5 120)."""
        return self.randn(self.batch, self.text_tokens, width)


class Adapter:
    """Defaults shared by the adapters; each family overrides what differs."""

    #: Key of the family in :data:`tokenmerge.presets.PRESETS`.
    family = "sd"
    description = ""
    #: Output channels that are noise (the rest, e.g. a learned variance, are left out of CFG importance).
    importance_channels = slice(None)
    #: True when the family's CFG batch is ``[cond; uncond]`` (DiT) rather than ``[uncond; cond]``.
    cond_first = False
    #: The name of the latent in the denoiser's ``forward`` (read by name with the ``timestep``: :mod:`..arguments`).
    latent_argument = "sample"
    #: Whether the family's pipelines batch classifier-free guidance (example inputs hold ``2 x images``).
    guided = True
    #: Whether the denoiser's token sequence holds every frame of a video (Wan: :meth:`frame_layout`).
    holds_frames = False
    #: Prompt length of the family's text encoder, for example inputs (CLIP: 77).
    text_tokens = 77
    #: Tiny random-weight models of the family for tests and ``bench --tiny``: name -> diffusers config, with its
    #: ``_class_name`` (and, for a community wrapper, the ``_wrapper`` stand-in in :mod:`tokenmerge.tools.tiny`).
    tiny_configs: dict[str, dict] = {}

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser

    @staticmethod
    def handles(denoiser: nn.Module) -> bool:  # pragma: no cover
        raise NotImplementedError

    def all_targets(self) -> list[PatchTarget]:  # pragma: no cover
        raise NotImplementedError

    def targets(self, config) -> list[PatchTarget]:  # pragma: no cover
        """The blocks ``config`` patches (its placement fields, read the family's way)."""
        raise NotImplementedError

    def temporal_targets(self, config) -> list[PatchTarget]:
        """Motion-module blocks to merge in time (video families only)."""
        return []

    def check(self, config) -> None:
        """Raise ``ValueError`` for a config field that has no meaning on this family."""
        if config.temporal_ratio > 0:
            raise ValueError(
                f"tokenmerge: {type(config).__name__}.temporal_ratio={config.temporal_ratio} merges frames in the "
                f"temporal layers of a video model, but {type(self.denoiser).__name__} has none; leave it at 0"
            )
        if config.frames_per_cell != 1 and not self.holds_frames:
            raise ValueError(
                f"tokenmerge: {type(config).__name__}.frames_per_cell={config.frames_per_cell} groups the frames of a "
                f"video transformer (Wan), but {type(self.denoiser).__name__} holds no frames in its token sequence; "
                "leave it at 1"
            )

    @staticmethod
    def prepare_pipeline(pipeline: object) -> None:
        """Bring ``pipeline`` to the denoiser its calls will run, before it is patched (a pipeline that wraps its
        model only inside its first call: Zero123++)."""

    @property
    def call_site(self) -> nn.Module:
        """The module one call of which is one denoiser call: the hooks that count steps and read the prediction go
        there (the denoiser, or the model inside a wrapper that does work of its own around it)."""
        return self.denoiser

    @property
    def experts(self) -> tuple[nn.Module, ...]:
        """The denoisers the patch covers (Wan 2.2: both experts), each holding the patch's state."""
        return (self.denoiser,)

    @property
    def call_sites(self) -> tuple[nn.Module, ...]:
        """Every module a call of which is one denoiser call (Wan 2.2: both experts)."""
        return (self.call_site,)

    def attach(self, pipeline: object) -> None:
        """Learn what the pipeline runs beside the denoiser (Wan 2.2's second expert, ``transformer_2``)."""

    def install(self, state) -> None:
        """Hooks of the family's own, beyond the blocks' (their handles go to ``state.handles``)."""

    def submodules(self, config, target: PatchTarget) -> list[nn.Module]:
        """The parts of ``target`` that ``config`` merges around (``attn1``, ``attn2``, ``ff`` of a diffusers block)."""
        return target.modules(target.kind.parts(config.merge_attn, config.merge_crossattn, config.merge_mlp))

    def make_patch(self, state, target: PatchTarget):
        """The hook set of one target (AnimateDiff's motion modules have one of their own)."""
        from ..hooks import BlockPatch

        return BlockPatch(state, target)

    def frame_layout(self, grid: tuple[int, int], config) -> FrameLayout | None:
        """How a block's tokens hold video frames of ``grid`` (:mod:`tokenmerge.frames`); None: each batch row is
        one image's grid."""
        return None

    def latent_size(self, sample: torch.Tensor, read: Callable[[str], object]) -> tuple[int, int]:
        """``(H, W)`` of the call's latent ``sample`` (``read(name)``: another argument of the call)."""
        return tuple(sample.shape[-2:])

    def skips_call(self, read: Callable[[str], object]) -> bool:
        """True for a call of :attr:`call_site` that is neither merged nor counted as a step (Zero123++'s reference
        image, SD3's layer-skipping guidance call); ``read(name)`` is the call's argument ``name`` (or None)."""
        return False

    def importance_targets(self) -> list[PatchTarget]:
        """The blocks whose attention maps are ``importance="crossattn"``: one (per expert, on Wan 2.2)."""
        return [self.importance_target()]

    def importance_target(self) -> PatchTarget:
        """The final transformer block with cross-attention, whose map is ``importance="crossattn"``."""
        for target in reversed(self.all_targets()):
            cross = target.part(target.kind.cross_attention)
            if cross is not None and getattr(cross, "is_cross_attention", False):
                return target
        raise ValueError(
            f"tokenmerge: importance='crossattn' reads the cross-attention map of the final transformer block, but "
            f"{type(self.denoiser).__name__} has no cross-attention (e.g. DiT is class-conditional). Use "
            "importance='cfg' (with classifier-free guidance) or pass a map: importance=<tensor or callable>."
        )

    def example_inputs(self, size: int | tuple[int, int], images: int = 1, device: torch.device | str = "cpu",
                       dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of one denoiser call on ``images`` images of ``size`` pixels, as the family's pipeline
        makes them: a CFG batch of ``2 x images`` where the family guides, random values from ``seed``.

        ``size`` is one side of a square or ``(height, width)``; the latent is ``size / 8``. The latent goes first
        and positionally (tomesd reads ``args[0]``). For ``tokenmerge bench``, ``auto_ratio`` and FLOP counts on
        the meta device (random weights and inputs cost what real ones do).
        """
        height, width = (size, size) if isinstance(size, int) else size
        generator = torch.Generator().manual_seed(seed)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(device, dtype)

        batch = 2 * images if self.guided else images
        return self._example(ExampleShape(height, width, batch, torch.device(device), dtype, randn, self.text_tokens))

    def _example(self, s: ExampleShape) -> tuple[tuple, dict]:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def prediction(output: object) -> torch.Tensor:
        """The predicted noise ``(B, C, H, W)`` from the denoiser's return value."""
        return output[0] if isinstance(output, (tuple, list)) else output.sample

