"""ImportanceMerge on a U-Net: the CFG signal, user maps, the pool at block level, validation."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge

from .conftest import run, unet_inputs


def test_cfg_importance_is_the_guidance_magnitude_of_the_previous_call(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 4)  # two CFG pairs: [uncond, uncond, cond, cond]
    events = []
    tokenmerge.apply(sd1_unet, ImportanceMerge(ratio=0.7, seed=0, prune_steps=0.0), on_plan=events.append)
    eps = run(sd1_unet, args, kwargs, timestep=900)
    expected = (eps[2:] - eps[:2]).abs().mean(dim=1)
    torch.testing.assert_close(sd1_unet._tokenmerge.importance, expected)
    events.clear()
    run(sd1_unet, args, kwargs, timestep=800)
    tokenmerge.remove(sd1_unet)
    top = events[0]
    torch.testing.assert_close(top.importance, expected.reshape(2, -1))
    # The plan of each pair keeps only pool tokens, the pool being the most important ones.
    config = ImportanceMerge(ratio=0.7)
    n = 256
    pool = expected.reshape(2, -1).topk(config.pool_size(n), dim=1).indices
    for pair in range(2):
        kept = set(top.plan.kept[pair].tolist())
        assert kept <= set(pool[pair].tolist())
        assert top.plan.kept[pair].tolist() == top.plan.kept[pair + 2].tolist()  # shared by the CFG pair
    assert top.plan.num_kept == n - int(n * 0.7)
    assert top.plan.num_dst == int(n * 0.25)


def test_user_map_steers_the_kept_tokens(sd1_unet):
    user_map = torch.zeros(16, 16)
    user_map[:6, :6] = torch.rand(6, 6) + 1  # the important region: the top-left corner
    events = []
    args, kwargs = unet_inputs(sd1_unet, 3)  # no CFG pair needed with a user map
    with tokenmerge.patched(sd1_unet, ImportanceMerge(ratio=0.75, pool=0.0, importance=user_map, prune_steps=0.0),
                            on_plan=events.append):
        run(sd1_unet, args, kwargs)
    pool = set(user_map.reshape(-1).topk(64).indices.tolist())
    for event in events:
        for row in event.plan.kept:
            assert set(row.tolist()) == pool  # pool = 0: exactly the most important tokens are computed on


def test_callable_map_is_evaluated_each_step(sd1_unet):
    seen = []

    def importance(step):
        seen.append(step)
        return torch.rand(1, 16, 16)

    args, kwargs = unet_inputs(sd1_unet, 2)
    with tokenmerge.patched(sd1_unet, ImportanceMerge(importance=importance)):
        for t in (900, 600, 300):
            run(sd1_unet, args, kwargs, timestep=t)
    assert seen == [0, 1, 2]


def test_cfg_importance_on_an_odd_batch_names_the_alternative(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 3)
    with tokenmerge.patched(sd1_unet, ImportanceMerge()):
        with pytest.raises(ValueError, match=r"classifier-free guidance.*importance=<map"):
            run(sd1_unet, args, kwargs)


def test_pruning_phase_on_a_bare_unet_follows_the_timestep(sd1_unet):
    """Without a pipeline the progress is 1 - t/1000: prune_steps=0.1 prunes while t > 900."""
    events = []
    args, kwargs = unet_inputs(sd1_unet, 2)
    with tokenmerge.patched(sd1_unet, ImportanceMerge(seed=0), on_plan=events.append):
        for t in (981, 941, 901, 881, 501):
            run(sd1_unet, args, kwargs, timestep=t)
    phases = [e.prune_phase for e in events if e.block.startswith("down_blocks.0")]
    assert phases == [True, True, True, False, False]
    for event in events:
        assert event.plan.prune == event.prune_phase
        roles = event.plan.roles()[0].reshape(16, 16)
        if event.prune_phase:  # one destination per 2x2 cell
            cells = (roles == 1).reshape(8, 2, 8, 2).sum(dim=(1, 3))
            assert (cells == 1).all()


def test_global_rng_is_not_consumed(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    before = torch.get_rng_state()
    with tokenmerge.patched(sd1_unet, ImportanceMerge()):
        for t in (950, 500):
            run(sd1_unet, args, kwargs, timestep=t)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(ratio=0.8), "ratio"),
        (dict(ratio=0.6, dst=0.5), "ratio"),
        (dict(pool=-0.1), "pool"),
        (dict(dst=0.0), "dst"),
        (dict(prune_steps=1.5), "prune_steps"),
        (dict(importance="attention"), "importance"),
        (dict(importance=torch.rand(4)), "importance"),
        (dict(dst_selection="best"), "dst_selection"),
        (dict(independent_from="pool+"), "independent_from"),
        (dict(max_downsample=0), "max_downsample"),
        (dict(merge_attn=False), "merge_attn"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ImportanceMerge(**kwargs)


def test_pool_size_follows_the_paper():
    config = ImportanceMerge(ratio=0.7, pool=0.4)
    assert config.pool_size(4096) == int((4096 - int(4096 * 0.7)) * 1.4)  # N (1 - r) (1 + p)
    assert ImportanceMerge(ratio=0.2, pool=0.4).pool_size(4096) == 4096  # low ratio: the whole set
