"""What every method config shares: where to merge, validation helpers, and the context a plan sees."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar

import torch

from ..plan import MergePlan

SHARE_PLAN = ("block", "level")
BIAS_VIA = ("mask", "channel")
# The automatic floor (``min_tokens=None``, the default): blocks below it are computed unmerged, where merging
# their self-attention was measured not to pay (benchmarks/merge_floor.py; docs/benchmarks.md).
#: CPU (and any device but CUDA): fewest tokens. Below 64 tokens merging was slower than not merging at some ratio
#: (16 tokens: 0.55-0.86x; 36 tokens at r = 0.3: 0.86x); from 64 on it paid at every ratio measured.
MIN_TOKENS_CPU = 64
#: CUDA: least work, batch x tokens, as small blocks are launch/latency bound whatever their token count. H100
#: fp16, SD 1.5 top-level self-attention (C = 320, 8 heads), batch 2, r = 0.5: 0.14-0.22x per block at 256-4096
#: tokens, 1.02x at 16384; whole steps (``tokenmerge bench``, CFG batch 2): 0.84-0.86x at 512 and 1024 px
#: (4096 and 16384 tokens at the top level), 1.61x at 2048 px (65536 tokens); 1024 tokens at batch 500: 1.3-1.5x.
MIN_WORK_CUDA = 65536
#: CUDA, or: a self-attention of at least this many FLOPs (``4 * batch * tokens^2 * channels``: scores and
#: weighted sum) pays whatever the token count. H100, whole steps with CFG: SDXL at 2048 px merging its 16384-token,
#: 640-channel level (1.4 TFLOP per block) ran at 1.07-1.11x, where SD 1.5 at 1024 px (16384 tokens, 320 channels:
#: 0.7 TFLOP) ran at 0.84x and SDXL's 4096-token, 1280-channel level (0.17 TFLOP) added nothing.
MIN_ATTENTION_FLOPS_CUDA = 10**12


@dataclass(frozen=True)
class GuidedBatch:
    """How a guided denoiser batch is laid out: ``parts`` equal chunks, each the same images in another role.

    ``cond`` is the chunk plans match on and importance's ``eps_cond`` comes from; ``uncond`` the chunk of
    ``eps_uncond`` (None when the layout has no unconditional chunk, e.g. PAG without CFG).
    """

    name: str
    parts: int
    cond: int
    uncond: int | None

    def part(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Chunk ``index`` of ``x`` along the batch."""
        size = x.shape[0] // self.parts
        return x[index * size:(index + 1) * size]


#: Classifier-free guidance as diffusers' pipelines batch it, ``[uncond; cond]``, and as DiT's does, ``[cond; uncond]``.
CFG = GuidedBatch("classifier-free guidance [uncond; cond]", 2, cond=1, uncond=0)
CFG_COND_FIRST = GuidedBatch("classifier-free guidance [cond; uncond]", 2, cond=0, uncond=1)
#: Perturbed-attention guidance (diffusers' PAG pipelines): with CFG ``[uncond; cond; perturbed]``, alone
#: ``[cond; perturbed]``.
PAG_CFG = GuidedBatch("CFG with perturbed-attention guidance [uncond; cond; perturbed]", 3, cond=1, uncond=0)
PAG = GuidedBatch("perturbed-attention guidance without CFG [cond; perturbed]", 2, cond=0, uncond=None)
#: InstructPix2Pix: ``[text and image; image only; neither]``; importance compares the fully conditional chunk with
#: the fully unconditional one.
INSTRUCT_PIX2PIX = GuidedBatch("InstructPix2Pix guidance [text+image; image; uncond]", 3, cond=0, uncond=2)


@dataclass
class PlanContext:
    """Everything a method may use to build a plan for one block call, besides the tokens.

    Attributes:
        grid: ``(height, width)`` of the block's token grid.
        generator: where the plan draws its random numbers (:func:`tokenmerge.plan.draw`): from the hooks,
            ``plan.DEVICE_RNG``, the tokens' device's default generator holding the patch's private stream
            for the call (never the user's); called directly, any ``torch.Generator``. None for a method that
            draws nothing (:attr:`MethodConfig.uses_rng` is False).
        guided: the batch's guidance layout (:class:`GuidedBatch`: ``[uncond; cond]`` for classifier-free guidance,
            three parts for PAG or InstructPix2Pix), whose parts are the same images and share one plan; None when
            every row is an image of its own.
        prune_phase: True during the first steps where the method prunes instead of merging
            (:meth:`MethodConfig.prunes_at`).
        importance: ``(pairs_or_batch, N)`` importance of each token, or None when none is known yet.
        block: name of the patched block (for reports).
        level: the block's level of resolution (0 = the latent's full resolution; a transformer has one level).
        stage: where the block sits in its denoiser, in the family's words: ``"down"``, ``"mid"`` or ``"up"`` in a
            U-Net, ``"blocks"`` in a transformer. ToFu prunes by stage.
        bottleneck: True for a block at the lowest resolution of a U-Net (never in a transformer). ReToM widens
            its window there.
    """

    grid: tuple[int, int]
    generator: torch.Generator | str | None = None
    guided: GuidedBatch | None = None
    prune_phase: bool = False
    importance: torch.Tensor | None = None
    block: str = ""
    level: int = 0
    stage: str = "blocks"
    bottleneck: bool = False

    @property
    def groups(self) -> int:
        """Parts of the batch that share a plan: 1, or the guidance layout's parts."""
        return 1 if self.guided is None else self.guided.parts

    def conditional(self, x: torch.Tensor) -> torch.Tensor:
        """The conditional part of a guided batch (the whole batch without guidance): what plans match on."""
        return x if self.guided is None else self.guided.part(x, self.guided.cond)


#: Largest temporal ratio: frames are matched in pairs (one destination per two frames).
MAX_TEMPORAL_RATIO = 0.5


def _same(a: object, b: object) -> bool:
    """Equal values, where a tensor (an importance map) is only ever the same object."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or callable(a) or callable(b):
        return False
    return type(a) is type(b) and a == b


@dataclass(frozen=True)
class MethodConfig:
    """Base of the method configs: the fields every method shares, their validation, and the ``make_plan`` contract.

    A method is a frozen dataclass deriving from this one, decorated ``@dataclass(frozen=True, kw_only=True)``:
    ``ratio`` is its only positional field (``ToMe(0.5)``), every other field is given by name. It declares its
    own fields, checks them in :meth:`check_fields`, and implements :meth:`make_plan` and :meth:`max_ratio`.
    What the core asks of it: :attr:`signal` (the importance it plans from), :meth:`prunes_at` (its pruning
    phase), :attr:`uses_rng`, :attr:`uses_clock`, :attr:`hold_steps` and :meth:`share_key`.

    Args:
        ratio: fraction of a block's tokens merged (or pruned) away; each method gives its range.
        max_downsample: U-Nets: patch attention levels up to this downsampling (1, 2, 4 or 8), counted from the
            highest-resolution level that has attention: 1 = that level only (ToMeSD's and the importance
            paper's placement). Transformers place merging with ``layers``.
        merge_attn: merge around self-attention (``attn1``).
        merge_crossattn: merge the queries of cross-attention (``attn2``).
        merge_mlp: merge around the feed-forward (``ff``).
        seed: seed of the private generator the plans draw from; None forks the global RNG at each pipeline call
            (reproducible under ``torch.manual_seed``) without consuming it.
        min_tokens: the merge floor. None (default) is the automatic floor, where merging was measured not to
            pay: on CPU a block with fewer than 64 tokens is not merged, on CUDA one with batch x tokens below
            65536 and a self-attention under 1 TFLOP (small blocks are launch bound; :meth:`merges`,
            docs/methods.md). An int: blocks with fewer tokens are not merged, on any device; 0 merges every
            block, as tomesd does. Skipped blocks are listed by :func:`tokenmerge.skipped_blocks`.
        share_plan: ``"block"`` (default) plans every patched block from its own input; ``"level"`` builds one plan
            per level and denoiser call from the input of the level's first block and reuses it in the level's
            other blocks (one matching per level instead of per block; outputs change).
        layers: for transformer denoisers (PixArt, DiT): the ``(start, end)`` fraction of the blocks patched,
            block ``i`` of ``L`` when ``start * L <= i < end * L``; ``(0.25, 0.75)`` is PixArt's 7-20 of 28.
            None: the model family's preset (every block for a transformer with no preset). Raises on U-Nets,
            where ``max_downsample`` places merging.
        temporal_ratio: for video U-Nets (AnimateDiff): fraction of the frames merged in the temporal
            (motion-module) attention, in ``[0, 0.5]``; 0 (default) leaves them alone, as merging in time
            reduces motion. Raises on models without temporal layers.
        frames_per_cell: for video transformers (Wan), whose one sequence holds every frame: 1 (default) plans
            each frame on its own grid (spatial merging per frame); ``k > 1`` plans ``k`` consecutive frames
            together, with merge cells that span two frames (spatio-temporal merging, :mod:`tokenmerge.frames`).
            Raises on other models.
        plan_every: build each block's plan (each level's, with ``share_plan="level"``) at every
            ``plan_every``-th denoiser step of a run and reuse it for the steps in between; 1 (default, the
            papers'): a new plan at every step. A plan is rebuilt early when the block's batch or token count or
            the phase (pruning or merging) changes. Outputs change: docs/quality.md measures by how much.
        proportional_attention: size-aware keys in every merged self-attention (ToMe for ViTs' "proportional
            attention", Bolya et al. 2023): ``log(members)`` of each kept slot is added to that key's logits, so a
            slot standing for ``k`` tokens weighs as much in every softmax as its ``k`` tokens did. False (default):
            a merged slot is one key, as in ToMeSD and the importance paper. A user's own attention mask is
            merged with the keys (log-sum-exp over each slot's members), never replaced.
        merge_queries: True (default): self-attention runs on the merged tokens and its output is unmerged.
            False (K/V-only; ToDo's idea): queries stay at full length and only the keys and values are merged,
            so nothing is unmerged; cross-attention and the MLP (``merge_crossattn``, ``merge_mlp``) still merge
            their tokens.
        count_pruned: for pruning plans (ImportanceMerge's first steps, SiTo, ToFu's pruning blocks) with
            ``proportional_attention``: True (default) a kept token's key counts the pruned tokens that copy its
            output; False it counts itself only (pruned tokens are gone from the keys).
        bias_via: how the size bias reaches the attention kernel. ``"mask"`` (default): an additive
            ``attention_mask`` handed to the attention processor. ``"channel"``: one extra channel per head on
            queries and keys carries ``log(members)`` (head dim padded to a multiple of 8, the scale kept), so
            no float mask is passed and fused (flash) kernels stay usable on a GPU; equal to ``"mask"`` to float
            rounding.

    Fields the caller did not give take the model family's preset when applied (``tokenmerge.presets``); given
    fields are never overridden. Which were given survives ``dataclasses.replace``: a field stays "not given"
    while it keeps the value it had (:meth:`explicit_fields`).
    """

    ratio: float = 0.5
    max_downsample: int = field(default=1, kw_only=True)
    merge_attn: bool = field(default=True, kw_only=True)
    merge_crossattn: bool = field(default=False, kw_only=True)
    merge_mlp: bool = field(default=False, kw_only=True)
    seed: int | None = field(default=None, kw_only=True)
    min_tokens: int | None = field(default=None, kw_only=True)
    share_plan: str = field(default="block", kw_only=True)
    layers: tuple[float, float] | None = field(default=None, kw_only=True)
    temporal_ratio: float = field(default=0.0, kw_only=True)
    frames_per_cell: int = field(default=1, kw_only=True)
    plan_every: int = field(default=1, kw_only=True)
    proportional_attention: bool = field(default=False, kw_only=True)
    merge_queries: bool = field(default=True, kw_only=True)
    count_pruned: bool = field(default=True, kw_only=True)
    bias_via: str = field(default="mask", kw_only=True)
    #: The fields the caller did not give, with the value each had then (``dataclasses.replace`` carries it).
    _not_given: Mapping[str, object] | None = field(default=None, kw_only=True, repr=False, compare=False)

    #: The method's name in the registry (:data:`tokenmerge.methods.METHODS`), the CLI and the presets.
    name: ClassVar[str] = ""

    # -- what the core asks a method ------------------------------------------------------------------
    @property
    def signal(self) -> object | None:
        """The importance the plans read (``PlanContext.importance``): None (default) for none; ``"cfg"``,
        ``"crossattn"``, a map tensor or a callable ``step -> tensor`` (:mod:`tokenmerge.signals`)."""
        return None

    def prunes_at(self, progress: float) -> bool:
        """Whether the denoiser call at ``progress`` (fraction of the run done) is in the pruning phase."""
        return False

    @property
    def always_prunes(self) -> bool:
        """Whether every plan prunes (SiTo; ToFu pruning in every block): ``count_pruned=False`` then does nothing."""
        return False

    @property
    def uses_rng(self) -> bool:
        """Whether plans draw from the private generator (False: none is created)."""
        return True

    @property
    def uses_clock(self) -> bool:
        """Whether plans depend on the run: its progress, or random numbers restarted at a new run.

        When False, a bare denoiser's timestep is never read (no device-to-host sync).
        """
        return True

    @property
    def hold_steps(self) -> int:
        """Denoiser calls a plan is used for before it is rebuilt: ``plan_every`` (ReToM: its ``period`` too)."""
        return self.plan_every

    def share_key(self, level: int, stage: str) -> tuple | None:
        """Key under which blocks share one plan per denoiser call, or None to plan per block.

        ``share_plan="level"``: every block of a level reuses the plan built from the input of the level's first
        block to run; a method whose plan depends on more than the level (ToFu: prune or merge, by stage) adds
        it to the key.
        """
        return ("level", level) if self.share_plan == "level" else None

    def make_plan(self, x: torch.Tensor, ctx: PlanContext) -> MergePlan | None:  # pragma: no cover
        raise NotImplementedError

    def max_ratio(self) -> float:  # pragma: no cover
        raise NotImplementedError

    def check_fields(self) -> None:
        """Raise ``ValueError`` naming the field for a bad value of the method's own fields."""

    # -- the merge floor ------------------------------------------------------------------------------
    def merges(self, batch: int, tokens: int, channels: int, device_type: str) -> bool:
        """Whether a block input of ``batch`` x ``tokens`` x ``channels`` on a ``device_type`` device is merged.

        ``min_tokens=None``: the automatic floor, ``tokens >= MIN_TOKENS_CPU`` on CPU (and any device but CUDA);
        on CUDA ``batch * tokens >= MIN_WORK_CUDA`` or a self-attention of ``>= MIN_ATTENTION_FLOPS_CUDA``. An
        int: ``tokens >= min_tokens`` on any device. Python ints only (tensor shapes and ``device.type``): no
        device sync.
        """
        if self.min_tokens is not None:
            return tokens >= self.min_tokens
        if device_type == "cuda":
            return batch * tokens >= MIN_WORK_CUDA or 4 * batch * tokens**2 * channels >= MIN_ATTENTION_FLOPS_CUDA
        return tokens >= MIN_TOKENS_CPU

    def floor(self, device_type: str) -> str:
        """The floor :meth:`merges` applies on ``device_type``, in words (why blocks were skipped)."""
        if self.min_tokens is not None:
            return f"min_tokens={self.min_tokens}"
        if device_type == "cuda":
            return (f"the automatic floor (cuda: batch x tokens < {MIN_WORK_CUDA} and self-attention < "
                    f"{MIN_ATTENTION_FLOPS_CUDA / 1e12:g} TFLOP)")
        return f"the automatic floor ({device_type}: {MIN_TOKENS_CPU} tokens)"

    def max_downsample_levels(self) -> int:
        """How many attention levels, from the highest resolution down, are patched."""
        return int(math.log2(self.max_downsample)) + 1

    # -- which fields the caller gave -----------------------------------------------------------------
    def __new__(cls, *args, **kwargs):
        # Record which fields the caller gave, so that a model family's preset fills only the others.
        self = super().__new__(cls)
        positional = [f.name for f in dataclasses.fields(cls) if f.init and not f.kw_only][: len(args)]
        object.__setattr__(self, "_given", frozenset(positional) | frozenset(kwargs))
        return self

    def __post_init__(self) -> None:
        given = self.__dict__.pop("_given", frozenset())
        if self._not_given is None:  # built by the caller
            not_given = {f.name: getattr(self, f.name) for f in config_fields(self) if f.name not in given}
        else:  # dataclasses.replace: a field stays not given while it keeps its value
            not_given = {name: value for name, value in self._not_given.items() if _same(getattr(self, name), value)}
        object.__setattr__(self, "_not_given", MappingProxyType(not_given))
        self.check_fields()
        self._check_shared()

    def explicit_fields(self) -> frozenset[str]:
        """The fields the caller gave (to the constructor, or changed through ``dataclasses.replace``)."""
        return frozenset(f.name for f in config_fields(self)) - frozenset(self._not_given)

    def not_given(self) -> Mapping[str, object]:
        """The fields the caller left out, with their current values (a preset may have set them)."""
        return self._not_given

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.__repr__ = MethodConfig.__repr__  # in the class's own dict: @dataclass keeps it

    def __repr__(self) -> str:
        # The ratio and the method's own fields; the shared ones only where they are not the default.
        parts = [f"{f.name}={getattr(self, f.name)!r}" for f in config_fields(self) if f.repr and (
            f.name == "ratio" or f.name not in SHARED_FIELDS or not _same(getattr(self, f.name), f.default))]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _check_shared(self) -> None:
        check_range(self, "ratio", self.ratio, 0.0, self.max_ratio())
        if self.max_downsample not in (1, 2, 4, 8):
            raise ValueError(
                f"{type(self).__name__}.max_downsample must be one of 1, 2, 4, 8 (levels from the first "
                f"attention level), got {self.max_downsample!r}"
            )
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"{type(self).__name__}.seed must be an int or None, got {self.seed!r}")
        _validate_layers(self)
        check_range(self, "temporal_ratio", self.temporal_ratio, 0.0, MAX_TEMPORAL_RATIO)
        frames = self.frames_per_cell
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(
                f"{type(self).__name__}.frames_per_cell must be an int >= 1 (1: each video frame merged on its own "
                f"grid; k: k consecutive frames planned together), got {frames!r}"
            )
        every = self.plan_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(
                f"{type(self).__name__}.plan_every must be an int >= 1 (1: a new plan at every step; k: plans "
                f"reused for k steps), got {every!r}"
            )
        if self.share_plan not in SHARE_PLAN:
            raise ValueError(
                f"{type(self).__name__}.share_plan must be one of {SHARE_PLAN} (plan per block, or one plan per "
                f"level and denoiser call), got {self.share_plan!r}"
            )
        min_tokens = self.min_tokens
        if min_tokens is not None and (isinstance(min_tokens, bool) or not isinstance(min_tokens, int)
                                       or min_tokens < 0):
            raise ValueError(
                f"{type(self).__name__}.min_tokens must be None (the automatic floor for the device) or an int "
                f">= 0 (blocks with fewer tokens are not merged; 0 merges every block), got {min_tokens!r}"
            )
        for name in ("merge_attn", "merge_crossattn", "merge_mlp", "proportional_attention", "merge_queries",
                     "count_pruned"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{type(self).__name__}.{name} must be True or False, got {getattr(self, name)!r}")
        if self.bias_via not in BIAS_VIA:
            raise ValueError(
                f"{type(self).__name__}.bias_via must be one of {BIAS_VIA} (an additive attention mask, or an "
                f"extra query/key channel that keeps fused kernels), got {self.bias_via!r}"
            )
        if not self.proportional_attention and (self.bias_via != "mask" or not self.count_pruned):
            field_name = "bias_via" if self.bias_via != "mask" else "count_pruned"
            raise ValueError(
                f"{type(self).__name__}.{field_name}={getattr(self, field_name)!r} shapes the size bias of "
                "proportional_attention, which is off, so it would do nothing; set proportional_attention=True "
                "or leave it at its default"
            )
        if self.proportional_attention and not self.count_pruned and self.always_prunes:
            raise ValueError(
                f"{type(self).__name__}: proportional_attention=True with count_pruned=False would do nothing: every "
                "plan of this config prunes, so each kept key would count only itself (a bias of log 1 = 0). Leave "
                "count_pruned=True (the default) to weigh the pruned tokens, or set proportional_attention=False"
            )
        if not self.merge_queries and not self.merge_attn:
            raise ValueError(
                f"{type(self).__name__}: merge_queries=False merges the keys and values of self-attention, but "
                "merge_attn=False leaves self-attention alone; set merge_attn=True or leave merge_queries=True"
            )
        if not (self.merge_attn or self.merge_crossattn or self.merge_mlp):
            raise ValueError(
                f"{type(self).__name__}: merge_attn, merge_crossattn and merge_mlp are all False, so nothing "
                "would be merged; enable at least one (merge_attn=True is the papers' setting)"
            )


#: The fields every method shares (declared on :class:`MethodConfig`), ``ratio`` included.
SHARED_FIELDS = frozenset(f.name for f in dataclasses.fields(MethodConfig) if not f.name.startswith("_"))


def config_fields(config: MethodConfig | type[MethodConfig]) -> list[dataclasses.Field]:
    """A method config's fields, without the private record of which were given."""
    return [f for f in dataclasses.fields(config) if not f.name.startswith("_")]


def default_of(config: MethodConfig | type[MethodConfig], name: str) -> object:
    """The class default of field ``name`` of a method config."""
    return next(f.default for f in dataclasses.fields(config) if f.name == name)


def _validate_layers(config: MethodConfig) -> None:
    layers = config.layers
    if isinstance(layers, list):
        layers = tuple(layers)
        object.__setattr__(config, "layers", layers)
    if layers is None:
        return
    ok = isinstance(layers, tuple) and len(layers) == 2 and all(
        not isinstance(v, bool) and isinstance(v, (int, float)) for v in layers)
    if not ok or not 0.0 <= layers[0] < layers[1] <= 1.0:
        raise ValueError(
            f"{type(config).__name__}.layers must be None or a (start, end) fraction of the transformer blocks "
            f"with 0 <= start < end <= 1, e.g. (0.25, 0.75) for the middle half; got {config.layers!r}"
        )


def check_range(config: object, name: str, value: float, low: float, high: float) -> None:
    """Raise ``ValueError`` naming the field unless ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{type(config).__name__}.{name} must be in [{low:g}, {high:g}], got {value!r}")
