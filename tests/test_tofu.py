"""ToFu: which blocks prune and which merge, ToMe's matching, MLERP, identity cases, validation."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge.methods.base import PlanContext
from tokenmerge.methods.tofu import MlerpPlan, ToFu
from tokenmerge.methods.tome import ToMe
from tokenmerge.plan import MergePlan, gather_tokens
from tokenmerge.tools.tiny import tiny_unet

from .conftest import run, unet_inputs

DOWN = "down_blocks.0.attentions.0.transformer_blocks.0"
MID = "mid_block.attentions.0.transformer_blocks.0"
UP = "up_blocks.2.attentions.1.transformer_blocks.0"


def expected_prune(prune_blocks: str, block: str) -> bool:
    """The documented rule, written out independently of ToFu.prunes."""
    stage = block.split(".")[0]
    return {
        "down": stage == "down_blocks",
        "down_mid": stage in ("down_blocks", "mid_block"),
        "all": True,
        "none": False,
    }[prune_blocks]


#: The stage each U-Net block name runs in (``PatchTarget.stage``).
STAGE = {DOWN: "down", MID: "mid", UP: "up"}


def context(h: int, w: int, seed: int, block: str) -> PlanContext:
    return PlanContext(grid=(h, w), generator=torch.Generator().manual_seed(seed), block=block, stage=STAGE[block])


def collect_events(unet, config, batch=2, size=(16, 16)):
    events = []
    args, kwargs = unet_inputs(unet, batch, *size)
    with tokenmerge.patched(unet, config, on_plan=events.append):
        out = run(unet, args, kwargs)
    return events, out


@pytest.fixture(scope="module")
def unets():
    return {kind: tiny_unet(kind) for kind in ("sd1", "sd2", "sdxl")}


# -- where ToFu prunes and where it merges ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("prune_blocks", ["down", "down_mid", "all", "none"])
def test_prune_and_merge_blocks_follow_the_rule(unets, kind, prune_blocks):
    events, _ = collect_events(unets[kind], ToFu(ratio=0.5, prune_blocks=prune_blocks, max_downsample=8, seed=0,
                                                         min_tokens=0))  # the 4x4 bottleneck too
    stages = {event.block.split(".")[0] for event in events}
    assert stages == {"down_blocks", "mid_block", "up_blocks"}, "every stage must be patched for this test"
    for event in events:
        prune = expected_prune(prune_blocks, event.block)
        assert event.plan.prune is prune, event.block
        assert isinstance(event.plan, MlerpPlan) is (not prune), event.block


def test_default_prunes_the_first_level_down_blocks_and_merges_the_up_blocks(unets):
    """The paper's default on ToMeSD's placement: the top-level encoder blocks prune, the decoder blocks merge."""
    events, _ = collect_events(unets["sd1"], ToFu(seed=0))
    by_block = {event.block: event.plan for event in events}
    assert sorted(by_block) == [
        "down_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.2.attentions.0.transformer_blocks.0",
        "up_blocks.2.attentions.1.transformer_blocks.0",
    ]
    assert by_block["down_blocks.0.attentions.0.transformer_blocks.0"].prune
    assert not any(plan.prune for name, plan in by_block.items() if name.startswith("up_blocks"))
    # SDXL: the first level with attention is level 1
    events, _ = collect_events(unets["sdxl"], ToFu(seed=0))
    assert {e.block.split(".")[1] for e in events if e.plan.prune} == {"1"}
    assert all(e.block.startswith("down_blocks.1.") for e in events if e.plan.prune)
    assert any(e.block.startswith("up_blocks.1.") and not e.plan.prune for e in events)


def test_prunes_helper():
    assert ToFu().prunes("down") and not ToFu().prunes("mid") and not ToFu().prunes("up")
    assert ToFu(prune_blocks="down_mid").prunes("mid") and not ToFu(prune_blocks="down_mid").prunes("up")
    assert ToFu(prune_blocks="all").prunes("up") and not ToFu(prune_blocks="none").prunes("down")
    assert not ToFu().prunes("blocks") and ToFu(prune_blocks="all").prunes("blocks")  # a transformer's blocks


# -- the matching is ToMe's -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("settings", [dict(ratio=0.5), dict(ratio=0.6, sx=4, sy=2), dict(ratio=0.3, use_rand=False)])
def test_token_counts_equal_tome(unets, kind, settings):
    ours, _ = collect_events(unets[kind], ToFu(max_downsample=8, seed=3, min_tokens=0, **settings))
    theirs, _ = collect_events(unets[kind], ToMe(max_downsample=8, seed=3, min_tokens=0, **settings))
    assert [e.block for e in ours] == [e.block for e in theirs]
    for a, b in zip(ours, theirs):
        n = a.grid[0] * a.grid[1]
        assert a.plan.num_kept == b.plan.num_kept == n - int(n * settings["ratio"])
        assert a.plan.num_dst == b.plan.num_dst


@pytest.mark.parametrize("block", [DOWN, MID, UP])
@pytest.mark.parametrize(
    "h,w,batch,settings",
    [(8, 8, 2, {}), (7, 9, 4, dict(ratio=0.6, sx=4, sy=2)), (6, 10, 3, dict(ratio=0.4)), (5, 5, 2, dict(ratio=0.7))],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_plan_matches_tome_for_the_same_seed(block, h, w, batch, settings, seed):
    """Same generator state -> ToMe's kept/assign; without MLERP a merge block's plan *is* ToMe's plan."""
    x = torch.randn(batch, h * w, 6, generator=torch.Generator().manual_seed(seed + 10))
    tome = ToMe(**settings).make_plan(x, context(h, w, seed, block))
    for mlerp in (False, True):
        config = ToFu(mlerp=mlerp, **settings)
        plan = config.make_plan(x, context(h, w, seed, block))
        assert torch.equal(plan.kept, tome.kept) and torch.equal(plan.assign, tome.assign)
        assert plan.num_dst == tome.num_dst
        assert plan.prune is config.prunes(STAGE[block])
        if not plan.prune:
            assert type(plan) is (MlerpPlan if mlerp else MergePlan)
            if not mlerp:
                assert torch.equal(plan.merge(x), tome.merge(x))


@pytest.mark.parametrize("kind", ["sd1", "sd2", "sdxl"])
def test_merging_only_without_mlerp_is_tome_end_to_end(unets, kind):
    unet = unets[kind]
    _, ours = collect_events(unet, ToFu(ratio=0.5, prune_blocks="none", mlerp=False, max_downsample=2, seed=7))
    _, theirs = collect_events(unet, ToMe(ratio=0.5, max_downsample=2, seed=7))
    assert torch.equal(ours, theirs)


# -- MLERP --------------------------------------------------------------------------------------------------


def test_mlerp_by_hand():
    # slot 0: (3, 0) and (0, 4): mean (1.5, 2) of norm 2.5, largest norm 4 -> (2.4, 3.2)
    # slot 1: (1, 0) and (-1, 0) cancel: no direction, stays zero; slot 2: a single token, unchanged
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0], [1.0, 0.0], [-1.0, 0.0], [0.3, -0.7]]])
    plan = MlerpPlan(kept=torch.tensor([[0, 2, 4]]), assign=torch.tensor([[0, 0, 1, 1, 2]]), num_dst=2)
    merged = plan.merge(x)
    torch.testing.assert_close(merged, torch.tensor([[[2.4, 3.2], [0.0, 0.0], [0.3, -0.7]]]))
    assert torch.equal(merged[0, 2], x[0, 4])
    assert torch.equal(plan.unmerge(merged), merged[:, [0, 0, 1, 1, 2]])


def brute_force_mlerp(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    out = torch.empty(x.shape[0], plan.num_kept, x.shape[2], dtype=torch.float64)
    for b in range(x.shape[0]):
        for slot in range(plan.num_kept):
            members = x[b, plan.assign[b] == slot].double()
            if len(members) == 1:
                out[b, slot] = members[0]
                continue
            mean = members.mean(dim=0)
            out[b, slot] = mean / mean.norm() * members.norm(dim=1).max()
    return out


@pytest.mark.parametrize("h,w,batch,c,ratio,seed", [(8, 8, 2, 5, 0.5, 0), (6, 9, 3, 7, 0.7, 1), (4, 4, 2, 3, 0.75, 2)])
def test_mlerp_matches_brute_force(h, w, batch, c, ratio, seed):
    gen = torch.Generator().manual_seed(seed)
    # tokens of very different norms, so that the largest member norm differs from the mean's
    x = torch.randn(batch, h * w, c, generator=gen) * torch.rand(batch, h * w, 1, generator=gen).mul(5).add(0.1)
    plan = ToFu(ratio=ratio).make_plan(x, context(h, w, seed, UP))
    assert isinstance(plan, MlerpPlan)
    merged = plan.merge(x)
    torch.testing.assert_close(merged.double(), brute_force_mlerp(x, plan), atol=1e-5, rtol=1e-5)
    sizes = torch.stack([torch.bincount(row, minlength=plan.num_kept) for row in plan.assign])
    assert (sizes > 1).any(), "the example must merge"
    # a merged slot: the mean's direction at the largest member norm; a single token: bit-identical
    mean = MergePlan(kept=plan.kept, assign=plan.assign, num_dst=plan.num_dst).merge(x)
    largest = torch.stack([
        torch.zeros(plan.num_kept).scatter_reduce(0, row, x[b].norm(dim=-1), "amax", include_self=False)
        for b, row in enumerate(plan.assign)
    ])
    multi = sizes > 1
    torch.testing.assert_close(merged.norm(dim=-1)[multi], largest[multi])
    cosine = torch.nn.functional.cosine_similarity(merged, mean, dim=-1)
    torch.testing.assert_close(cosine[multi], torch.ones_like(cosine[multi]))
    assert torch.equal(merged[~multi], gather_tokens(x, plan.kept)[~multi])
    assert (merged.norm(dim=-1)[multi] >= mean.norm(dim=-1)[multi] - 1e-5).all(), "MLERP never shrinks the mean"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mlerp_low_precision(dtype):
    x32 = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    plan = ToFu(ratio=0.6).make_plan(x32, context(8, 8, 0, UP))
    merged = plan.merge(x32.to(dtype))
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    torch.testing.assert_close(merged.float(), plan.merge(x32), atol=5e-2, rtol=5e-2)
    assert plan.unmerge(merged).shape == x32.shape


def test_mlerp_plan_refuses_pruning():
    with pytest.raises(ValueError, match="pruning"):
        MlerpPlan(kept=torch.tensor([[0]]), assign=torch.tensor([[0, 0]]), num_dst=1, prune=True)


# -- on the U-Net: what the attention sees and what every token gets back ----------------------------------


def test_attention_inputs_and_outputs_in_prune_and_merge_blocks(unets):
    unet = unets["sd1"]
    down = unet.down_blocks[0].attentions[0].transformer_blocks[0]
    up = unet.up_blocks[2].attentions[0].transformer_blocks[0]
    events = []
    tokenmerge.apply(unet, ToFu(ratio=0.6, seed=0), on_plan=events.append)
    seen = {}

    def hooks(name, attn):
        def original(module, args, kwargs):  # runs before the merge hook (prepended)
            seen[name, "x"] = (args[0] if args else kwargs["hidden_states"]).clone()

        def merged(module, args, kwargs):  # runs after it
            seen[name, "merged"] = (args[0] if args else kwargs["hidden_states"]).clone()

        def output(module, args, out):  # runs after the unmerge hook
            seen[name, "out"] = out.clone()

        return [attn.register_forward_pre_hook(original, with_kwargs=True, prepend=True),
                attn.register_forward_pre_hook(merged, with_kwargs=True),
                attn.register_forward_hook(output)]

    handles = hooks("down", down.attn1) + hooks("up", up.attn1)
    try:
        args, kwargs = unet_inputs(unet, 2)
        run(unet, args, kwargs)
    finally:
        for handle in handles:
            handle.remove()
        tokenmerge.remove(unet)
    plans = {event.block: event.plan for event in events}
    prune_plan = plans["down_blocks.0.attentions.0.transformer_blocks.0"]
    merge_plan = plans["up_blocks.2.attentions.0.transformer_blocks.0"]
    assert prune_plan.prune and isinstance(merge_plan, MlerpPlan)

    # prune block: the attention sees exactly the kept tokens; a pruned token gets its destination's output
    x = seen["down", "x"]
    assert torch.equal(seen["down", "merged"], gather_tokens(x, prune_plan.kept))
    out = seen["down", "out"]
    assert torch.equal(out, gather_tokens(out, prune_plan.kept[torch.arange(2)[:, None], prune_plan.assign]))
    assert out.shape == x.shape

    # merge block: merged slots carry the largest member norm; every token gets its slot's output
    x = seen["up", "x"]
    merged = seen["up", "merged"]
    torch.testing.assert_close(merged.double(), brute_force_mlerp(x, merge_plan).to(torch.float64),
                               atol=1e-5, rtol=1e-5)
    out = seen["up", "out"]
    assert torch.equal(out, gather_tokens(out, merge_plan.kept[torch.arange(2)[:, None], merge_plan.assign]))


# -- identity cases and effect -----------------------------------------------------------------------------


def test_ratio_zero_is_bit_identical(any_unet):
    args, kwargs = unet_inputs(any_unet, 2)
    unpatched = run(any_unet, args, kwargs)
    events = []
    with tokenmerge.patched(any_unet, ToFu(ratio=0.0, max_downsample=8), on_plan=events.append):
        assert torch.equal(run(any_unet, args, kwargs), unpatched)
    assert events and all(event.plan is None for event in events)


@pytest.mark.parametrize("prune_blocks", ["down", "all", "none"])
def test_remove_restores_bit_identical_outputs(any_unet, prune_blocks):
    args, kwargs = unet_inputs(any_unet, 2)
    unpatched = run(any_unet, args, kwargs)
    tokenmerge.apply(any_unet, ToFu(ratio=0.5, prune_blocks=prune_blocks, max_downsample=2, seed=0))
    merged = [run(any_unet, args, kwargs, timestep=t) for t in (950, 400)]
    tokenmerge.remove(any_unet)
    for out in merged:
        assert out.shape == unpatched.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, unpatched, atol=1e-4), "the patch must change outputs"
    assert torch.equal(run(any_unet, args, kwargs), unpatched)
    assert not hasattr(any_unet, "_tokenmerge")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in any_unet.modules())


def test_mlerp_and_pruning_change_outputs(unets):
    unet = unets["sd1"]
    outputs = {
        name: collect_events(unet, config)[1]
        for name, config in {
            "tofu": ToFu(ratio=0.5, seed=0),
            "no_mlerp": ToFu(ratio=0.5, seed=0, mlerp=False),
            "tome": ToMe(ratio=0.5, seed=0),
        }.items()
    }
    assert all(torch.isfinite(out).all() for out in outputs.values())
    assert not torch.equal(outputs["tofu"], outputs["no_mlerp"])  # MLERP acts in the up blocks
    assert not torch.equal(outputs["no_mlerp"], outputs["tome"])  # pruning acts in the down block


def test_seed_is_deterministic(unets):
    unet = unets["sd2"]
    a = collect_events(unet, ToFu(seed=1))[1]
    assert torch.equal(a, collect_events(unet, ToFu(seed=1))[1])
    assert not torch.equal(a, collect_events(unet, ToFu(seed=2))[1])


def test_odd_batch_and_odd_latent(unets):
    out = collect_events(unets["sd1"], ToFu(ratio=0.5, max_downsample=4), batch=3, size=(9, 13))[1]
    assert out.shape == (3, 4, 9, 13) and torch.isfinite(out).all()


# -- validation ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(ratio=0.8), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=float("nan")), "ratio"),
        (dict(ratio="0.5"), "ratio"),
        (dict(ratio=0.95, sx=4, sy=4), "ratio"),
        (dict(sx=0), "sx"),
        (dict(sy=9), "sy"),
        (dict(sx=2.0), "sx"),
        (dict(sx=1, sy=1), "sx * sy"),
        (dict(max_downsample=3), "max_downsample"),
        (dict(merge_attn=False), "merge_attn"),
        (dict(seed="x"), "seed"),
        (dict(prune_blocks="up"), "prune_blocks"),
        (dict(prune_blocks=None), "prune_blocks"),
        (dict(mlerp=1), "mlerp"),
        (dict(use_rand="yes"), "use_rand"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("*", r"\*")):
        ToFu(**kwargs)


def test_config_is_a_frozen_method_config():
    config = ToFu()
    assert isinstance(config, tokenmerge.methods.base.MethodConfig) and config.signal is None
    assert config == ToFu() and config != ToFu(mlerp=False)
    assert ToFu(ratio=0.875, sx=4, sy=2).max_ratio() == 0.875
    with pytest.raises(Exception):
        config.ratio = 0.3  # type: ignore[misc]
