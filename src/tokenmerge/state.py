"""Per-patched-model state: where the sampler is, the importance signal, the private RNG.

Everything here is reset when a new pipeline call starts, so one call never leaks into the next.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import caches
from .methods.base import CFG, CFG_COND_FIRST, INSTRUCT_PIX2PIX, PAG, PAG_CFG, GuidedBatch, MethodConfig, PlanContext
from .plan import MergePlan


@dataclass
class PlanEvent:
    """What the ``on_plan`` callback of :func:`tokenmerge.apply` receives for every plan built."""

    step: int
    block: str
    grid: tuple[int, int]
    plan: MergePlan | None
    importance: torch.Tensor | None
    prune_phase: bool


_MISSING = object()


class RunClock:
    """Tells the step index, the progress through the run and when a new run starts.

    With a pipeline, the scheduler says it without touching the device: ``set_timesteps`` makes a new
    ``timesteps`` tensor at every call. The run's length is the pipeline's ``num_timesteps`` (the steps it
    actually runs, e.g. fewer for img2img), else ``len(timesteps) - begin_index``.
    A bare denoiser has no scheduler: progress is read from the timestep value (``1 - t / 1000``) and a
    timestep larger than the last one starts a new run; this reads one scalar from the device per call.
    """

    def __init__(self, pipeline: object | None, num_train_timesteps: int = 1000) -> None:
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._num_train_timesteps = num_train_timesteps
        self._timesteps = None
        self._last_t: float | None = None
        self._step_index: object = _MISSING
        self.step = -1
        self.progress = 0.0
        #: This call is a second call of the same step (the scheduler did not step between them: a pipeline that
        #: runs CFG as two calls, FLUX's true CFG). Told only by a scheduler with a ``step_index``.
        self.repeat = False
        #: The scheduler tells repeated calls (it has a ``step_index``).
        self.tells_repeats = False

    def tick(self, timestep: object, read_timestep: bool = True) -> bool:
        """Advance by one denoiser call; True when it starts a new run.

        ``read_timestep=False`` (the method does not depend on the run): a bare denoiser's calls are counted
        without reading the timestep, so there is no device-to-host sync.
        """
        pipeline = self._pipeline() if self._pipeline is not None else None
        scheduler = getattr(pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not None:
            new_run = timesteps is not self._timesteps
            if new_run:
                self._timesteps = timesteps
                begin = getattr(scheduler, "begin_index", None) or 0
                self._total = max(1, getattr(pipeline, "_num_timesteps", None) or len(timesteps) - begin)
            index = getattr(scheduler, "step_index", _MISSING)
            self.tells_repeats = index is not _MISSING
            self.repeat = not new_run and self.tells_repeats and index == self._step_index
            self._step_index = index
            if self.repeat:
                return False
            self.step = 0 if new_run else self.step + 1
            self.progress = self.step / self._total
            return new_run
        if not read_timestep or getattr(timestep, "is_meta", False):  # a meta tensor (FLOP counting) has no value
            self.step += 1
            return self.step == 0
        t = float(timestep.reshape(-1)[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        new_run = self._last_t is None or t > self._last_t
        self._last_t = t
        self.step = 0 if new_run else self.step + 1
        self.progress = 1.0 - t / self._num_train_timesteps
        return new_run


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    module = getattr(torch, device.type, None)  # torch.cuda, torch.xpu, torch.mps
    if not hasattr(module, "get_rng_state"):
        raise ValueError(
            f"tokenmerge: this config's plans draw random numbers, but torch has no random state for {device.type!r} "
            f"tensors (no torch.{device.type}.get_rng_state) to keep the patch's draws apart from yours; use a config "
            "that draws nothing, e.g. ToMe(use_rand=False), ImportanceMerge(dst_selection='topk', prune_steps=0) "
            "with an importance map, or ReToM()")
    return module.get_rng_state(device)


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        getattr(torch, device.type).set_rng_state(state, device)


class PrivateRNG:
    """The patch's random numbers: a stream of its own, forked from the global RNG (or seeded) at each new run.

    For the length of a denoiser call its state is loaded into the default generator of the input's device and
    taken out again after, so the plans draw from that generator (``plan.DEVICE_RNG``): the same numbers a
    private ``torch.Generator`` would give, and a draw ``torch.compile`` can trace. The user's RNG is neither
    consumed nor disturbed. A denoiser split over several devices draws its other devices' numbers from their
    own global generators.
    """

    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._states: dict[torch.device, torch.Tensor] = {}  # the stream per device, between calls
        self._lent: tuple[torch.device, torch.Tensor] | None = None  # (device, the user's state) during a call

    def restart(self) -> None:
        """A new run: the next call forks the global RNG again (or reseeds)."""
        self._states.clear()

    def load(self, device: torch.device) -> None:
        if device.type == "meta" or self._lent is not None:  # meta tensors draw no numbers
            return
        users = _rng_state(device)
        ours = self._states.get(device)
        if ours is None:
            ours = users if self.seed is None else torch.Generator(device).manual_seed(self.seed).get_state()
        _set_rng_state(device, ours)
        self._lent = (device, users)

    def unload(self) -> None:
        if self._lent is not None:
            device, users = self._lent
            self._states[device] = _rng_state(device)
            _set_rng_state(device, users)
            self._lent = None


class PatchState:
    """The state of one patched denoiser. Lives as ``denoiser._tokenmerge`` until ``remove``."""

    def __init__(self, config: MethodConfig, adapter, pipeline: object | None,
                 on_plan: Callable[[PlanEvent], None] | None = None) -> None:
        self.config = config
        self.adapter = adapter
        self.pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self.clock = RunClock(pipeline)
        self.on_plan = on_plan
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.latent_hw: tuple[int, int] | None = None
        self.skipping = False  # this call is a pass left whole and uncounted (Adapter.skips_call)
        self.repeat = False  # this call is the second of its step (two-call CFG: RunClock.repeat)
        self.step_plans: dict = {}  # block or share key -> (plan, context, tokens) of this step's first call
        self._cond_eps: torch.Tensor | None = None  # two-call CFG: the step's first (conditional) prediction
        self._two_call_cfg = False  # this run's steps come as two calls
        self.guided: GuidedBatch | None = None  # this call's guidance layout (None: every row its own image)
        self.expected_layout: GuidedBatch | None = None  # the layout the pipeline says it runs, for the error
        self.prune_phase = False
        self.importance: torch.Tensor | None = None  # (groups, H, W), from the previous step
        self.uses_importance = config.signal is not None  # the plans read state.importance
        self.cfg_importance = is_signal(config.signal, "cfg")  # read from the CFG output
        # Plans that follow the run (step, progress, random numbers restarted per run, plans held across steps; the
        # temporal matching always draws): a bare denoiser's clock reads the timestep to tell a new run.
        self.follows_run = config.uses_clock or config.hold_steps > 1 or config.temporal_ratio > 0
        self.draws = config.uses_rng or config.temporal_ratio > 0  # plans draw random numbers (from self.rng)
        self.rng = PrivateRNG(config.seed)
        self.shared_plans: dict = {}  # share key -> (plan, context), for the current denoiser call
        self.held_plans: dict = {}  # block or share key -> (plan, context, tokens), kept across steps (hold_steps)
        self.plan_ages: dict = {}  # the same keys -> denoiser calls since the plan was built
        self.fresh_plans: frozenset = frozenset()  # keys whose held plan is younger than hold_steps, for this call
        self.skipped: dict[str, int] = {}  # blocks left unmerged (below the floor) in the last call: name -> tokens
        self.told_floor = False  # a skipped block was logged (once per patch)
        self._pooled: dict[tuple[int, int], torch.Tensor | None] = {}
        self.merged_parts: dict[torch.nn.Module, tuple[str, str]] = {}  # part -> (name, field): caches.py
        self.reusing: frozenset[torch.nn.Module] = frozenset()  # parts whose outputs a cache may hand back (PAB)
        self.outputs_made: dict[torch.nn.Module, tuple] = {}  # such a part -> (its last output, the plan it was made under)
        self._run_is_cfg: bool | None = None  # a pipeline without a guidance flag: read once per run

    # -- called by the denoiser hooks ------------------------------------------------------------
    def begin_call(self, sample: torch.Tensor, timestep: object, latent_hw: tuple[int, int] | None = None) -> None:
        self.reusing = caches.scan(self.merged_parts)  # a cache may be enabled after apply
        new_run = self.clock.tick(timestep, self.follows_run)
        self.repeat = self.clock.repeat
        if new_run:
            self.outputs_made.clear()
            self.importance = None
            self.held_plans.clear()
            self.plan_ages.clear()
            self.rng.restart()
            self._cond_eps, self._two_call_cfg = None, False
        if self.repeat:
            self._two_call_cfg = True
        else:
            for key in self.plan_ages:  # counted here, eagerly, so a traced plan reads a set, not the step
                self.plan_ages[key] += 1
            self.fresh_plans = frozenset(key for key, age in self.plan_ages.items() if age < self.config.hold_steps)
            self.step_plans.clear()
        self.latent_hw = latent_hw or tuple(sample.shape[-2:])
        self.guided = self._guided_batch(sample, new_run)
        self.prune_phase = self.config.prunes_at(self.clock.progress)
        self._pooled.clear()
        self.shared_plans.clear()
        self.skipped.clear()
        signal = self.config.signal
        if self.cfg_importance and (self.guided is None or self.guided.uncond is None) and not self._awaits_uncond():
            raise ValueError(self._no_cfg_message(sample.shape[0]))
        if isinstance(signal, torch.Tensor) or callable(signal):
            given = signal(self.clock.step) if callable(signal) else signal
            self.importance = given.to(sample.device, torch.float32).reshape(-1, *given.shape[-2:])
        if self.draws:
            self.rng.load(sample.device)  # the denoiser's last hook unloads it, even if the call raises

    def _awaits_uncond(self) -> bool:
        """Without a CFG batch, whether the unconditional prediction may still come as a second call of the step
        (a pipeline that runs CFG as two calls; told by the scheduler's ``step_index``): this run's steps came in
        pairs so far, or it is the run's first step, whose second call tells."""
        if self.guided is not None or not self.clock.tells_repeats:
            return False
        return self.repeat or self._two_call_cfg or self.clock.step == 0

    def end_call(self, output: object) -> None:
        self.shared_plans.clear()  # plans hold index tensors: do not keep them alive between calls
        if not self.cfg_importance:
            return
        with torch.no_grad():
            eps = self.adapter.prediction(output)[:, self.adapter.importance_channels]
            guided = self.guided
            if guided is not None and guided.uncond is not None:
                self.importance = (guided.part(eps, guided.cond) - guided.part(eps, guided.uncond)).abs().float().mean(
                    dim=1)
            elif self.repeat and self._cond_eps is not None:  # two-call CFG: the conditional call came first
                self.importance = (self._cond_eps - eps).abs().float().mean(dim=1)
                self._cond_eps = None
            else:
                self._cond_eps = eps

    # -- called by the block hooks ---------------------------------------------------------------
    def held_plan(self, key: object, tokens: tuple[int, int]) -> tuple | None:
        """``(plan, context)`` built for ``key`` fewer than ``config.hold_steps`` steps ago, or None.

        Held only while it still fits: the same ``(batch, tokens)`` and the same phase (pruning or merging).
        """
        if key not in self.fresh_plans:
            return None
        plan, ctx, held_tokens = self.held_plans[key]
        return (plan, ctx) if held_tokens == tokens and ctx.prune_phase == self.prune_phase else None

    def hold_plan(self, key: object, plan: MergePlan | None, ctx: PlanContext, tokens: tuple[int, int]) -> None:
        """Keep a plan just built: held for the next ``config.hold_steps - 1`` calls."""
        self.held_plans[key] = (plan, ctx, tokens)
        self.plan_ages[key] = 0

    def importance_on_grid(self, grid: tuple[int, int], groups: int) -> torch.Tensor | None:
        """Importance ``(groups, N)`` pooled to a block's grid, or None when unknown or for another batch."""
        if grid not in self._pooled:
            imp = self.importance
            if imp is not None and imp.shape[0] not in (1, groups):
                imp = None  # a map for another batch: not usable
            if imp is not None:
                if tuple(imp.shape[-2:]) != grid:
                    imp = F.adaptive_avg_pool2d(imp[:, None], grid)[:, 0]
                imp = imp.expand(groups, -1, -1).reshape(groups, -1)
            self._pooled[grid] = imp
        return self._pooled[grid]

    def _guided_batch(self, sample: torch.Tensor, new_run: bool) -> GuidedBatch | None:
        """The call's guidance layout, or None when every row of the batch is an image of its own.

        A family whose pipelines never batch CFG (``Adapter.guided``: FLUX and Wan run it as two calls, a consistency
        model not at all) has none. Else it is read from the pipeline where it says it: PAG's ``do_perturbed_attention_guidance`` (``[uncond; cond;
        perturbed]``, or ``[cond; perturbed]`` without CFG), InstructPix2Pix by its class (three parts),
        ``do_classifier_free_guidance`` (SD, SDXL, AnimateDiff, LCM). PixArt's and DiT's pipelines keep the CFG
        switch in a local variable but feed CFG the latent twice (``[latents] * 2``): there the halves are compared
        once per run (one device-to-host read per generation, none per step). A bare denoiser has no pipeline to ask:
        an even batch is taken for a CFG pair.
        A batch that is not a whole number of the layout's parts (a call the pipeline's loop did not make) is planned
        row by row, and importance from CFG then raises, naming the layout.
        """
        batch = sample.shape[0]
        cfg = CFG_COND_FIRST if self.adapter.cond_first else CFG
        pipe = self.pipeline() if self.pipeline is not None else None
        cfg_flag, pag_flag = pipeline_flag(pipe, "do_classifier_free_guidance"), pipeline_flag(
            pipe, "do_perturbed_attention_guidance")
        if not self.adapter.guided:  # a family whose pipelines never batch CFG (FLUX, Wan: two calls; LCM: none)
            layout = None
        elif pag_flag:
            layout = PAG_CFG if cfg_flag else PAG
        elif cfg_flag and is_instruct_pix2pix(pipe):
            layout = INSTRUCT_PIX2PIX
        elif cfg_flag is not None:
            layout = cfg if cfg_flag else None
        elif batch % 2:
            layout = None
        elif pipe is None:
            layout = cfg
        else:
            if new_run or self._run_is_cfg is None:
                half = batch // 2
                self._run_is_cfg = torch.equal(sample[:half], sample[half:])
            layout = cfg if self._run_is_cfg else None
        self.expected_layout = layout
        return layout if layout is not None and batch % layout.parts == 0 else None

    def _no_cfg_message(self, batch: int) -> str:
        fix = ("use ImportanceMerge(importance='crossattn') for the cross-attention map of the final block, or give "
               "the importance yourself: ImportanceMerge(importance=<map tensor or callable>).")
        expected = self.expected_layout
        if expected is not None and expected.uncond is None:
            return (f"tokenmerge: ImportanceMerge(importance='cfg') needs an unconditional prediction, but this call "
                    f"runs {expected.name}, which has none: run with guidance_scale > 1 as well, or {fix}")
        if expected is not None:
            return (f"tokenmerge: ImportanceMerge(importance='cfg'): the pipeline runs {expected.name} ({expected.parts} "
                    f"parts per image), but this denoiser call has batch size {batch}, not a multiple of "
                    f"{expected.parts}, so which rows are conditional is unknown. Call the denoiser as the pipeline "
                    f"does, or: {fix}")
        return ("tokenmerge: ImportanceMerge(importance='cfg') needs classifier-free guidance (a batch "
                f"[uncond; cond], or a pipeline that runs it as two calls per step), but this call has batch size "
                f"{batch} without it (guidance off, or a guidance-distilled model such as LCM or FLUX.1-dev). Run with "
                f"guidance_scale > 1 (FluxPipeline: true_cfg_scale > 1 and a negative_prompt), or: {fix}")


def pipeline_flag(pipe: object, name: str) -> bool | None:
    """A pipeline's guidance switch (``do_classifier_free_guidance``...), or None where it has none (or no pipeline)."""
    try:
        flag = getattr(pipe, name, None)
    except AttributeError:  # a property read before the pipeline call set its guidance scale
        return None
    return None if flag is None else bool(flag)


#: diffusers' InstructPix2Pix pipelines, by class (and their subclasses): three-part guidance batches.
INSTRUCT_PIX2PIX_PIPELINES = ("StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline")


def is_instruct_pix2pix(pipe: object) -> bool:
    """Whether ``pipe`` is (a subclass of) one of diffusers' InstructPix2Pix pipelines; by name, so the check imports
    nothing (a pipeline of that class has its module imported already)."""
    return any(cls.__name__ in INSTRUCT_PIX2PIX_PIPELINES and cls.__module__.startswith("diffusers.")
               for cls in type(pipe).__mro__)


def is_signal(signal: object, name: str) -> bool:
    """Whether ``signal`` (a method's :attr:`~tokenmerge.methods.base.MethodConfig.signal`) is the named one."""
    return isinstance(signal, str) and signal == name
