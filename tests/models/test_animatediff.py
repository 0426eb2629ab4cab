"""AnimateDiff (UNetMotionModel, 5-D latents): per-frame spatial merging and importance, optional temporal merging."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.methods import METHODS
from tokenmerge.models import example_inputs
from tokenmerge.models.animatediff import VIDEO_FRAMES, text_per_frame
from tokenmerge.tools.tiny import tiny_motion_unet

from .helpers import (
    ATTENTION_IDS,
    ATTENTION_MODES,
    CountingProcessor,
    check_compiles_whole,
    check_merges_and_restores,
    check_ratio_zero_is_identical,
)
from .kit import FamilyConformance

FRAMES = 4


@pytest.fixture(scope="module")
def motion_unet():
    return tiny_motion_unet()


def call(unet, batch=2, t=500, seed=0, latents=None):
    """AnimateDiff's call: latents (B, C, F, H, W), text repeated per frame as the pipeline does."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, FRAMES, 16, 16, generator=gen) if latents is None else latents
    text = text_per_frame(torch.randn(batch, 7, 32, generator=gen), FRAMES)
    with torch.no_grad():
        return unet(x, torch.tensor(t), text).sample


class TestAnimateDiff(FamilyConformance):
    build = staticmethod(tiny_motion_unet)
    call = staticmethod(call)
    timesteps = (950, 500)


def test_every_method_keeps_the_video_shape(motion_unet):
    for name, method in METHODS.items():
        merged = check_merges_and_restores(motion_unet, call, method(ratio=0.5, seed=0))
        assert all(m.shape == (2, 4, FRAMES, 16, 16) for m in merged), name


def test_temporal_ratio_zero_is_bit_identical(motion_unet):
    check_ratio_zero_is_identical(motion_unet, call, ToMe(ratio=0.0, temporal_ratio=0.0))


def test_compiles_whole_with_temporal_merging(motion_unet):
    check_compiles_whole(motion_unet, call, ToMe(ratio=0.5, temporal_ratio=0.5))


@pytest.mark.parametrize("mode", ATTENTION_MODES, ids=ATTENTION_IDS)
def test_attention_modes_run_in_space_and_time(motion_unet, mode):
    """Size-aware keys and K/V-only merging in the spatial blocks and in the motion modules' temporal merging."""
    config = ImportanceMerge(ratio=0.5, seed=0, temporal_ratio=0.5)
    check_ratio_zero_is_identical(motion_unet, call, dataclasses.replace(config, ratio=0.0, temporal_ratio=0.0,
                                                                         **mode))
    plain = check_merges_and_restores(motion_unet, call, dataclasses.replace(config, proportional_attention=False))
    merged = check_merges_and_restores(motion_unet, call, dataclasses.replace(config, **mode))
    assert not torch.allclose(merged[-1], plain[-1], atol=1e-6)


def test_preset_and_temporal_merging_off_by_default(motion_unet):
    with tokenmerge.patched(motion_unet, ImportanceMerge(ratio=0.7)):
        config = tokenmerge.current_config(motion_unet)
        motion_hooked = [n for n, m in motion_unet.named_modules() if "motion_modules" in n and m._forward_pre_hooks]
    assert (config.pool, config.prune_steps, config.temporal_ratio) == (0.8, 4 / 30, 0.0)  # App. B: 4 of 30 steps
    assert motion_hooked == []


def test_temporal_ratio_merges_frames_in_the_motion_modules_of_the_merged_levels():
    unet = tiny_motion_unet()
    top = unet.down_blocks[0].motion_modules[0].transformer_blocks[0]
    deeper = unet.down_blocks[1].motion_modules[0].transformer_blocks[0]
    counters = {}
    for name, block in (("top", top), ("deeper", deeper)):
        counters[name] = (CountingProcessor(), CountingProcessor())
        block.attn1.set_processor(counters[name][0])
        block.attn2.set_processor(counters[name][1])
    with tokenmerge.patched(unet, ToMe(ratio=0.5, temporal_ratio=0.5, seed=0)):
        call(unet)
    assert counters["top"][0].calls == [(2, 2)] and counters["top"][1].calls == [(2, 2)]  # 4 frames -> 2
    assert counters["deeper"][0].calls == [(FRAMES, FRAMES)]  # level 1 is not merged (max_downsample=1)
    with pytest.raises(ValueError, match="temporal_ratio must be in \\[0, 0.5\\]"):
        ToMe(temporal_ratio=0.6)


def test_temporal_draws_are_reseeded_at_every_run_even_when_the_spatial_plans_draw_nothing(motion_unet):
    """The temporal matching always draws its frame pairs; with ``use_rand=False`` (spatial plans that ignore the
    run) a second run must still start from the seed, not continue the first run's draws."""
    config = ToMe(ratio=0.5, use_rand=False, temporal_ratio=0.5, seed=0)
    with tokenmerge.patched(motion_unet, config):
        first = [call(motion_unet, t=t) for t in (900, 500, 100)]
        second = [call(motion_unet, t=t) for t in (900, 500, 100)]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_cfg_importance_is_per_frame(motion_unet):
    tokenmerge.apply(motion_unet, ImportanceMerge(ratio=0.5, seed=0))
    eps = call(motion_unet, t=900)  # (2, 4, F, 16, 16): [uncond; cond]
    importance = motion_unet._tokenmerge.importance
    tokenmerge.remove(motion_unet)
    expected = (eps[1] - eps[0]).abs().mean(dim=0)  # (F, 16, 16): one map per frame
    assert importance.shape == (FRAMES, 16, 16)
    torch.testing.assert_close(importance, expected)


def test_frames_are_merged_independently_each_on_its_own_importance(motion_unet):
    user = torch.zeros(FRAMES, 16, 16)
    regions = [(slice(0, 8), slice(0, 8)), (slice(0, 8), slice(8, 16)), (slice(8, 16), slice(0, 8)),
               (slice(8, 16), slice(8, 16))]
    for frame, (ys, xs) in enumerate(regions):  # a different important quarter in every frame
        user[frame, ys, xs] = 1.0 + torch.rand(8, 8)
    events = []
    config = ImportanceMerge(ratio=0.75, pool=0.0, prune_steps=0.0, importance=user, seed=0)
    with tokenmerge.patched(motion_unet, config, on_plan=events.append):
        call(motion_unet, batch=1)  # one video, no CFG: the batch is its 4 frames
    top = [e for e in events if e.grid == (16, 16)]
    assert top
    for event in top:
        assert event.plan.batch_size == FRAMES
        for frame in range(FRAMES):  # pool = 0: exactly that frame's 64 important tokens are computed on
            expected = set(user[frame].reshape(-1).topk(64).indices.tolist())
            assert set(event.plan.kept[frame].tolist()) == expected


def test_example_inputs_are_a_video_of_the_adapters_length_with_text_per_frame(motion_unet):
    args, kwargs = example_inputs(motion_unet, 128, images=1)
    assert args[0].shape == (2, 4, VIDEO_FRAMES, 16, 16) and kwargs == {}  # CFG batch of 2, 16 frames
    # the text states as the installed AnimateDiffPipeline passes them (tests/test_family_pipelines.py checks that)
    assert args[2].shape == text_per_frame(torch.zeros(2, 77, 32), VIDEO_FRAMES).shape
