"""SiTo: the paper's definitions (Eqs. 3-6) against brute force, the base strategies of Table 3,
the noise's randomness, U-Net integration, the memory bound and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tokenmerge
from tokenmerge.methods import sito as sito_module
from tokenmerge.methods.base import CFG, PlanContext
from tokenmerge.methods.sito import BASE_STRATEGIES, SiTo, patch_argmax, sim_score
from tokenmerge.plan import cell_destinations
from tokenmerge.tools.tiny import tiny_unet

from .conftest import run, unet_inputs


def tokens(batch=2, height=12, width=10, channels=16, seed=0):
    """Spatially smooth random features, so similarities are structured as in a real feature map."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(batch, channels, (height + 3) // 4, (width + 3) // 4, generator=gen)
    smooth = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
    x = smooth + 0.3 * torch.randn(batch, channels, height, width, generator=gen)
    return x.flatten(2).transpose(1, 2).contiguous()


def context(height, width, seed=0, **kwargs):
    return PlanContext(grid=(height, width), generator=torch.Generator().manual_seed(seed), **kwargs)


def cosine_matrix(x):
    unit = F.normalize(x.double(), dim=-1)
    return unit @ unit.transpose(-1, -2)


def base_of(plan):
    return plan.kept[:, : plan.num_dst]


def as_sets(indices):
    return [set(row.tolist()) for row in indices]


def full_cells(height, width, s):
    """``(cells, s*s)`` token indices of every full s x s patch, raster order."""
    cells = []
    for cy in range(height // s):
        for cx in range(width // s):
            cells.append([(cy * s + dy) * width + cx * s + dx for dy in range(s) for dx in range(s)])
    return torch.tensor(cells)


# -- definitions ---------------------------------------------------------------------------------

def test_sim_score_is_the_row_sum_of_the_cosine_matrix():
    x = tokens(3, 9, 7)
    x[1, 5] = 0  # an all-zero token has similarity 0 to everything
    expected = F.normalize(x.double(), dim=-1) @ F.normalize(x.double(), dim=-1).transpose(1, 2)
    actual = sim_score(x)
    assert actual.dtype == torch.float32 and actual.shape == (3, 63)
    torch.testing.assert_close(actual.double(), expected.sum(-1), atol=1e-4, rtol=1e-5)
    assert actual[1, 5] == 0


@pytest.mark.parametrize("height,width,s", [(12, 10, 2), (13, 11, 3), (9, 9, 2)])
def test_patch_argmax_picks_the_best_token_of_every_full_patch(height, width, s):
    score = torch.randn(2, height * width)
    cells = full_cells(height, width, s)
    chosen = patch_argmax(score, height, width, s)
    for b in range(2):
        best = cells[torch.arange(len(cells)), score[b][cells].argmax(dim=1)]
        assert chosen[b].tolist() == best.tolist()


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("height,width", [(12, 10), (15, 17)])
def test_counts_base_and_pruned_tokens_follow_the_paper(ratio, height, width):
    """Strategy V (sigma = 0): base = argmax of SimScore per patch (Eq. 5); pruned = the K non-base tokens of
    highest max similarity to a base token (Eq. 6); recovery copies the most similar base token's output."""
    batch, n = 2, height * width
    x = tokens(batch, height, width)
    plan = SiTo(ratio=ratio, base="V", seed=0).make_plan(x, context(height, width))
    k = int(n * ratio)
    assert plan.prune and plan.num_kept == n - k
    cos = cosine_matrix(x)
    score = cos.sum(-1)
    cells = full_cells(height, width, 2)
    assert plan.num_dst == len(cells)
    y = torch.randn(batch, plan.num_kept, 5)  # any block output on the kept tokens
    out = plan.unmerge(y)
    merged = plan.merge(x)
    for b in range(batch):
        base = cells[torch.arange(len(cells)), score[b][cells].argmax(dim=1)]
        assert set(base_of(plan)[b].tolist()) == set(base.tolist())
        is_base = torch.zeros(n, dtype=torch.bool)
        is_base[base] = True
        others = (~is_base).nonzero().squeeze(1)
        best_sim, best = cos[b][others][:, base].max(dim=1)
        pruned = set(others[best_sim.topk(k).indices].tolist())
        kept = set(plan.kept[b].tolist())
        assert kept == set(range(n)) - pruned
        assert torch.equal(merged[b], x[b, plan.kept[b]])  # pruning computes on the kept tokens only
        for slot, token in enumerate(plan.kept[b].tolist()):
            assert torch.equal(out[b, token], y[b, slot])  # kept tokens get their own values exactly
        slot_of = {token: slot for slot, token in enumerate(plan.kept[b].tolist())}
        for j, token in enumerate(others.tolist()):
            if token in pruned:  # a copy of its most similar base token's output
                assert torch.equal(out[b, token], y[b, slot_of[base[best[j]].item()]])


def test_plans_are_per_batch_element():
    a, b = tokens(1, 12, 10, seed=1), tokens(1, 12, 10, seed=2)
    config = SiTo(ratio=0.5, base="V")
    both = config.make_plan(torch.cat([a, b]), context(12, 10, guided=CFG))
    alone = [config.make_plan(t, context(12, 10)) for t in (a, b)]
    for i in range(2):
        assert torch.equal(both.kept[i], alone[i].kept[0])
        assert torch.equal(both.assign[i], alone[i].assign[0])


# -- base strategies (Table 3) ------------------------------------------------------------------

def test_every_strategy_has_a_numeral_alias_and_matches_it():
    x = tokens(2, 12, 10)
    for name, numeral in BASE_STRATEGIES.items():
        assert SiTo(base=numeral).strategy == name
        by_name = SiTo(base=name).make_plan(x, context(12, 10, seed=3))
        by_numeral = SiTo(base=numeral).make_plan(x, context(12, 10, seed=3))
        assert torch.equal(by_name.kept, by_numeral.kept)
    assert SiTo().strategy == "noisy_simscore_patch"


def test_strategy_I_is_the_top_left_token_of_every_patch():
    x = tokens(2, 13, 11)
    plan = SiTo(base="I", patch=3).make_plan(x, context(13, 11))
    expected = full_cells(13, 11, 3)[:, 0]
    for row in base_of(plan):
        assert row.tolist() == expected.tolist()


@pytest.mark.parametrize("base", ["II", "III"])
def test_global_strategies_pick_a_quarter_of_the_tokens(base):
    height, width = 12, 10
    x = tokens(2, height, width)
    plan = SiTo(base=base, ratio=0.5).make_plan(x, context(height, width))
    chosen = base_of(plan)
    assert chosen.shape == (2, height * width // 4)
    assert all(len(s) == chosen.shape[1] for s in as_sets(chosen))
    if base == "III":  # the highest SimScore globally, no noise
        expected = cosine_matrix(x).sum(-1).topk(chosen.shape[1], dim=1).indices
        assert as_sets(chosen) == as_sets(expected)
    else:  # uniform draws: they change with the generator and differ between images
        other = SiTo(base=base, ratio=0.5).make_plan(x, context(height, width, seed=1))
        assert as_sets(base_of(other)) != as_sets(chosen)
        assert as_sets(chosen)[0] != as_sets(chosen)[1]


def test_global_random_strategy_is_not_tied_to_patches():
    # Over several draws some 2x2 patch holds two base tokens (impossible for the per-patch strategies).
    height, width = 12, 10
    x = tokens(1, height, width)
    cells = full_cells(height, width, 2)
    crowded = False
    for seed in range(5):
        chosen = base_of(SiTo(base="II").make_plan(x, context(height, width, seed=seed)))[0]
        member = torch.zeros(height * width, dtype=torch.long)
        member[chosen] = 1
        crowded |= bool((member[cells].sum(1) > 1).any())
    assert crowded


@pytest.mark.parametrize("base", ["IV", "VI"])
def test_per_patch_random_strategies_choose_one_token_per_full_patch(base):
    height, width = 15, 17
    x = tokens(2, height, width)
    cells = full_cells(height, width, 2)
    draws = []
    for seed in range(3):
        chosen = base_of(SiTo(base=base, sigma=5.0).make_plan(x, context(height, width, seed=seed)))
        for row in chosen:
            member = torch.zeros(height * width, dtype=torch.long)
            member[row] = 1
            assert (member[cells].sum(1) == 1).all()  # exactly one per full patch
            assert member.sum() == len(cells)  # none in the partial edge patches
        draws.append(as_sets(chosen))
    assert draws[0] != draws[1] != draws[2]


def test_strategy_VI_without_noise_is_V_and_with_noise_departs_from_it():
    x = tokens(2, 12, 10)
    v = SiTo(base="V").make_plan(x, context(12, 10))
    assert torch.equal(SiTo(base="VI", sigma=0.0).make_plan(x, context(12, 10)).kept, v.kept)
    assert torch.equal(SiTo(base="VI", sigma=1e-6).make_plan(x, context(12, 10)).kept, v.kept)
    assert as_sets(base_of(SiTo(base="VI", sigma=3.0).make_plan(x, context(12, 10)))) != as_sets(base_of(v))


def test_relative_sigma_is_in_units_of_the_simscore_spread():
    """Relative: eps ~ N(0, (sigma * std_b(SimScore))^2), per image, so the noise keeps pace with SimScore's
    spread as N grows; absolute (the authors' code): eps ~ N(0, sigma^2). Same draws from the generator."""
    x = tokens(2, 12, 10)
    score = sim_score(x)
    ctx_seed = 7
    plan = SiTo(base="VI", sigma=0.5, sigma_relative=True).make_plan(x, context(12, 10, seed=ctx_seed))
    noise = torch.randn(2, 120, generator=torch.Generator().manual_seed(ctx_seed))
    expected = patch_argmax(score + 0.5 * score.std(dim=1, keepdim=True) * noise, 12, 10, 2)
    assert torch.equal(base_of(plan), expected)
    absolute = SiTo(base="VI", sigma=0.5).make_plan(x, context(12, 10, seed=ctx_seed))
    assert torch.equal(base_of(absolute), patch_argmax(score + 0.5 * noise, 12, 10, 2))


# -- noise across steps --------------------------------------------------------------------------

def test_noise_changes_the_base_tokens_between_calls_and_a_seed_reproduces_them():
    x = tokens(2, 16, 16)
    config = SiTo(sigma=1.0)

    def sequence(seed):
        ctx = context(16, 16, seed=seed)  # one generator, consumed call after call as in a run
        return [as_sets(base_of(config.make_plan(x, ctx))) for _ in range(4)]

    first = sequence(0)
    assert all(first[i] != first[i + 1] for i in range(3))  # same input, different draws
    assert sequence(0) == first
    assert sequence(1) != first


def test_noise_through_a_unet_run_is_private_and_reproducible(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)

    def plans(config):
        events = []
        with tokenmerge.patched(sd1_unet, config, on_plan=events.append):
            outs = [run(sd1_unet, args, kwargs, timestep=t) for t in (900, 700, 500)]
        top = [e for e in events if e.block == events[0].block]
        return outs, [as_sets(base_of(e.plan)) for e in top]

    before = torch.get_rng_state()
    outs, bases = plans(SiTo(seed=4, sigma=1.0))
    assert torch.equal(before, torch.get_rng_state())  # the global RNG is never consumed
    assert bases[0] != bases[1] != bases[2]  # the base tokens change from step to step
    outs2, bases2 = plans(SiTo(seed=4, sigma=1.0))
    assert bases2 == bases and all(torch.equal(a, b) for a, b in zip(outs, outs2))
    _, bases3 = plans(SiTo(seed=5, sigma=1.0))
    assert bases3 != bases


# -- U-Net integration ---------------------------------------------------------------------------

def patched_output(unet, args, kwargs, config):
    with tokenmerge.patched(unet, config):
        return run(unet, args, kwargs)


def test_ratio_zero_and_remove_are_bit_identical(any_unet):
    args, kwargs = unet_inputs(any_unet, 2)
    unpatched = run(any_unet, args, kwargs)
    assert torch.equal(patched_output(any_unet, args, kwargs, SiTo(ratio=0.0)), unpatched)
    tokenmerge.apply(any_unet, SiTo(ratio=0.5, seed=0))
    assert not torch.equal(run(any_unet, args, kwargs), unpatched)
    tokenmerge.remove(any_unet)
    assert torch.equal(run(any_unet, args, kwargs), unpatched)


@pytest.mark.parametrize("batch,size", [(2, (16, 16)), (1, (15, 17)), (3, (15, 17)), (3, (9, 13))])
def test_prunes_odd_sizes_and_batches(any_unet, batch, size):
    args, kwargs = unet_inputs(any_unet, batch, *size)
    unpatched = run(any_unet, args, kwargs)
    events = []
    with tokenmerge.patched(any_unet, SiTo(ratio=0.5, seed=0, max_downsample=2, min_tokens=0), on_plan=events.append):
        out = run(any_unet, args, kwargs)
    assert out.shape == unpatched.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, unpatched, atol=1e-5)
    pruning = [e for e in events if e.plan is not None]
    assert pruning and all(e.plan.prune and e.plan.batch_size == batch for e in pruning)
    for e in pruning:
        n = e.grid[0] * e.grid[1]
        assert e.plan.num_kept == n - int(n * 0.5)


@pytest.mark.parametrize("switch,module", [("merge_crossattn", "attn2"), ("merge_mlp", "ff")])
def test_cross_attention_and_mlp_switches_hook_those_modules(sd1_unet, switch, module):
    args, kwargs = unet_inputs(sd1_unet, 2)
    unpatched = run(sd1_unet, args, kwargs)
    block = sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0]
    with tokenmerge.patched(sd1_unet, SiTo(seed=0)):
        assert not getattr(block, module)._forward_pre_hooks  # self-attention only by default
        assert block.attn1._forward_pre_hooks
    with tokenmerge.patched(sd1_unet, SiTo(seed=0, merge_attn=False, **{switch: True})):
        assert getattr(block, module)._forward_pre_hooks and not block.attn1._forward_pre_hooks
        out = run(sd1_unet, args, kwargs)
    assert torch.isfinite(out).all() and not torch.allclose(out, unpatched, atol=1e-5)
    assert torch.equal(run(sd1_unet, args, kwargs), unpatched)


def test_default_placement_is_the_top_attention_level():
    unet = tiny_unet("sd1")
    events = []
    args, kwargs = unet_inputs(unet, 2)
    with tokenmerge.patched(unet, SiTo(seed=0), on_plan=events.append):
        run(unet, args, kwargs)
    assert {e.block.split(".")[0] + "." + e.block.split(".")[1] for e in events} == {"down_blocks.0", "up_blocks.2"}
    assert {e.grid for e in events} == {(16, 16)}


# -- memory bound --------------------------------------------------------------------------------

class LargestTensor(TorchDispatchMode):
    """Records the number of elements of the largest tensor any torch op creates."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_n_by_n_tensor_at_128x128(monkeypatch):
    """N = 16384: an N x N similarity matrix would have 2.7e8 entries per image. SimScore is O(N C) and the
    matching is chunked, so with a 2^20-score chunk bound no tensor exceeds max(chunk, B N C). At 2048 px
    (N = 65536, C = 320, B = 2, float32) the default 2^26 bound keeps make_plan's peak near 0.45 GB."""
    batch, side, channels = 2, 128, 64
    n = side * side
    x = torch.randn(batch, n, channels, generator=torch.Generator().manual_seed(0))
    config = SiTo(ratio=0.7, seed=0)
    reference = config.make_plan(x, context(side, side))  # default chunk bound
    monkeypatch.setattr(sito_module, "MATCH_MAX_ELEMENTS", 1 << 20)
    with LargestTensor() as probe:
        plan = config.make_plan(x, context(side, side))
    assert probe.numel <= max(1 << 20, batch * n * channels) < n * n
    assert plan.num_kept == n - int(n * 0.7) and plan.num_dst == n // 4
    assert torch.equal(plan.kept, reference.kept) and torch.equal(plan.assign, reference.assign)


# -- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(ratio=0.8), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=float("nan")), "ratio"),
        (dict(ratio=0.9, patch=3), "ratio"),
        (dict(patch=1), "patch"),
        (dict(patch=9), "patch"),
        (dict(patch=2.0), "patch"),
        (dict(patch=True), "patch"),
        (dict(sigma=-0.1), "sigma"),
        (dict(sigma=float("nan")), "sigma"),
        (dict(sigma=math.inf), "sigma"),
        (dict(sigma="0.1"), "sigma"),
        (dict(sigma_relative=1), "sigma_relative"),
        (dict(base="VII"), "base"),
        (dict(base="random"), "base"),
        (dict(max_downsample=3), "max_downsample"),
        (dict(merge_attn=False), "merge_attn"),
        (dict(seed="x"), "seed"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SiTo(**kwargs)


def test_max_ratio_is_every_non_base_token():
    assert SiTo().max_ratio() == 0.75
    assert SiTo(ratio=0.75, base="II").ratio == 0.75
    assert SiTo(ratio=8 / 9, patch=3).max_ratio() == pytest.approx(8 / 9)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.75\]"):
        SiTo(ratio=0.76)


def test_small_grids_and_ratio_zero_give_no_plan():
    x = tokens(2, 3, 1)
    assert SiTo(ratio=0.5).make_plan(x, context(3, 1)) is None  # narrower than a patch
    assert SiTo(ratio=0.0).make_plan(tokens(2, 8, 8), context(8, 8)) is None
    assert SiTo(ratio=0.01).make_plan(tokens(2, 8, 8), context(8, 8)) is None  # int(64 * 0.01) = 0


def test_topleft_strategy_is_cell_destinations():
    plan = SiTo(base="I").make_plan(tokens(1, 8, 6), context(8, 6))
    assert torch.equal(base_of(plan), cell_destinations(8, 6, 2, 2))
