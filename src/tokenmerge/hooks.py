"""The forward hooks that carry tokens along the data path.

::

    denoiser   pre:  state.begin_call   (step, new run, latent size, CFG batch, user importance)
               post: state.end_call     (CFG importance |eps_cond - eps_uncond| for the next step)
    block      pre:  build the MergePlan from the block input
    attn2/ff   pre:  x -> plan.merge(x)
               post: y -> plan.unmerge(y)
    attn1      pre:  x -> plan.merge(x) as queries and keys (or as keys and values only, merge_queries=False),
                     the size bias as attention_mask (or via to_q/to_k/to_v: bias_via="channel"); attention.py
               post: y -> plan.unmerge(y) (nothing to unmerge with merge_queries=False)

No diffusers ``forward`` is copied: the submodules are called exactly as diffusers calls them, on
fewer tokens, so any attention processor (SDPA, custom, LoRA) keeps working.

Under ``torch.compile`` the block hooks are traced with the model. The denoiser's pre-hook, which keeps the Python
counters of the run (step, new run, the random stream's state), runs eagerly (``torch.compiler.disable``): as the
compiled module's own hook it runs outside its graph, so ``fullgraph=True`` holds and the counters never become
constants of a graph. The plans read only values that change at most once a run (the pruning phase, whether an
importance map exists yet; with ``plan_every`` or ReToM's ``period``, whether the held plans are still fresh),
each a recompilation, never one per step. Plans reported to an ``on_plan`` callback run eagerly: a graph break
per block.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from . import attention
from .arguments import Signature
from .methods.base import PlanContext
from .models.base import PatchTarget
from .plan import DEVICE_RNG, MergePlan
from .rotary import Rotation, kept_rows
from .state import PatchState, PlanEvent

#: The skipped-block warning has a logger of its own (under ``tokenmerge``), so it can be silenced alone.
floor_logger = logging.getLogger("tokenmerge.floor")


@contextlib.contextmanager
def floor_warnings_off() -> Iterator[None]:
    """Silence the skipped-block warning, for callers that patch many times and report skipped blocks
    themselves (``tokenmerge bench``'s notes, ``auto_ratio``'s speed-ups)."""
    level = floor_logger.level
    floor_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        floor_logger.setLevel(level)


def is_self_attention(module: torch.nn.Module) -> bool:
    """A diffusers ``Attention`` over its own tokens (``attn1``; both attentions of a motion module)."""
    return hasattr(module, "processor") and not getattr(module, "is_cross_attention", True)


def install_denoiser_hooks(state: PatchState) -> None:
    """The hooks of each denoiser call, on the adapter's ``call_sites``; a pass the adapter skips (Zero123++'s
    reference image) is neither counted nor read."""
    for site in state.adapter.call_sites:
        _install_call_hooks(state, site)


def _install_call_hooks(state: PatchState, denoiser: torch.nn.Module) -> None:
    adapter = state.adapter
    signature = Signature.of(denoiser)
    latent, timestep = adapter.latent_argument, "timestep"

    @torch.compiler.disable
    def before(module, args, kwargs):
        def read(name):
            return signature.read(args, kwargs, name)

        state.skipping = adapter.skips_call(read)
        if not state.skipping:
            sample = read(latent)
            state.begin_call(sample, read(timestep), adapter.latent_size(sample, read))

    def after(module, args, output):
        if not state.skipping:
            state.end_call(output)

    @torch.compiler.disable
    def give_back_rng(module, args, output):
        state.rng.unload()

    state.handles.append(denoiser.register_forward_pre_hook(before, with_kwargs=True))
    state.handles.append(denoiser.register_forward_hook(after))
    state.handles.append(denoiser.register_forward_hook(give_back_rng, always_call=True))


def merged_parts(target: PatchTarget, submodules: list[torch.nn.Module]) -> dict[torch.nn.Module, tuple[str, str]]:
    """The parts of ``target`` merged around: module -> (its name, the config field that leaves it whole)."""
    kind = target.kind
    fields = (("merge_attn", kind.self_attention), ("merge_attn", kind.dual_attention),
              ("merge_crossattn", kind.cross_attention), ("merge_mlp", kind.mlp))
    return {part: (f"{target.name}.{name}", field) for field, name in fields
            if (part := target.part(name)) is not None and any(part is module for module in submodules)}


class BlockPatch:
    """Hooks of one transformer block: the plan lives here between the block's pre- and post-hook."""

    def __init__(self, state: PatchState, target: PatchTarget) -> None:
        self.state = state
        self.target = target
        self.plan: MergePlan | None = None  # this block call's, built on first use from the block input (pending)
        self.pending: torch.Tensor | None = None
        self.channel_bias: attention.ChannelBias | None = None  # bias_via="channel", during a merged attention call
        self.queries_kept = False  # merge_queries=False, during a merged attention call
        self.rotation: Rotation | None = None  # the kept tokens' rotary rows, during a merged attention call (FLUX)
        self.text_len = 0  # text rows before the image tokens in what the parts see (BlockKind.text_first)
        self.signature = Signature.of(target.block)  # where the block's call puts its tokens (target.kind.tokens)

    def install(self, submodules: list[torch.nn.Module]) -> None:
        block = self.target.block
        kind = self.target.kind
        handles = self.state.handles
        config = self.state.config
        # A Python callback per plan (on_plan, for inspection) is left out of compiled graphs: that hook runs eagerly.
        if self.state.on_plan is not None:
            self._build_plan = torch.compiler.disable(self._build_plan)
        handles.append(block.register_forward_pre_hook(self._take_input, with_kwargs=True))
        handles.append(block.register_forward_hook(self._drop_plan))
        self.state.merged_parts.update(merged_parts(self.target, submodules))
        attention, mlp = self.target.part(kind.self_attention), self.target.part(kind.mlp)
        # FLUX's single stream: attention and MLP outputs stay merged into proj_out, whose output is unmerged.
        fused = kind.fused_out is not None and any(m is attention for m in submodules) and any(
            m is mlp for m in submodules)
        for module in submodules:
            signature = Signature.of(module)
            if module is attention and kind.rotary is not None:
                handles.append(module.register_forward_pre_hook(
                    functools.partial(self._merge_rotated, signature), with_kwargs=True))
                handles.append(module.register_forward_hook(functools.partial(self._after_rotated, not fused)))
                if not kind.rotary_per_sample:
                    self._install_rotation(module)
            elif not is_self_attention(module):
                handles.append(module.register_forward_pre_hook(functools.partial(self._merge, signature),
                                                                with_kwargs=True))
                if not (fused and module is mlp):
                    handles.append(module.register_forward_hook(self._unmerge))
            else:
                handles.append(module.register_forward_pre_hook(
                    functools.partial(self._merge_self_attention, signature), with_kwargs=True))
                handles.append(module.register_forward_hook(self._unmerge_self_attention))
                if config.proportional_attention and config.bias_via == "channel":
                    self._install_bias_channel(module)
        if fused:
            handles.append(self.target.part(kind.fused_out).register_forward_hook(self._unmerge))

    def _install_rotation(self, attn: torch.nn.Module) -> None:
        """A merged call's rotary positions, applied at the q/k norms' outputs (:mod:`tokenmerge.rotary`)."""
        for name, text_only in (("norm_q", False), ("norm_k", False), ("norm_added_q", True), ("norm_added_k", True)):
            norm = getattr(attn, name, None)
            if norm is None:
                continue

            def rotate(module, args, output, text_only=text_only):
                return None if self.rotation is None else self.rotation.apply(output, text_only)

            self.state.handles.append(norm.register_forward_hook(rotate))

    def _install_bias_channel(self, attn: torch.nn.Module) -> None:
        """``bias_via="channel"``: the projections of ``attn`` carry the size bias while a merged call runs."""
        handles = self.state.handles
        head_dim = attn.to_out[0].in_features // attn.heads

        def padding(pad):
            def hook(module, args, output):
                return None if self.channel_bias is None else pad(attn, output, self.channel_bias)
            return hook

        for projection, pad in ((attn.to_q, attention.pad_query), (attn.to_k, attention.pad_key),
                                (attn.to_v, attention.pad_value)):
            handles.append(projection.register_forward_hook(padding(pad)))

        def unpad(module, args):
            if self.channel_bias is not None:
                return (attention.unpad_output(attn, args[0], head_dim), *args[1:])
            return None

        handles.append(attn.to_out[0].register_forward_pre_hook(unpad))

    def _take_input(self, module, args, kwargs):
        """Block pre-hook: keep the block input; the plan is built from it when a part first needs it
        (:meth:`_current_plan`), so a block a cache skips (FirstBlockCache, MagCache: called, but its parts are not)
        costs no plan."""
        text_first = self.target.kind.text_first
        self.text_len = self.signature.read(args, kwargs, text_first).shape[1] if text_first is not None else 0
        self.plan = None
        # A pass left whole (Zero123++'s reference image, SD3's layer-skip call) gets no plan.
        self.pending = None if self.state.skipping else self.signature.read(args, kwargs, self.target.kind.tokens)

    def _current_plan(self) -> MergePlan | None:
        """This block call's plan, built from the block input on first use."""
        if self.pending is not None:
            x, self.pending = self.pending, None
            self.plan = self._build_plan(x)
        return self.plan

    def _build_plan(self, x: torch.Tensor) -> MergePlan | None:
        state, config = self.state, self.state.config
        batch, tokens, channels = x.shape
        if not config.merges(batch, tokens, channels, x.device.type):  # too small to pay: as is, and reported
            state.skipped[self.target.name] = tokens
            if not torch.compiler.is_compiling() and not state.told_floor:
                state.told_floor = True  # once per patch: the user learns why there is no speed-up
                floor_logger.warning(
                    "tokenmerge: %s (batch %d x %d tokens x %d channels) is below %s: merging it would not pay, so it "
                    "runs unmerged, as may other blocks (tokenmerge.skipped_blocks lists them after each call). "
                    "min_tokens=0 merges every block.", self.target.name, batch, tokens, channels,
                    config.floor(x.device.type))
            if state.on_plan is not None:
                grid = state.adapter.grid(state.latent_hw, self.target, tokens)
                state.on_plan(PlanEvent(state.clock.step, self.target.name, grid, None, None, state.prune_phase))
            return None
        key = config.share_key(self.target.level, self.target.stage)
        hold_key = key or self.target.name
        plan, ctx = self._find_plan(x, key, hold_key)
        state.step_plans[hold_key] = (plan, ctx, (batch, tokens))
        self._report(plan, ctx)
        return plan

    def _find_plan(self, x: torch.Tensor, key: object, hold_key: object) -> tuple[MergePlan, PlanContext]:
        """The plan of this call: one already made for it (the step's first call's, for the second call of a
        two-call CFG step; the level's, with ``share_plan``; an earlier step's, with ``plan_every``), or a new one."""
        state, config = self.state, self.state.config
        batch, tokens, _ = x.shape
        if state.repeat:  # the unconditional call of a two-call CFG step: the pair shares plans, as a CFG batch does
            found = state.step_plans.get(hold_key)
            if found is not None and found[2] == (batch, tokens):
                return found[:2]
        if key is not None and key in state.shared_plans:
            # share_plan="level": this level's first block already planned in this denoiser call.
            return state.shared_plans[key]
        held = state.held_plan(hold_key, (batch, tokens)) if config.hold_steps > 1 else None
        if held is not None:  # plan_every (ReToM's period): a plan from an earlier step of this run
            if key is not None:
                state.shared_plans[key] = held
            return held
        with torch.no_grad():
            plan, ctx = self._new_plan(x.detach())
        if key is not None:
            state.shared_plans[key] = (plan, ctx)
        if config.hold_steps > 1:
            state.hold_plan(hold_key, plan, ctx, (batch, tokens))
        return plan, ctx

    def _new_plan(self, x: torch.Tensor) -> tuple[MergePlan, PlanContext]:
        """A plan made by the method from the block input ``x``; a video's ``frames x H x W`` tokens are planned per
        frame or group of frames (:mod:`tokenmerge.frames`), reported on the frames stacked."""
        state, config = self.state, self.state.config
        batch, tokens, _ = x.shape
        grid = state.adapter.grid(state.latent_hw, self.target, tokens)
        groups = batch // state.guided.parts if state.guided is not None else batch
        layout = state.adapter.frame_layout(grid, config)
        if layout is None:
            ctx = self._context(grid, state.importance_on_grid(grid, groups) if state.uses_importance else None)
            return config.make_plan(x, ctx), ctx
        importance = None
        if state.uses_importance:
            importance = state.importance_on_grid(grid, groups * layout.frames)
            importance = None if importance is None else importance.reshape(groups, -1, 1)

        def plan_part(folded: torch.Tensor, part) -> MergePlan:
            part_importance = None if importance is None else layout.fold(importance, part)[..., 0]
            return config.make_plan(folded, self._context(layout.grid(part), part_importance))

        stacked = (layout.frames * grid[0], grid[1])
        return layout.plan(x, plan_part), self._context(stacked, None if importance is None else importance[..., 0])

    def _context(self, grid: tuple[int, int], importance: torch.Tensor | None) -> PlanContext:
        state, target = self.state, self.target
        return PlanContext(grid=grid, generator=DEVICE_RNG if state.config.uses_rng else None, guided=state.guided,
                           prune_phase=state.prune_phase, importance=importance, block=target.name,
                           level=target.level, stage=target.stage, bottleneck=target.bottleneck)

    def _report(self, plan: MergePlan | None, ctx: PlanContext) -> None:
        on_plan = self.state.on_plan
        if on_plan is not None:
            on_plan(PlanEvent(self.state.clock.step, self.target.name, ctx.grid, plan, ctx.importance,
                              ctx.prune_phase))

    def _drop_plan(self, module, args, output):
        self.plan = self.pending = None

    def _merge_self_attention(self, signature, module, args, kwargs):
        self.channel_bias = None
        self.queries_kept = False
        if self._current_plan() is None:
            return None
        if signature.read(args, kwargs, "encoder_hidden_states") is not None:  # joint: the image part is merged
            config = self.state.config
            if config.proportional_attention or not config.merge_queries:
                raise ValueError(
                    f"tokenmerge: {self.target.name}'s attention is joint (image and text tokens in one softmax, "
                    f"{type(module.processor).__name__}): proportional_attention={config.proportional_attention} "
                    f"and merge_queries={config.merge_queries} cannot pass through it; use "
                    "proportional_attention=False and merge_queries=True"
                )
            return self._merge(signature, module, args, kwargs)
        args, kwargs, self.channel_bias = attention.self_attention_arguments(
            module, signature, args, kwargs, self.plan, self.state.config)
        self.queries_kept = not self.state.config.merge_queries
        return args, kwargs

    def _unmerge_self_attention(self, module, args, output):
        self.channel_bias = None
        if self.queries_kept:  # K/V-only: the output already has every query token
            self.queries_kept = False
            return None
        return self._unmerge(module, args, output)

    def _merge(self, signature, module, args, kwargs):
        if self._current_plan() is not None:
            if kwargs.get("ip_adapter_masks") is not None:
                raise ValueError(
                    f"tokenmerge: merge_crossattn=True merges the queries of {self.target.name}'s cross-attention, "
                    "but this call passes IP-Adapter masks (cross_attention_kwargs['ip_adapter_masks']): diffusers "
                    "resizes each mask to the query count as if the queries were a grid, so on merged queries the "
                    "mask would not line up with the tokens. Use merge_crossattn=False (the default) with masks."
                )
            name = signature.first
            return signature.replace(args, kwargs, name,
                                     self._merge_tokens(signature.read(args, kwargs, name), self.plan))
        return None

    def _unmerge(self, module, args, output):
        plan = self._plan_of(module, output)
        if plan is None:
            return None
        if isinstance(output, tuple):  # a joint attention's (image, text): the text was never merged
            return (self._unmerge_tokens(output[0], plan), *output[1:])
        return self._unmerge_tokens(output, plan)

    def _plan_of(self, module: torch.nn.Module, output: object) -> MergePlan | None:
        """The plan ``output`` was computed under: this call's, or, where a cache hands back an earlier call's output
        as it was (PyramidAttentionBroadcast), that call's (:mod:`tokenmerge.caches`)."""
        if module not in self.state.reusing:
            return self.plan
        first = output[0] if isinstance(output, tuple) else output
        made = self.state.outputs_made.get(module)
        if made is not None and made[0] is first:
            return made[1]
        self.state.outputs_made[module] = (first, self.plan)
        return self.plan

    def _merge_tokens(self, x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        """The plan's merge of the image tokens; text rows in front (``text_len``) pass whole."""
        if not self.text_len:
            return plan.merge(x)
        return torch.cat([x[:, : self.text_len], plan.merge(x[:, self.text_len:])], dim=1)

    def _unmerge_tokens(self, y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
        if not self.text_len:
            return plan.unmerge(y)
        return torch.cat([y[:, : self.text_len], plan.unmerge(y[:, self.text_len:])], dim=1)

    def _merge_rotated(self, signature, module, args, kwargs):
        """An attention with rotary positions (FLUX, Wan): image tokens merged, the kept tokens' rows rotate them."""
        self.rotation = None
        if self._current_plan() is None:
            return None
        if kwargs.get("ip_hidden_states") is not None:
            raise ValueError(
                f"tokenmerge: {self.target.name}'s attention runs an IP-Adapter, which reads the image queries before "
                "their rotation, where merging rotates them: keep attention whole (merge_attn=False) with an "
                "IP-Adapter on FLUX, or unload it (pipe.unload_ip_adapter())"
            )
        rotary = self.target.kind.rotary
        freqs = signature.read(args, kwargs, rotary)
        context = signature.read(args, kwargs, "encoder_hidden_states")
        args, kwargs = self._merge(signature, module, args, kwargs)
        if freqs is not None and self.target.kind.rotary_per_sample:  # Wan: the processor takes the kept rows
            args, kwargs = signature.replace(args, kwargs, rotary, kept_rows(freqs, self.plan))
        elif freqs is not None:
            text = context.shape[1] if context is not None else self.text_len
            self.rotation = Rotation.of_kept(freqs, self.plan, text)
            args, kwargs = signature.replace(args, kwargs, rotary, None)
        return args, kwargs

    def _after_rotated(self, unmerge: bool, module, args, output):
        self.rotation = None
        if unmerge:
            return self._unmerge(module, args, output)
        # FLUX's single stream: the output stays merged into proj_out, beside this call's merged MLP output; one a
        # cache reused from an earlier call is moved from that call's plan to this one's.
        made = self._plan_of(module, output)
        if made is self.plan:
            return None
        tokens = output if made is None else self._unmerge_tokens(output, made)
        return tokens if self.plan is None else self._merge_tokens(tokens, self.plan)
