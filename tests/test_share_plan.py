"""share_plan="level": one plan per U-Net level and denoiser call, built from the level's first block input."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ReToM, SiTo, ToFu, ToMe
from tokenmerge.methods.base import CFG, PlanContext

from .conftest import run, unet_inputs


def plans_and_inputs(unet, config, args, kwargs):
    """``[(block, plan, block input)]`` in call order, for one denoiser call with ``config``."""
    events, inputs = [], {}

    def keep_input(name):
        def hook(module, a, kw):
            inputs.setdefault(name, (a[0] if a else kw["hidden_states"]).clone())
        return hook

    hooks = [target.block.register_forward_pre_hook(keep_input(target.name), with_kwargs=True)
             for target in tokenmerge.models.adapter_for(unet).all_targets()]
    try:
        with tokenmerge.patched(unet, config, on_plan=events.append):
            out = run(unet, args, kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return [(e.block, e.plan, inputs[e.block]) for e in events], out


@pytest.mark.parametrize("config", [ToMe(ratio=0.5, use_rand=False, max_downsample=2, share_plan="level"),
                                    ImportanceMerge(ratio=0.5, importance=torch.rand(16, 16), prune_steps=0.0,
                                                    max_downsample=2, seed=0, share_plan="level"),
                                    ReToM(ratio=0.5, max_downsample=2, share_plan="level")])
def test_level_plan_is_the_first_blocks_plan_reused_by_the_level(sd1_unet, config):
    args, kwargs = unet_inputs(sd1_unet, 2)
    events, _ = plans_and_inputs(sd1_unet, config, args, kwargs)
    levels = {0: (16, 16), 1: (8, 8)}
    generator = torch.Generator().manual_seed(0)  # the private one draws for level 0's plan, then level 1's
    for level, grid in levels.items():
        at_level = [(name, plan, x) for name, plan, x in events if x.shape[1] == grid[0] * grid[1]]
        assert len(at_level) >= 3, "the tiny SD1 U-Net runs several blocks per level"
        first_name, first_plan, first_x = at_level[0]
        assert first_name.startswith("down_blocks")
        assert all(plan is first_plan for _, plan, _ in at_level), "one plan object per level"
        ctx = PlanContext(grid=grid, generator=generator, guided=CFG, level=level,
                          bottleneck=level == len(sd1_unet.down_blocks) - 1,
                          importance=None if not isinstance(config, ImportanceMerge) else
                          torch.nn.functional.adaptive_avg_pool2d(config.importance[None, None], grid).reshape(1, -1))
        expected = config.make_plan(first_x, ctx)
        assert torch.equal(first_plan.kept, expected.kept) and torch.equal(first_plan.assign, expected.assign)


def test_block_mode_plans_each_block_from_its_own_input(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    config = ToMe(ratio=0.5, use_rand=False)
    events, out = plans_and_inputs(sd1_unet, config, args, kwargs)
    assert len({id(plan) for _, plan, _ in events}) == len(events)
    for _, plan, x in events:
        expected = config.make_plan(x, PlanContext(grid=(16, 16)))
        assert torch.equal(plan.assign, expected.assign)
    assert not any(torch.equal(events[0][1].assign, plan.assign) for _, plan, _ in events[1:]), \
        "blocks' inputs differ, so must their plans (else this test cannot tell the modes apart)"
    _, shared = plans_and_inputs(sd1_unet, ToMe(ratio=0.5, use_rand=False, share_plan="level"), args, kwargs)
    assert not torch.allclose(out, shared, atol=1e-5), "sharing changes outputs"


def test_level_sharing_is_per_denoiser_call(sd1_unet):
    config = ToMe(ratio=0.5, use_rand=False, share_plan="level")
    first = plans_and_inputs(sd1_unet, config, *unet_inputs(sd1_unet, 2, seed=0))[0][0][1]
    second = plans_and_inputs(sd1_unet, config, *unet_inputs(sd1_unet, 2, seed=1))[0][0][1]
    assert not torch.equal(first.assign, second.assign)


def test_tofu_level_sharing_keeps_pruning_and_merging_apart(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    events, _ = plans_and_inputs(sd1_unet, ToFu(ratio=0.5, use_rand=False, share_plan="level"), args, kwargs)
    top = [(name, plan) for name, plan, x in events if x.shape[1] == 256]
    down = {id(plan) for name, plan in top if name.startswith("down_blocks")}
    up = {id(plan) for name, plan in top if name.startswith("up_blocks")}
    assert len(down) == 1 and len(up) == 1 and down != up
    assert all(plan.prune == name.startswith("down_blocks") for name, plan in top)


def test_level_sharing_remove_restores_bit_identical_outputs(any_unet):
    args, kwargs = unet_inputs(any_unet, 2)
    unpatched = run(any_unet, args, kwargs)
    with tokenmerge.patched(any_unet, ToMe(ratio=0.5, max_downsample=4, share_plan="level")):
        assert not torch.allclose(run(any_unet, args, kwargs), unpatched, atol=1e-4)
    assert torch.equal(run(any_unet, args, kwargs), unpatched)


@pytest.mark.parametrize("make", [ToMe, ImportanceMerge, ReToM, SiTo, ToFu])
def test_invalid_share_plan_names_the_field(make):
    with pytest.raises(ValueError, match=r"share_plan must be one of \('block', 'level'\)"):
        make(share_plan="step")
