"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): every frame's tokens in one sequence, planned per frame or per group of
frames; each kept token rotated by its own 3-D rotary row; both experts of Wan 2.2 patched; the refusals."""

from __future__ import annotations

import dataclasses

import diffusers
import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.frames import FrameLayout
from tokenmerge.models import tiny_configs
from tokenmerge.plan import MergePlan
from tokenmerge.signals import wan_text_map
from tokenmerge.tools.tiny import tiny_denoiser

from .helpers import Shuffle, no_hooks_left
from .kit import FamilyConformance

HAS_WAN = tuple(int(part) for part in diffusers.__version__.split(".")[:2]) >= (0, 35)
pytestmark = pytest.mark.skipif(not HAS_WAN, reason=f"Wan merging needs diffusers >= 0.35 ({diffusers.__version__})")

FRAMES, ROWS, COLS = 5, 4, 5  # latent frames (1 + 4n, as Wan's VAE makes them) of a 4 x 5 token grid: 100 tokens
TEXT = 7


def call(model, t=500, seed=0, batch=2, text=None):
    """A call as WanPipeline makes it: one video per row (CFG comes as two calls), a 5-D latent, UMT5 states."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, FRAMES, 2 * ROWS, 2 * COLS, generator=gen)
    text = torch.randn(batch, TEXT, 16, generator=gen) if text is None else text
    with torch.no_grad():
        return model(x, timestep=torch.full((batch,), float(t)), encoder_hidden_states=text).sample


def wan():
    return tiny_denoiser("wan").eval()


class TestWan(FamilyConformance):
    build = staticmethod(wan)
    call = staticmethod(call)
    takes_attention_modes = False  # the processor passes the mask unshaped and rotates keys with the queries
    example_size = (64, 80)
    bare_fields = {"importance": {"importance": "crossattn"}}


class Recorder:
    """Wraps an attention processor: records the query length and the rotary rows of each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        self.calls.append((hidden_states.shape[1], rotary_emb))
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)


def record(model):
    recorders = {}
    for name, module in model.named_modules():
        if name.endswith((".attn1", ".attn2")):
            recorders[name] = module.processor = Recorder(module.processor)
    return recorders


def test_tokens_merge_in_every_part_of_the_placed_blocks_only():
    model = wan()
    recorders = record(model)
    plans = []
    config = ToMe(ratio=0.5, min_tokens=0, seed=0, layers=(0.25, 0.75), merge_crossattn=True, merge_mlp=True)
    ffn_lengths = []
    handles = [block.ffn.net[0].register_forward_pre_hook(lambda m, args: ffn_lengths.append(args[0].shape[1]))
               for block in model.blocks]
    with tokenmerge.patched(model, config, on_plan=plans.append):
        call(model)
    for handle in handles:
        handle.remove()
    tokens = FRAMES * ROWS * COLS
    kept = FRAMES * (ROWS * COLS - ROWS * COLS // 2)  # half of each frame's tokens
    lengths = {name: recorder.calls[0][0] for name, recorder in recorders.items()}
    assert lengths == {f"blocks.{i}.attn{a}": kept if i in (1, 2) else tokens for i in range(4) for a in (1, 2)}
    assert ffn_lengths == [tokens, kept, kept, tokens]
    assert [e.block for e in plans] == ["blocks.1", "blocks.2"]


def test_per_frame_plans_keep_each_token_in_its_frame_and_pairs_span_two_frames():
    """frames_per_cell=1: every token's slot is a token of its own frame. frames_per_cell=2 on 5 frames: frame 0
    alone, then frames (1, 2) and (3, 4) planned together, and tokens merge across the two frames of a pair."""
    model = wan()
    frame_of = torch.arange(FRAMES * ROWS * COLS) // (ROWS * COLS)
    for frames_per_cell, groups in ((1, [[0], [1], [2], [3], [4]]), (2, [[0], [1, 2], [3, 4]])):
        plans = []
        with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0, seed=0, frames_per_cell=frames_per_cell),
                                on_plan=plans.append):
            call(model)
        group_of = torch.empty(FRAMES, dtype=torch.long)
        for index, frames in enumerate(groups):
            group_of[frames] = index
        for event in plans:
            plan = event.plan
            destination = plan.kept.gather(1, plan.assign)  # (B, N): the token whose slot each token joins
            assert torch.equal(group_of[frame_of[destination]], group_of[frame_of].expand_as(destination))
            assert event.grid == (FRAMES * ROWS, COLS)
            assert plan.num_kept == sum(len(g) * ROWS * COLS - len(g) * ROWS * COLS // 2 for g in groups)
        crossing = torch.stack([(frame_of[e.plan.kept.gather(1, e.plan.assign)] != frame_of).any() for e in plans])
        assert bool(crossing.any()) == (frames_per_cell == 2)


@pytest.mark.parametrize("frames_per_cell", [1, 2])
def test_tokens_in_another_order_keep_their_3d_positions_through_the_whole_model(frames_per_cell, monkeypatch):
    model = wan()
    unpatched = call(model)
    config = Shuffle(ratio=0.5, min_tokens=0, frames_per_cell=frames_per_cell)
    with tokenmerge.patched(model, config):
        shuffled = call(model)
    torch.testing.assert_close(shuffled, unpatched, atol=1e-5, rtol=1e-5)
    # Rows by slot instead of by kept token: the same shuffle moves the output, so the test can fail.
    monkeypatch.setattr("tokenmerge.hooks.kept_rows", lambda freqs, plan: freqs)
    with tokenmerge.patched(model, config):
        assert not torch.allclose(call(model), unpatched, atol=1e-3)


def test_kept_tokens_get_the_unmerged_rows_of_the_same_tokens():
    model = wan()
    recorders = record(model)
    call(model)
    full = recorders["blocks.1.attn1"].calls[0][1]
    plans = []
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0, seed=0), on_plan=plans.append):
        call(model)
    merged = recorders["blocks.1.attn1"].calls[1][1]
    kept = next(e.plan for e in plans if e.block == "blocks.1").kept
    for mine, theirs in zip(merged, full):
        assert mine.shape == (2, kept.shape[1], 1, theirs.shape[-1])
        assert torch.equal(mine, torch.stack([theirs[0, kept[b], 0] for b in range(2)])[:, :, None])


def test_frame_layout_folds_frame_groups_and_joins_plans_over_the_sequence():
    layout = FrameLayout(frames=5, height=2, width=3, frames_per_cell=2)
    assert [(p.first, p.groups, p.frames) for p in layout.parts] == [(0, 1, 1), (1, 2, 2)]
    tokens = torch.arange(5 * 6).view(1, 30, 1)
    pair = layout.fold(tokens, layout.parts[1])[..., 0]
    # Row h * 2 + t of a pair's grid is row h of its frame t: frames 1 and 2 interleaved row by row.
    assert pair[0].view(4, 3).tolist() == [[6, 7, 8], [12, 13, 14], [9, 10, 11], [15, 16, 17]]
    assert layout.grid(layout.parts[1]) == (4, 3)
    # Joined, a plan merges as its parts did, token for token.
    x = torch.randn(2, 30, 4)
    made = {}

    def plan_part(folded, part):
        made[part] = ToMe(ratio=0.5, seed=0, use_rand=False).make_plan(folded, _ctx(layout.grid(part)))
        return made[part]

    joined = layout.plan(x, plan_part)
    unmerged = joined.unmerge(joined.merge(x))
    for part, plan in made.items():
        expected = plan.unmerge(plan.merge(layout.fold(x, part)))
        torch.testing.assert_close(layout.fold(unmerged, part), expected)
    assert joined.num_dst == sum(part.groups * plan.num_dst for part, plan in made.items())
    assert (joined.roles().view(2, 30) == 1).sum(1).tolist() == [joined.num_dst] * 2


def test_a_part_that_does_not_merge_is_kept_whole_beside_a_weighted_one():
    """One part planned None (kept whole), the other with per-token weights (ReToM's alpha): the joined plan's
    merge is each part's own, token for token."""
    layout = FrameLayout(frames=5, height=2, width=3, frames_per_cell=2)
    x = torch.randn(2, 30, 4)
    made = {}

    def plan_part(folded, part):
        if part.frames == 1:
            return None
        plan = ToMe(ratio=0.5, seed=0, use_rand=False).make_plan(folded, _ctx(layout.grid(part)))
        weight = torch.rand(plan.assign.numel(), 1, generator=torch.Generator().manual_seed(0)) + 0.5
        made[part] = MergePlan(kept=plan.kept, assign=plan.assign, num_dst=plan.num_dst, merge_weight=weight)
        return made[part]

    joined = layout.plan(x, plan_part)
    merged = joined.unmerge(joined.merge(x))
    alone, pairs = layout.parts
    torch.testing.assert_close(layout.fold(merged, alone), layout.fold(x, alone))
    torch.testing.assert_close(layout.fold(merged, pairs), made[pairs].unmerge(made[pairs].merge(layout.fold(x, pairs))))


def _ctx(grid):
    from tokenmerge.methods.base import PlanContext

    return PlanContext(grid=grid)


def test_importance_is_the_text_share_without_the_padding():
    """Checked against the full cross-attention softmax, from the processor's own pieces: the prompt's words, not
    the padding rows (equal to the last one) the pipeline appends."""
    model = wan()
    attn = model.blocks[-1].attn2
    torch.manual_seed(0)
    image = torch.randn(2, 30, 24)
    words = torch.randn(2, 4, 24)
    context = torch.cat([words, torch.full((2, 3, 24), 0.5)], dim=1)  # 4 words then 3 padding rows
    with torch.no_grad():
        got = wan_text_map(attn, image, context)
        q = attn.norm_q(attn.to_q(image)).unflatten(-1, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1))
        probs = (torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    torch.testing.assert_close(got, probs[..., :4].sum(-1).mean(1), atol=1e-5, rtol=1e-5)


def test_importance_merge_plans_each_frame_from_its_own_map():
    """importance="crossattn": the last block's map of the step before, per frame, reaches each frame's plan."""
    model = wan()
    seen = []

    @dataclasses.dataclass(frozen=True)
    class Seeing(ImportanceMerge):
        def make_plan(self, x, ctx):
            seen.append((x.shape[0], ctx.grid, None if ctx.importance is None else ctx.importance.clone()))
            return super().make_plan(x, ctx)

    maps = []
    handle = model.blocks[-1].attn2.register_forward_pre_hook(
        lambda m, args, kwargs: maps.append(wan_text_map(m, args[0], args[1])), with_kwargs=True)
    with tokenmerge.patched(model, Seeing(ratio=0.5, min_tokens=0, seed=0, importance="crossattn", prune_steps=0.0)):
        call(model, t=900)
        call(model, t=800)
    handle.remove()
    later = [importance for batch, grid, importance in seen[len(seen) // 2:]]
    assert all(batch == 2 * FRAMES and grid == (ROWS, COLS) for batch, grid, _ in seen)
    assert all(importance is None for _, _, importance in seen[: len(seen) // 2])
    torch.testing.assert_close(later[0], maps[0].reshape(2 * FRAMES, ROWS * COLS))


def test_refusals_name_the_fix():
    model = wan()
    with pytest.raises(ValueError, match="proportional_attention=False"):
        tokenmerge.apply(model, ToMe(ratio=0.5, proportional_attention=True))
    with pytest.raises(ValueError, match="merge_queries=True"):
        tokenmerge.apply(model, ToMe(ratio=0.5, merge_queries=False))
    with pytest.raises(ValueError, match="frames_per_cell=2"):
        tokenmerge.apply(model, ToMe(ratio=0.5, temporal_ratio=0.2))
    with pytest.raises(ValueError, match="frames_per_cell must be an int >= 1"):
        ToMe(ratio=0.5, frames_per_cell=0)
    assert tokenmerge.current_config(model) is None
    with pytest.raises(ValueError, match="holds no frames"):
        tokenmerge.apply(tiny_denoiser("pixart"), ToMe(ratio=0.5, frames_per_cell=2))


def wan_pipeline(two_experts: bool):
    from tests.test_pipeline_conformance import WAN_CALL, wan, wan22

    pipe, _ = wan22() if two_experts else wan()
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(WAN_CALL, num_inference_steps=4, output_type="latent")


def test_cfg_runs_two_calls_per_step_that_share_plans_and_give_per_frame_cfg_importance():
    pipe, call_kwargs = wan_pipeline(two_experts=False)
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, kwargs, output: outputs.append(output[0]),
                                                    with_kwargs=True)
    events = []
    config = ImportanceMerge(ratio=0.5, min_tokens=0, seed=0, prune_steps=0.0)
    assert tokenmerge.presets.resolve(config, "wan").importance == "cfg"
    with tokenmerge.patched(pipe, config, on_plan=events.append):
        pipe(**call_kwargs, generator=torch.Generator().manual_seed(0))
    handle.remove()
    blocks = len(pipe.transformer.blocks)
    assert [e.step for e in events] == [step for step in range(4) for _ in range(2 * blocks)]
    for step in range(4):
        cond, uncond = events[2 * blocks * step: 2 * blocks * step + blocks], events[
            2 * blocks * step + blocks: 2 * blocks * (step + 1)]
        assert all(a.plan is b.plan for a, b in zip(cond, uncond))
    eps = (outputs[0] - outputs[1]).abs().mean(1)  # step 0: cond then uncond, (B, F, H, W) latent pixels
    pooled = torch.nn.functional.avg_pool2d(eps.flatten(0, 1)[:, None], 2)[:, 0]  # to each frame's 2 x 2 patches
    torch.testing.assert_close(events[2 * blocks].importance, pooled.reshape(1, -1))


def test_wan22_patches_both_experts_on_one_clock_and_remove_restores_both():
    pipe, call_kwargs = wan_pipeline(two_experts=True)
    torch.manual_seed(0)
    unpatched = pipe(**call_kwargs, generator=torch.Generator().manual_seed(0)).frames
    events = []
    config = ImportanceMerge(ratio=0.5, min_tokens=0, seed=0, prune_steps=0.5)
    with tokenmerge.patched(pipe, config, on_plan=events.append):
        assert pipe.transformer_2._tokenmerge is pipe.transformer._tokenmerge
        merged = pipe(**call_kwargs, generator=torch.Generator().manual_seed(0)).frames
    steps = sorted({(e.step, e.block.split(".")[0]) for e in events})
    # The boundary (0.9 x 1000) falls inside the run: the high-noise expert first, then the second, one clock.
    assert [expert for _, expert in steps] == ["blocks"] * 2 + ["transformer_2"] * 2
    assert [step for step, _ in steps] == [0, 1, 2, 3]
    assert [e.prune_phase for e in events if e.block.endswith(".0")][::2] == [True, True, False, False]
    assert all(e.importance is not None for e in events if e.step > 0)  # carried across the boundary
    assert not torch.allclose(merged, unpatched, atol=1e-5)
    torch.manual_seed(0)
    assert torch.equal(pipe(**call_kwargs, generator=torch.Generator().manual_seed(0)).frames, unpatched)
    assert no_hooks_left(pipe.transformer) and no_hooks_left(pipe.transformer_2)


def test_image_to_video_attends_the_image_tokens_with_merged_queries():
    """Wan I2V's cross-attention adds CLIP image tokens to its keys (processed apart, from the same queries):
    merged queries run both, ratio 0 is bit-identical and the map reads the text part only."""
    torch.manual_seed(0)
    config = {k: v for k, v in tiny_configs()["wan"].items() if not k.startswith("_")}
    model = diffusers.WanTransformer3DModel(**config, image_dim=8, added_kv_proj_dim=24).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, FRAMES, 2 * ROWS, 2 * COLS, generator=gen)
    kwargs = dict(timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 512, 16, generator=gen),
                  encoder_hidden_states_image=torch.randn(1, 3, 8, generator=gen))
    with torch.no_grad():
        unpatched = model(x, **kwargs).sample
        with tokenmerge.patched(model, ToMe(ratio=0.0)):
            assert torch.equal(model(x, **kwargs).sample, unpatched)
        events = []
        config = ImportanceMerge(ratio=0.5, min_tokens=0, seed=0, importance="crossattn", merge_crossattn=True)
        with tokenmerge.patched(model, config, on_plan=events.append):
            for t in (900.0, 800.0):
                merged = model(x, **{**kwargs, "timestep": torch.tensor([t])}).sample
    assert torch.isfinite(merged).all() and not torch.allclose(merged, unpatched, atol=1e-5)
    assert events[-1].importance is not None and events[-1].importance.shape == (1, FRAMES * ROWS * COLS)

