"""ReToM (Local Representative Token Guided Merging): the definitions on synthetic tokens, checked against
brute-force loops over the windows, the similarity cache across steps, and the method on the tiny U-Nets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tokenmerge
from tokenmerge.methods.base import PlanContext
from tokenmerge.methods.retom import ReToM, window_groups, window_shapes
from tokenmerge.plan import DESTINATION, INDEPENDENT, MERGED, MergePlan, gather_tokens

from .conftest import run, unet_inputs

# ----------------------------------------------------------------------------------------------------------
# helpers: brute-force definitions, one window at a time
# ----------------------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ctx(h: int, w: int, *, seed: int = 0, level: int = 0, bottleneck: bool = False,
        block: str = "block") -> PlanContext:
    return PlanContext(grid=(h, w), generator=torch.Generator().manual_seed(seed), block=block, level=level,
                       bottleneck=bottleneck)


def windows_of(h: int, w: int, size: int) -> list[list[int]]:
    """Every window (cropped at the right/bottom edge) as its raster token indices, by plain loops."""
    return [
        [y * w + x for y in range(y0, min(y0 + size, h)) for x in range(x0, min(x0 + size, w))]
        for y0 in range(0, h, size)
        for x0 in range(0, w, size)
    ]


def window_id(h: int, w: int, size: int) -> dict[int, int]:
    return {t: i for i, win in enumerate(windows_of(h, w, size)) for t in win}


def r_of(k: int, ratio: float) -> int:
    return min(math.floor(k * ratio), k - 1)


def expected_kept(h: int, w: int, size: int, ratio: float) -> int:
    return h * w - sum(r_of(len(win), ratio) for win in windows_of(h, w, size))


def decode(plan: MergePlan, b: int) -> tuple[dict[int, set[int]], set[int]]:
    """Row ``b`` of a plan: ``{destination: its sources}`` and the set of independent tokens."""
    kept, assign = plan.kept[b].tolist(), plan.assign[b].tolist()
    members: dict[int, list[int]] = {}
    for token, slot in enumerate(assign):
        members.setdefault(slot, []).append(token)
    dst = {kept[s]: set(members[s]) - {kept[s]} for s in range(plan.num_dst)}
    independent = set()
    for s in range(plan.num_dst, plan.num_kept):
        assert members[s] == [kept[s]], "an independent slot holds only its own token"
        independent.add(kept[s])
    return dst, independent


def window_similarity(x_b: torch.Tensor, win: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity matrix of a window and the mean similarity to the others (Eq. 1), in float64."""
    unit = F.normalize(x_b[win].double(), dim=-1)
    sim = unit @ unit.T
    k = len(win)
    mean = (sim.sum(1) - sim.diagonal()) / (k - 1)
    return sim, mean


def check_structure(plan: MergePlan, x: torch.Tensor, h: int, w: int, size: int, ratio: float) -> None:
    """Token counts, MergePlan invariants and window membership of every merge."""
    b, n, c = x.shape
    m = expected_kept(h, w, size, ratio)
    assert plan.kept.shape == (b, m) and plan.assign.shape == (b, n)
    assert plan.merge_weight.shape == (b * n, 1) and plan.merge_weight.dtype == torch.float32
    assert torch.equal(plan.assign.gather(1, plan.kept), torch.arange(m).expand(b, -1))
    merging_windows = [win for win in windows_of(h, w, size) if r_of(len(win), ratio) > 0]
    assert plan.num_dst == len(merging_windows)
    roles = plan.roles()
    assert ((roles == DESTINATION).sum(1) == plan.num_dst).all()
    assert ((roles == INDEPENDENT).sum(1) == m - plan.num_dst).all()
    assert ((roles == MERGED).sum(1) == n - m).all()
    wid = window_id(h, w, size)
    for row in range(b):
        assert len(set(plan.kept[row].tolist())) == m
        dst, independent = decode(plan, row)
        for d, sources in dst.items():
            assert {wid[s] for s in sources} == {wid[d]}, "sources merge into the destination of their own window"
        assert len({wid[d] for d in dst}) == len(dst), "one destination per window"
        for win in windows_of(h, w, size):
            r = r_of(len(win), ratio)
            kept_here = [t for t in win if t in dst or t in independent]
            assert len(kept_here) == len(win) - r, "each window keeps N_W - floor(N_W * ratio) tokens"
            if r > 0:
                (d,) = [t for t in win if t in dst]
                assert len(dst[d]) == r


def reference_merge(x: torch.Tensor, plan: MergePlan, alpha: float | None) -> torch.Tensor:
    """Eq. 2 by a loop over the slots: ``alpha D + (1 - alpha) mean(S)``, or ``D`` alone without sources."""
    b, _, c = x.shape
    out = torch.zeros(b, plan.num_kept, c, dtype=torch.float64)
    for row in range(b):
        dst, independent = decode(plan, row)
        for slot, token in enumerate(plan.kept[row].tolist()):
            sources = sorted(dst.get(token, set()))
            if sources:
                a = 1 / (len(sources) + 1) if alpha is None else alpha
                out[row, slot] = a * x[row, token].double() + (1 - a) * x[row, sources].double().mean(0)
            else:
                out[row, slot] = x[row, token].double()
    return out


# ----------------------------------------------------------------------------------------------------------
# definitions on synthetic tokens
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "h,w,size,ratio,batch",
    [(8, 8, 2, 0.5, 2), (15, 17, 2, 0.75, 3), (9, 13, 4, 0.5, 1), (6, 10, 4, 0.3, 2), (3, 5, 8, 0.5, 2),
     (16, 16, 8, 0.6, 1), (20, 12, 16, 0.5, 2), (1, 7, 2, 0.5, 2)],
)
def test_token_counts_and_window_membership(h, w, size, ratio, batch):
    x = randn(batch, h * w, 8, seed=h * w)
    plan = ReToM(ratio=ratio, window=size).make_plan(x, ctx(h, w))
    check_structure(plan, x, h, w, size, ratio)


@pytest.mark.parametrize("sources", ["nearest", "mean"])
@pytest.mark.parametrize("h,w,size,ratio", [(8, 8, 2, 0.5), (15, 17, 4, 0.6), (10, 11, 8, 0.4), (5, 7, 2, 0.75)])
def test_representative_and_sources_match_brute_force(h, w, size, ratio, sources):
    x = randn(2, h * w, 8, seed=7)
    plan = ReToM(ratio=ratio, window=size, sources=sources).make_plan(x, ctx(h, w))
    for row in range(2):
        dst, _ = decode(plan, row)
        for win in windows_of(h, w, size):
            r = r_of(len(win), ratio)
            if r == 0:
                continue
            (d,) = [t for t in win if t in dst]
            sim, mean = window_similarity(x[row], win)
            where = win.index(d)
            # the representative: highest mean in-window cosine similarity (Eq. 1), value-checked against ties
            assert mean[where] >= mean.max() - 1e-6
            assert where == int(mean.argmax())
            # the sources: the r others ranked first by similarity to D ("nearest") or by mean ("mean")
            score = sim[where] if sources == "nearest" else mean
            others = [i for i in range(len(win)) if i != where]
            chosen = [win.index(s) for s in dst[d]]
            rest = [i for i in others if i not in chosen]
            assert len(chosen) == r
            if rest:
                assert min(score[i] for i in chosen) >= max(score[i] for i in rest) - 1e-6
            assert {win[i] for i in sorted(others, key=lambda i: -score[i])[:r]} == dst[d]


@pytest.mark.parametrize("alpha", [None, 0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("h,w,size,ratio", [(8, 8, 2, 0.5), (15, 17, 4, 0.6), (7, 9, 8, 0.5), (6, 6, 2, 0.25)])
def test_merge_is_eq2(h, w, size, ratio, alpha):
    x = randn(3, h * w, 6, seed=3)
    plan = ReToM(ratio=ratio, window=size, alpha=alpha).make_plan(x, ctx(h, w))
    merged = plan.merge(x)
    torch.testing.assert_close(merged.double(), reference_merge(x, plan, alpha), atol=1e-5, rtol=1e-5)
    # a slot without sources is its token, bit for bit; unmerge copies each slot to all its members
    counts = torch.zeros(3, plan.num_kept).scatter_add_(1, plan.assign, torch.ones(3, h * w))
    alone = counts == 1
    assert torch.equal(merged[alone], gather_tokens(x, plan.kept)[alone])
    assert torch.equal(plan.unmerge(merged), gather_tokens(merged, plan.assign))


def test_alpha_none_is_the_plain_mean_and_alpha_weights_the_destination():
    x = randn(1, 16, 4, seed=0)
    mean_plan = ReToM(ratio=0.5, window=2).make_plan(x, ctx(4, 4))
    weight = mean_plan.merge_weight.view(-1)
    dst, _ = decode(mean_plan, 0)
    for d, sources in dst.items():
        assert weight[d] == pytest.approx(1 / 3) and all(weight[s] == pytest.approx(1 / 3) for s in sources)
    plan = ReToM(ratio=0.75, window=2, alpha=0.4).make_plan(x, ctx(4, 4))
    weight = plan.merge_weight.view(-1)
    dst, independent = decode(plan, 0)
    assert not independent
    for d, sources in dst.items():
        assert weight[d] == pytest.approx(0.4) and all(weight[s] == pytest.approx(0.6 / 3) for s in sources)


def test_least_representative_destination_is_the_argmin():
    h, w, size, ratio = 12, 10, 4, 0.5
    x = randn(2, h * w, 8, seed=11)
    plan = ReToM(ratio=ratio, window=size, destination="least", sources="nearest").make_plan(x, ctx(h, w))
    by_mean = ReToM(ratio=ratio, window=size, destination="least").make_plan(x, ctx(h, w))
    check_structure(plan, x, h, w, size, ratio)
    for row in range(2):
        dst, _ = decode(plan, row)
        mean_dst, _ = decode(by_mean, row)
        for win in windows_of(h, w, size):  # ranked by mean similarity, ascending: D, then the next r
            _, mean = window_similarity(x[row], win)
            ranked = [win[i] for i in mean.argsort().tolist()]
            assert mean_dst[ranked[0]] == set(ranked[1 : 1 + r_of(len(win), ratio)])
        for win in windows_of(h, w, size):
            (d,) = [t for t in win if t in dst]
            sim, mean = window_similarity(x[row], win)
            assert win.index(d) == int(mean.argmin())
            # its sources are still the tokens most similar to it
            where = win.index(d)
            top = sorted((i for i in range(len(win)) if i != where), key=lambda i: -sim[where, i])
            assert {win[i] for i in top[: r_of(len(win), ratio)]} == dst[d]


def test_random_destination_is_seeded_and_shared_by_the_batch():
    h, w, size, ratio = 16, 16, 2, 0.5
    x = randn(2, h * w, 8, seed=5)
    config = ReToM(ratio=ratio, window=size, destination="random")

    def destinations(seed):
        plan = config.make_plan(x, ctx(h, w, seed=seed))
        check_structure(plan, x, h, w, size, ratio)
        return plan.kept[:, : plan.num_dst]

    a, b, c = destinations(1), destinations(1), destinations(2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(a[0], a[1]), "one draw per window, shared by the batch rows"
    # the draw is not the representative everywhere
    representative = ReToM(ratio=ratio, window=size).make_plan(x, ctx(h, w)).kept[:, : 64]
    assert not torch.equal(a, representative)


def test_representative_destination_does_not_consume_the_generator():
    gen_ctx = ctx(8, 8, seed=3)
    before = gen_ctx.generator.get_state()
    ReToM(window=2).make_plan(randn(2, 64, 4, seed=0), gen_ctx)
    assert torch.equal(before, gen_ctx.generator.get_state())


@pytest.mark.parametrize("size", [2, 8, 16])
def test_fixed_window_sizes_of_table_1(size):
    h, w, ratio = 32, 24, 0.5
    x = randn(2, h * w, 8, seed=size)
    config = ReToM(ratio=ratio, window=size)
    for level, bottleneck in [(0, False), (2, False), (3, True)]:  # the same size at every level, bottleneck included
        assert config.window_size(level, bottleneck) == size
        check_structure(config.make_plan(x, ctx(h, w, level=level, bottleneck=bottleneck)), x, h, w, size, ratio)
    assert config.max_ratio() == 1 - 1 / size**2


def test_adaptive_window_sizes_follow_the_levels():
    default = ReToM()
    # SD 1.x/2.x: 4 levels, bottleneck (mid block) at level 3; SDXL: 3 levels, bottleneck at level 2
    assert [default.window_size(level, level == 3) for level in range(4)] == [2, 2, 4, 8]
    assert [default.window_size(level, level == 2) for level in range(3)] == [2, 2, 8]
    assert default.max_ratio() == 0.75
    custom = ReToM(window_sizes=(4, 2), bottleneck_window=16, ratio=0.7)
    assert [custom.window_size(level, level == 5) for level in range(6)] == [4, 2, 2, 2, 2, 16]
    h, w, ratio = 20, 18, 0.7
    x = randn(2, h * w, 8, seed=1)
    for level, size in enumerate([4, 2, 2, 2, 2, 16]):
        plan = custom.make_plan(x, ctx(h, w, level=level, bottleneck=level == 5))
        check_structure(plan, x, h, w, size, ratio)


def test_partial_windows_and_grids_smaller_than_the_window():
    # 5x7 grid, 4x4 windows: one full window, cropped 4x3, 1x4 and 1x3 windows
    assert window_shapes(5, 7, 4) == [(1, 4, 1, 4), (1, 4, 1, 3), (1, 1, 1, 4), (1, 1, 1, 3)]
    groups = window_groups(5, 7, 4)
    found = sorted(sorted(window.tolist()) for idx in groups for window in idx)
    assert found == sorted(sorted(win) for win in windows_of(5, 7, 4))
    # a grid smaller than the window is one window
    assert [idx.tolist() for idx in window_groups(3, 2, 8)] == [[[0, 1, 2, 3, 4, 5]]]
    x = randn(1, 6, 4, seed=0)
    plan = ReToM(window=8, ratio=0.5).make_plan(x, ctx(3, 2))
    assert plan.num_kept == 3 and plan.num_dst == 1


def test_no_plan_when_no_window_merges():
    x = randn(2, 64, 4, seed=0)
    assert ReToM(ratio=0.0).make_plan(x, ctx(8, 8)) is None
    # r = floor(4 * 0.2) = 0 in every 2x2 window: the ratio is quantized per window (Algorithm 1, line 4)
    assert ReToM(ratio=0.2, window=2).make_plan(x, ctx(8, 8)) is None
    assert ReToM(ratio=0.2, window=4).make_plan(x, ctx(8, 8)).num_kept == 64 - 4 * 3
    # a 1-token grid has nothing to merge
    assert ReToM(ratio=0.75, window=2).make_plan(randn(2, 1, 4, seed=0), ctx(1, 1)) is None


def test_zero_tokens_and_low_precision():
    x = randn(2, 64, 8, seed=0)
    x[:, :10] = 0
    plan = ReToM(ratio=0.5, window=4).make_plan(x, ctx(8, 8))
    check_structure(plan, x, 8, 8, 4, 0.5)
    assert torch.isfinite(plan.merge(x)).all()
    for dtype in (torch.bfloat16, torch.float16):
        low = x.to(dtype)
        plan = ReToM(ratio=0.5, window=2).make_plan(low, ctx(8, 8))
        merged = plan.merge(low)
        assert merged.dtype == dtype and torch.isfinite(merged).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(h=st.integers(1, 14), w=st.integers(1, 14), size=st.sampled_from([2, 3, 4, 8]), batch=st.integers(1, 3),
       ratio_frac=st.floats(0.0, 1.0), destination=st.sampled_from(["representative", "random", "least"]),
       alpha=st.sampled_from([None, 0.25, 0.8]), seed=st.integers(0, 2**31 - 1))
def test_plan_invariants_on_random_grids(h, w, size, batch, ratio_frac, destination, alpha, seed):
    config = ReToM(window=size, ratio=ratio_frac * (1 - 1 / size**2), destination=destination, alpha=alpha)
    x = randn(batch, h * w, 5, seed=seed)
    plan = config.make_plan(x, ctx(h, w, seed=seed))
    if plan is None:
        assert expected_kept(h, w, size, config.ratio) == h * w
        return
    check_structure(plan, x, h, w, size, config.ratio)
    torch.testing.assert_close(plan.merge(x).double(), reference_merge(x, plan, alpha), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# the similarity cache (Sec. III-C)
# ----------------------------------------------------------------------------------------------------------


def same_plan(a: MergePlan, b: MergePlan) -> bool:
    return (torch.equal(a.kept, b.kept) and torch.equal(a.assign, b.assign) and a.num_dst == b.num_dst
            and torch.equal(a.merge_weight, b.merge_weight))


# ----------------------------------------------------------------------------------------------------------
# on the tiny U-Nets
# ----------------------------------------------------------------------------------------------------------


def patched_output(unet, args, kwargs, config, **apply_kwargs):
    with tokenmerge.patched(unet, config, **apply_kwargs):
        return run(unet, args, kwargs)


def test_ratio_zero_and_remove_are_bit_identical(any_unet):
    args, kwargs = unet_inputs(any_unet, 2)
    unpatched = run(any_unet, args, kwargs)
    assert torch.equal(patched_output(any_unet, args, kwargs, ReToM(ratio=0.0)), unpatched)
    tokenmerge.apply(any_unet, ReToM(ratio=0.5))
    merged = run(any_unet, args, kwargs)
    tokenmerge.remove(any_unet)
    assert torch.equal(run(any_unet, args, kwargs), unpatched)
    assert torch.isfinite(merged).all()
    assert not torch.allclose(merged, unpatched, atol=1e-4)


@pytest.mark.parametrize("batch,size", [(1, (15, 17)), (3, (15, 17)), (2, (9, 13)), (3, (16, 16))])
def test_odd_sizes_and_batches(any_unet, batch, size):
    args, kwargs = unet_inputs(any_unet, batch, *size)
    unpatched = run(any_unet, args, kwargs)
    for config in (ReToM(ratio=0.5, min_tokens=0),
                   ReToM(ratio=0.75, destination="random", seed=0, alpha=0.7, merge_mlp=True, min_tokens=0)):
        out = patched_output(any_unet, args, kwargs, config)
        assert out.shape == unpatched.shape and torch.isfinite(out).all()
        assert not torch.allclose(out, unpatched, atol=1e-4)


def test_every_transformer_block_is_merged_with_its_level_window(sd1_unet):
    """Default placement: all transformer blocks (Sec. IV-A); 2x2 windows at levels 0-1, 8x8 at the bottleneck."""
    events = []
    args, kwargs = unet_inputs(sd1_unet, 2)  # 16x16 latent: grids 16x16, 8x8 and the 4x4 bottleneck
    patched_output(sd1_unet, args, kwargs, ReToM(ratio=0.5, min_tokens=0), on_plan=events.append)
    names = {name for name, module in sd1_unet.named_modules() if type(module).__name__ == "BasicTransformerBlock"}
    assert {e.block for e in events} == names
    expected = {(16, 16): expected_kept(16, 16, 2, 0.5), (8, 8): expected_kept(8, 8, 2, 0.5),
                (4, 4): expected_kept(4, 4, 8, 0.5)}
    for event in events:
        assert event.plan.num_kept == expected[event.grid]
        assert event.plan.num_dst == {(16, 16): 64, (8, 8): 16, (4, 4): 1}[event.grid]


@pytest.mark.parametrize("period", [1, 3])
def test_selection_is_held_for_a_period_of_denoiser_calls(sd1_unet, period):
    """Sec. III-C: steps 0..p-1 use the selection of step 0, step p computes a new one from its own tokens; a new
    run starts over. The hooks hold the plan (``hold_steps``), as for ``plan_every``."""
    config = ReToM(ratio=0.5, period=period, min_tokens=0)
    assert config.hold_steps == period
    events = []
    with tokenmerge.patched(sd1_unet, config, on_plan=events.append):
        for step, t in enumerate((900, 800, 700, 600)):  # a bare U-Net: one run, steps 0-3, new tokens each step
            args, kwargs = unet_inputs(sd1_unet, 2, seed=step)
            run(sd1_unet, args, kwargs, timestep=t)
        plans = {}
        for event in events:
            plans.setdefault(event.step, {})[event.block] = event.plan
        blocks = list(plans[0])
        for step in range(1, 4):
            held = step < period
            assert all((plans[step][b] is plans[0][b]) == held for b in blocks), f"step {step}"
        if period == 3:
            assert any(not same_plan(plans[3][b], plans[0][b]) for b in blocks), "step p: from its own tokens"
        # a timestep above the last one starts a new run: step 0 plans again, from its tokens
        events.clear()
        args, kwargs = unet_inputs(sd1_unet, 2, seed=0)
        run(sd1_unet, args, kwargs, timestep=900)
        assert all(e.plan is not plans[0][e.block] and same_plan(e.plan, plans[0][e.block]) for e in events)


def test_period_and_plan_every_hold_for_the_longer():
    assert ReToM(period=5, plan_every=2).hold_steps == 5
    assert ReToM(period=1, plan_every=3).hold_steps == 3


def test_random_destinations_follow_the_seed(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    a = patched_output(sd1_unet, args, kwargs, ReToM(destination="random", seed=1))
    b = patched_output(sd1_unet, args, kwargs, ReToM(destination="random", seed=1))
    c = patched_output(sd1_unet, args, kwargs, ReToM(destination="random", seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(ratio=0.8), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=float("nan")), "ratio"),
        (dict(ratio=0.9, window_sizes=(4, 4), bottleneck_window=3), "ratio"),
        (dict(window_sizes=()), "window_sizes"),
        (dict(window_sizes=(2, 1)), "window_sizes"),
        (dict(window_sizes=(2, 64)), "window_sizes"),
        (dict(window_sizes=2), "window_sizes"),
        (dict(window_sizes=(2, 2.0)), "window_sizes"),
        (dict(bottleneck_window=1), "bottleneck_window"),
        (dict(bottleneck_window=True), "bottleneck_window"),
        (dict(window=1), "window"),
        (dict(window=33), "window"),
        (dict(alpha=1.5), "alpha"),
        (dict(alpha=-0.1), "alpha"),
        (dict(period=0), "period"),
        (dict(period=2.5), "period"),
        (dict(destination="best"), "destination"),
        (dict(sources="all"), "sources"),
        (dict(max_downsample=3), "max_downsample"),
        (dict(merge_attn=False), "merge_attn"),
        (dict(seed="x"), "seed"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"ReToM\.?.*{field}"):
        ReToM(**kwargs)


def test_valid_configs_and_max_ratio():
    assert ReToM(ratio=0.75).max_ratio() == 0.75
    assert ReToM(window=16, ratio=0.99).max_ratio() == 1 - 1 / 256
    assert ReToM(window_sizes=[4, 8], bottleneck_window=4, ratio=0.9).window_sizes == (4, 8)  # a list is accepted
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.9375\]"):
        ReToM(window_sizes=(4,), bottleneck_window=8, ratio=0.95)
    config = ReToM()
    assert (config.ratio, config.window_sizes, config.bottleneck_window, config.window, config.alpha,
            config.period, config.destination, config.sources, config.max_downsample) == (
        0.5, (2, 2, 4), 8, None, None, 5, "representative", "mean", 8)
    assert (config.merge_attn, config.merge_crossattn, config.merge_mlp, config.seed) == (True, False, False, None)
