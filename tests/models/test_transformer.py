"""PixArt-alpha and DiT transformers: placement by fraction of depth, patch grid, learned sigma, CFG order."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
import tokenmerge.methods.base
import tokenmerge.models
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.models.transformer import block_range
from tokenmerge.tools.tiny import tiny_dit, tiny_pixart, tiny_unet

from .helpers import CountingProcessor
from .kit import FamilyConformance

GEN = torch.Generator()


def pixart_call(model, batch=2, t=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=gen)
    text = torch.randn(batch, 7, 32, generator=gen)
    with torch.no_grad():
        return model(x, encoder_hidden_states=text, timestep=torch.full((batch,), t),
                     added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample


def dit_call(model, t=500, seed=0):
    """A DiT CFG batch as DiTPipeline builds it: the same latent twice, labels [class; null class 1000]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, 16, 16, generator=gen).repeat(2, 1, 1, 1)
    with torch.no_grad():
        return model(x, timestep=torch.full((2,), t), class_labels=torch.tensor([3, 1000])).sample


FAMILIES = {"pixart": (tiny_pixart, pixart_call), "dit": (tiny_dit, dit_call)}


@pytest.fixture(params=list(FAMILIES))
def family(request):
    build, call = FAMILIES[request.param]
    return request.param, build(), call


class TestPixArt(FamilyConformance):
    build = staticmethod(tiny_pixart)
    call = staticmethod(pixart_call)


class TestDiT(FamilyConformance):
    build = staticmethod(tiny_dit)
    call = staticmethod(dit_call)


def test_pixart_preset_merges_self_and_cross_attention_of_the_middle_half():
    model = tiny_pixart()
    counters = []
    for block in model.transformer_blocks:
        pair = (CountingProcessor(), CountingProcessor())
        block.attn1.set_processor(pair[0])
        block.attn2.set_processor(pair[1])
        counters.append(pair)
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, seed=0)):
        config = tokenmerge.current_config(model)
        pixart_call(model)
    assert config.layers == (0.25, 0.75) and config.merge_crossattn and config.match == "grid"
    n, kept = 64, 64 - int(64 * 0.5)  # 16x16 latent in 2x2 patches
    for i, (attn1, attn2) in enumerate(counters):  # blocks 1 and 2 of 4: 7-20 of 28 scaled
        queries = kept if i in (1, 2) else n
        assert attn1.calls == [(queries, queries)]  # self-attention: merged keys too
        assert attn2.calls == [(queries, 7)]  # cross-attention: merged queries, all text tokens


def test_layers_are_configurable_and_scale_with_depth():
    assert block_range(0.25, 0.75, 28) == (7, 21)  # the paper's 7-20 of 28
    assert block_range(0.25, 0.75, 4) == (1, 3)
    model = tiny_pixart()
    with tokenmerge.patched(model, ToMe(ratio=0.5, layers=(0.0, 1.0))):
        hooked = [bool(b._forward_pre_hooks) for b in model.transformer_blocks]
    assert hooked == [True] * 4
    with pytest.raises(ValueError, match="layers must be None or a .start, end."):
        ToMe(layers=(0.5, 0.5))


def test_cfg_importance_drops_the_learned_sigma_channels_and_is_pooled_to_the_patch_grid(family):
    name, model, call = family
    events = []
    tokenmerge.apply(model, ImportanceMerge(ratio=0.5, seed=0, prune_steps=0.0), on_plan=events.append)
    eps = call(model, t=900)
    noise = eps[:, :4]  # 8 output channels: noise, then the learned variance
    diff = (noise[1:] - noise[:1]).abs().mean(dim=1)  # |cond - uncond| whatever the batch order
    torch.testing.assert_close(model._tokenmerge.importance, diff)
    events.clear()
    call(model, t=800)
    tokenmerge.remove(model)
    pooled = torch.nn.functional.avg_pool2d(diff[:, None], 2)[:, 0].reshape(1, -1)  # 16x16 latent -> 8x8 patches
    assert events and all(e.grid == (8, 8) for e in events)
    torch.testing.assert_close(events[0].importance, pooled)


def test_dit_matches_on_the_conditional_half_which_comes_first():
    model = tiny_dit()
    assert tokenmerge.models.adapter_for(model).cond_first
    events = []
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, seed=0, prune_steps=0.0, importance=torch.rand(8, 8)),
                            on_plan=events.append):
        dit_call(model)
    for event in events:  # one plan for the pair, built from the [cond] row
        assert torch.equal(event.plan.kept[0], event.plan.kept[1])
    ctx = tokenmerge.methods.base.PlanContext(grid=(1, 1), generator=GEN, guided=tokenmerge.methods.base.CFG_COND_FIRST)
    x = torch.arange(4.0)[:, None, None]
    assert ctx.conditional(x).flatten().tolist() == [0.0, 1.0]


def test_grid_matching_sends_every_merged_token_to_its_nearest_destination():
    model = tiny_pixart()
    events = []
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, seed=0, prune_steps=0.0), on_plan=events.append):
        pixart_call(model, t=900)
        pixart_call(model, t=800)  # importance known: random destinations from the pool
    plan = events[-1].plan
    ys, xs = torch.arange(64) // 8, torch.arange(64) % 8
    dst = plan.kept[0, : plan.num_dst]
    for token in range(64):
        slot = int(plan.assign[0, token])
        if slot < plan.num_dst and token not in plan.kept[0].tolist():
            d = (ys[token] - ys[dst]) ** 2 + (xs[token] - xs[dst]) ** 2
            assert d[slot] == d.min()


def test_placement_fields_of_the_wrong_family_raise():
    with pytest.raises(ValueError, match="max_downsample counts U-Net levels.*layers="):
        tokenmerge.apply(tiny_pixart(), ToMe(max_downsample=2))
    with pytest.raises(ValueError, match="U-Net: leave layers=None and use max_downsample"):
        tokenmerge.apply(tiny_unet("sd1"), ToMe(layers=(0.25, 0.75)))
    with pytest.raises(ValueError, match="temporal_ratio.*has none"):
        tokenmerge.apply(tiny_dit(), ToMe(temporal_ratio=0.2))
    with pytest.raises(ValueError, match="no cross-attention.*importance='cfg'"):
        tokenmerge.apply(tiny_dit(), ImportanceMerge(importance="crossattn"))
    with pytest.raises(ValueError, match=r"would patch nothing.*layers=\(0.8, 0.9\) selects none of its 4 blocks"):
        tokenmerge.apply(tiny_dit(), ToMe(layers=(0.8, 0.9)))  # between blocks 3.2 and 3.6 of 4: none
    # DiT's blocks have no cross-attention: the advice names only the parts they have.
    with pytest.raises(ValueError, match="none of the parts.*set merge_attn=True or merge_mlp=True$"):
        tokenmerge.apply(tiny_dit(), ToMe(merge_attn=False, merge_crossattn=True))
