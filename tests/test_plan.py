"""Invariants of MergePlan and of the plans every method builds, plus the helpers in tokenmerge.plan.

Property-based (hypothesis) over grid sizes, batch sizes, channels, ratios, strides, seeds and every
option of the methods: whatever the method, a plan must turn N tokens into exactly M and back into N,
give every kept token its own value back, and average (or prune) exactly the tokens it assigns.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tokenmerge import ImportanceMerge, ToMe
from tokenmerge import plan as plan_module
from tokenmerge.methods.base import CFG, PlanContext
from tokenmerge.plan import (
    DESTINATION,
    INDEPENDENT,
    MERGED,
    MergePlan,
    cell_destinations,
    complement,
    gather_tokens,
    nearest_destination,
    plan_from_matching,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sides = st.integers(1, 20)
seeds = st.integers(0, 2**31 - 1)
channels = st.integers(1, 8)


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def randn(*shape: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ctx(h: int, w: int, seed: int, **kwargs) -> PlanContext:
    return PlanContext(grid=(h, w), generator=torch.Generator().manual_seed(seed), **kwargs)


def mean_reference(x: torch.Tensor, assign: torch.Tensor, m: int) -> torch.Tensor:
    """``out[b, j] = mean(x[b, i] for assign[b, i] == j)``, computed in float64 by a one-hot matmul."""
    onehot = F.one_hot(assign, m).double()  # (B, N, M)
    counts = onehot.sum(1)  # (B, M)
    assert (counts >= 1).all(), "every slot must have at least one member (its kept token)"
    return (onehot.transpose(1, 2) @ x.double()) / counts[..., None]


def check_plan(plan: MergePlan, x: torch.Tensor, expected_kept: int, seed: int = 0) -> None:
    """Every invariant a MergePlan must satisfy, whatever built it."""
    b, n, c = x.shape
    m = plan.num_kept
    assert plan.kept.shape == (b, m) and plan.assign.shape == (b, n)
    assert plan.batch_size == b and plan.num_tokens == n
    assert m == expected_kept
    assert 0 < plan.num_dst <= m
    kept, assign = plan.kept, plan.assign
    assert kept.dtype == torch.long and assign.dtype == torch.long

    # kept tokens are distinct valid indices; a kept token maps to its own slot; slots lie in [0, M)
    assert ((kept >= 0) & (kept < n)).all()
    for row in kept:
        assert len(set(row.tolist())) == m, "kept tokens must be distinct per batch row"
    assert torch.equal(assign.gather(1, kept), torch.arange(m).expand(b, -1))
    assert ((assign >= 0) & (assign < m)).all()

    # roles: num_dst destinations, M - num_dst independent, N - M merged per row
    roles = plan.roles()
    assert roles.shape == (b, n) and roles.dtype == torch.int8
    assert ((roles == DESTINATION).sum(1) == plan.num_dst).all()
    assert ((roles == INDEPENDENT).sum(1) == m - plan.num_dst).all()
    assert ((roles == MERGED).sum(1) == n - m).all()

    # N in -> M -> N out, finite
    merged = plan.merge(x)
    assert merged.shape == (b, m, c) and merged.dtype == x.dtype
    assert torch.isfinite(merged).all()
    back = plan.unmerge(merged)
    assert back.shape == x.shape and torch.isfinite(back).all()

    # merge: mean of the slot's members, or exactly the kept tokens when pruning
    if plan.prune:
        assert torch.equal(merged, gather_tokens(x, kept))
    else:
        torch.testing.assert_close(merged.double(), mean_reference(x, assign, m), atol=1e-5, rtol=1e-5)
        # a slot with a single member (independent tokens, lone destinations) is that token, bit for bit
        sizes = F.one_hot(assign, m).sum(1)
        alone = sizes == 1
        assert torch.equal(merged[alone], gather_tokens(x, kept)[alone])

    # unmerge after any per-token transform: kept tokens get exactly their slot, others their slot's value
    for z in (merged * 2 + 1, randn(b, m, c, seed=seed)):
        out = plan.unmerge(z)
        assert torch.equal(gather_tokens(out, kept), z)
        assert torch.equal(out, gather_tokens(z, assign))


def full_cell_of(tokens: torch.Tensor, h: int, w: int, sy: int, sx: int) -> torch.Tensor:
    """Raster index of the full ``sy x sx`` cell each token lies in, or -1 for the partial edge cells."""
    rows, cols = tokens // w, tokens % w
    cy, cx = rows // sy, cols // sx
    cells_y, cells_x = h // sy, w // sx
    inside = (cy < cells_y) & (cx < cells_x)
    return torch.where(inside, cy * cells_x + cx, torch.full_like(tokens, -1))


def check_one_per_cell(dst: torch.Tensor, h: int, w: int, sy: int, sx: int, top_left: bool = False) -> None:
    """``dst (B, cells)``: exactly one destination in every full cell, in raster order, none in partial cells."""
    cells = (h // sy) * (w // sx)
    assert dst.shape[1] == cells
    cell = full_cell_of(dst, h, w, sy, sx)
    assert (cell >= 0).all(), "no destination may lie in a partial cell at the bottom/right edge"
    assert torch.equal(cell, torch.arange(cells).expand(dst.shape[0], -1)), "one destination per cell, raster order"
    if top_left:
        rows, cols = dst // w, dst % w
        assert (rows % sy == 0).all() and (cols % sx == 0).all()


def representative(plan: MergePlan) -> torch.Tensor:
    """``(B, N)``: the kept token whose value each token receives (independent of the slot order)."""
    return plan.kept.gather(1, plan.assign)


def as_sets(t: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in t]


def plans_equal(a: MergePlan | None, b: MergePlan | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return (
        torch.equal(a.kept, b.kept) and torch.equal(a.assign, b.assign) and a.num_dst == b.num_dst
        and a.prune == b.prune
    )


# ----------------------------------------------------------------------------------------------------------
# ToMe
# ----------------------------------------------------------------------------------------------------------


@st.composite
def tome_cases(draw):
    sx, sy = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    assume(sx * sy >= 2)
    config = ToMe(
        ratio=draw(st.floats(0.0, 1.0 - 1.0 / (sx * sy))), sx=sx, sy=sy, use_rand=draw(st.booleans()),
    )
    return config, draw(sides), draw(sides), draw(st.integers(1, 4)), draw(channels), draw(seeds)


@SETTINGS
@given(tome_cases())
def test_tome_plan_invariants(case):
    config, h, w, b, c, seed = case
    n = h * w
    x = randn(b, n, c, seed=seed)
    plan = config.make_plan(x, ctx(h, w, seed))
    merged = int(n * config.ratio)
    if plan is None:
        assert merged == 0 or h < config.sy or w < config.sx
        return
    assert merged > 0 and h >= config.sy and w >= config.sx
    assert plan.prune is False
    check_plan(plan, x, expected_kept=n - merged, seed=seed)
    assert n - plan.num_kept == merged

    # destinations: one per full sy x sx cell (the top-left one without randomness, or for odd batches)
    assert plan.num_dst == (h // config.sy) * (w // config.sx)
    top_left = not config.use_rand or b % 2 == 1
    check_one_per_cell(plan.kept[:, : plan.num_dst], h, w, config.sy, config.sx, top_left=top_left)
    # tomesd draws one set of cells for the whole batch
    assert (plan.kept[:, : plan.num_dst] == plan.kept[:1, : plan.num_dst]).all()


@FEW
@given(tome_cases())
def test_tome_plan_is_deterministic_per_seed(case):
    config, h, w, b, c, seed = case
    x = randn(b, h * w, c, seed=seed)
    assert plans_equal(config.make_plan(x, ctx(h, w, seed)), config.make_plan(x, ctx(h, w, seed)))


def test_tome_odd_batch_ignores_randomness():
    """tomesd: an odd batch (no CFG pair) always uses the top-left token of each cell."""
    x = randn(3, 64, 4, seed=0)
    config = ToMe(ratio=0.5, use_rand=True)
    plan = config.make_plan(x, ctx(8, 8, 0))
    check_one_per_cell(plan.kept[:, : plan.num_dst], 8, 8, 2, 2, top_left=True)
    plan_even = config.make_plan(randn(2, 64, 4, seed=0), ctx(8, 8, 0))
    assert not torch.equal(plan_even.kept[:, : plan_even.num_dst], plan.kept[:2, : plan.num_dst])


def test_tome_merges_the_most_similar_sources():
    """The r merged sources are those with the highest cosine similarity to their best destination."""
    h = w = 8
    n = h * w
    x = randn(1, n, 5, seed=3)
    config = ToMe(ratio=0.5, use_rand=False)
    plan = config.make_plan(x, ctx(h, w, 0))
    dst = plan.kept[0, : plan.num_dst]
    src = complement(dst[None], n)[0]
    sim = F.normalize(x[0, src], dim=-1) @ F.normalize(x[0, dst], dim=-1).T
    best, where = sim.max(dim=-1)
    roles = plan.roles()[0]
    merged_src = roles[src] == MERGED
    assert int(merged_src.sum()) == int(n * config.ratio)
    assert best[merged_src].min() >= best[~merged_src].max()
    # and each merged source goes to its most similar destination
    assert torch.equal(representative(plan)[0, src[merged_src]], dst[where[merged_src]])


# ----------------------------------------------------------------------------------------------------------
# ImportanceMerge
# ----------------------------------------------------------------------------------------------------------


@st.composite
def importance_cases(draw):
    dst = draw(st.floats(0.05, 0.5))
    config = ImportanceMerge(
        ratio=draw(st.floats(0.0, min(1.0 - dst, 0.75))),
        pool=draw(st.floats(0.0, 1.5)),
        dst=dst,
        dst_selection=draw(st.sampled_from(["random", "topk"])),
        independent_from=draw(st.sampled_from(["pool", "all"])),
    )
    cfg_pairs = draw(st.booleans())
    b = draw(st.sampled_from([2, 4])) if cfg_pairs else draw(st.integers(1, 4))
    return dict(
        config=config, h=draw(sides), w=draw(sides), b=b, c=draw(channels), seed=draw(seeds),
        cfg_pairs=cfg_pairs, prune_phase=draw(st.booleans()), with_importance=draw(st.booleans()),
    )


def importance_for(groups: int, n: int, seed: int) -> torch.Tensor:
    """Tie-free importance: a random permutation of 0..N-1 per group."""
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(groups)]).float()


def build(case, x=None):
    h, w, b, c, seed = case["h"], case["w"], case["b"], case["c"], case["seed"]
    n = h * w
    groups = b // 2 if case["cfg_pairs"] else b
    importance = importance_for(groups, n, seed) if case["with_importance"] else None
    if x is None:
        x = randn(b, n, c, seed=seed)
    context = ctx(h, w, seed, guided=CFG if case["cfg_pairs"] else None, prune_phase=case["prune_phase"], importance=importance)
    return x, importance, case["config"].make_plan(x, context)


@SETTINGS
@given(importance_cases())
def test_importance_plan_invariants(case):
    config, h, w = case["config"], case["h"], case["w"]
    n = h * w
    x, importance, plan = build(case)
    if plan is None:
        assert int(n * config.ratio) == 0 or h < 2 or w < 2
        return
    assert int(n * config.ratio) > 0 and h >= 2 and w >= 2
    m = n - int(n * config.ratio)
    check_plan(plan, x, expected_kept=m, seed=case["seed"])
    assert plan.prune is case["prune_phase"]

    dst = plan.kept[:, : plan.num_dst]
    ind = plan.kept[:, plan.num_dst :]
    assert ind.shape[1] == m - plan.num_dst
    k = config.pool_size(n)
    assert m <= k <= n
    uses_cells = case["prune_phase"] or importance is None or k >= n
    if uses_cells:
        # prune phase / no importance yet / pool covers everything: one destination per full 2x2 cell
        check_one_per_cell(dst, h, w, 2, 2)
        assert plan.num_dst == (h // 2) * (w // 2)
    else:
        assert plan.num_dst == config.num_destinations(n)

    if importance is not None and k < n:
        pool = importance.topk(k, dim=1).indices
        if case["cfg_pairs"]:
            pool = torch.cat([pool, pool])
        pool_sets = as_sets(pool)
        if not case["prune_phase"]:
            for row, pool_row in zip(as_sets(dst), pool_sets):
                assert row <= pool_row, "destinations are drawn from the pool"
            if config.dst_selection == "topk":
                # the num_dst most important tokens, most important first
                assert torch.equal(dst, pool[:, : plan.num_dst])
        if config.independent_from == "pool":
            for row, pool_row in zip(as_sets(ind), pool_sets):
                assert row <= pool_row, "independent tokens come from the pool"
            if not case["prune_phase"]:
                for row, pool_row in zip(as_sets(plan.kept), pool_sets):
                    assert row <= pool_row, "tokens outside the pool are always merged"


@FEW
@given(importance_cases())
def test_importance_plan_is_deterministic_per_seed(case):
    _, _, a = build(case)
    _, _, b = build(case)
    assert plans_equal(a, b)


@SETTINGS
@given(importance_cases().filter(lambda case: case["cfg_pairs"]))
def test_importance_cfg_pair_shares_one_plan_of_the_conditional_half(case):
    x, _, plan = build(case)
    if plan is None:
        return
    half = case["b"] // 2
    assert torch.equal(plan.kept[:half], plan.kept[half:])
    assert torch.equal(plan.assign[:half], plan.assign[half:])
    # the unconditional half does not influence the plan
    x2 = x.clone()
    x2[:half] = randn(half, x.shape[1], x.shape[2], seed=case["seed"] + 7) * 5
    _, _, plan2 = build(case, x2)
    assert plans_equal(plan, plan2)
    # while the conditional half does (checked where there is a matching to change)
    x3 = x.clone()
    x3[half:] = randn(half, x.shape[1], x.shape[2], seed=case["seed"] + 9)
    _, _, plan3 = build(case, x3)
    assert plan3 is not None
    check_plan(plan3, x3, expected_kept=plan.num_kept)


def _pool_case(h, w, b, c, seed, ratio, pool, dst, **options):
    config = ImportanceMerge(ratio=ratio, pool=pool, dst=dst, **options)
    n = h * w
    assume(config.pool_size(n) < n and int(n * ratio) > 0)
    x = randn(b, n, c, seed=seed)
    importance = importance_for(b, n, seed)
    plan = config.make_plan(x, ctx(h, w, seed, importance=importance))
    pool = importance.topk(config.pool_size(n), dim=1).indices
    return config, n, x, importance, plan, pool


@SETTINGS
@given(
    st.integers(2, 20), st.integers(2, 20), st.integers(1, 3), st.integers(2, 8), seeds,
    st.floats(0.3, 0.75), st.floats(0.0, 1.0), st.floats(0.05, 0.25),
)
def test_importance_pool_random_destinations(h, w, b, c, seed, ratio, pool, dst):
    config, n, x, importance, plan, pool_idx = _pool_case(h, w, b, c, seed, ratio, pool, dst)
    m = n - int(n * ratio)
    check_plan(plan, x, m, seed)
    assert plan.num_dst == config.num_destinations(n)
    assert plan.num_kept - plan.num_dst == m - config.num_destinations(n)
    for kept_row, pool_row in zip(as_sets(plan.kept), as_sets(pool_idx)):
        assert kept_row <= pool_row
    # every pool token outside the kept set, and every token outside the pool, is merged
    roles = plan.roles()
    outside = torch.ones(b, n, dtype=torch.bool).scatter_(1, pool_idx, False)
    assert (roles[outside] == MERGED).all()


@FEW
@given(
    st.integers(2, 20), st.integers(2, 20), st.integers(1, 3), st.integers(2, 8), seeds,
    st.floats(0.3, 0.75), st.floats(0.0, 1.0), st.floats(0.05, 0.25),
)
def test_importance_topk_destinations_are_the_most_important(h, w, b, c, seed, ratio, pool, dst):
    config, n, x, importance, plan, pool_idx = _pool_case(h, w, b, c, seed, ratio, pool, dst, dst_selection="topk")
    check_plan(plan, x, n - int(n * ratio), seed)
    d = config.num_destinations(n)
    assert plan.num_dst == d
    assert as_sets(plan.kept[:, :d]) == as_sets(importance.topk(d, dim=1).indices)


@FEW
@given(
    st.integers(2, 20), st.integers(2, 20), st.integers(1, 3), st.integers(2, 8), seeds,
    st.floats(0.3, 0.75), st.floats(0.0, 1.0), st.floats(0.05, 0.25),
)
def test_importance_independent_from_all(h, w, b, c, seed, ratio, pool, dst):
    config, n, x, importance, plan, pool_idx = _pool_case(h, w, b, c, seed, ratio, pool, dst,
                                                          independent_from="all")
    m = n - int(n * ratio)
    check_plan(plan, x, m, seed)
    d = config.num_destinations(n)
    assert plan.num_dst == d and plan.num_kept - d == m - d
    for dst_row, pool_row in zip(as_sets(plan.kept[:, :d]), as_sets(pool_idx)):
        assert dst_row <= pool_row  # destinations still come from the pool


def test_importance_independent_from_all_can_leave_the_pool():
    """With independent_from="all", the least-matched tokens are kept even if unimportant."""
    h = w = 8
    n = h * w
    config = ImportanceMerge(ratio=0.5, pool=0.0, dst=0.25, independent_from="all", dst_selection="topk")
    # importance: tokens 0..31 are the pool; make tokens outside it orthogonal-ish to everything
    importance = torch.arange(n, 0, -1).float()[None]
    x = randn(1, n, 16, seed=0).abs()
    x[0, 48:] = -x[0, 48:]  # dissimilar (negative cosine) to every destination, all in 0..15
    plan = config.make_plan(x, ctx(h, w, 0, importance=importance))
    pool = set(range(config.pool_size(n)))
    assert not set(plan.kept[0].tolist()) <= pool
    pool_plan = ImportanceMerge(ratio=0.5, pool=0.0, dst=0.25, dst_selection="topk").make_plan(
        x, ctx(h, w, 0, importance=importance)
    )
    assert set(pool_plan.kept[0].tolist()) <= pool


@SETTINGS
@given(importance_cases().map(lambda case: {**case, "prune_phase": True}))
def test_importance_prune_phase(case):
    config, h, w = case["config"], case["h"], case["w"]
    n = h * w
    x, _, plan = build(case)
    if plan is None:
        assert int(n * config.ratio) == 0 or h < 2 or w < 2
        return
    assert plan.prune is True
    check_one_per_cell(plan.kept[:, : plan.num_dst], h, w, 2, 2)
    assert torch.equal(plan.merge(x), gather_tokens(x, plan.kept))
    # a pruned token gets a copy of its destination, not of an independent token
    roles = plan.roles()
    rep_roles = roles.gather(1, representative(plan))
    assert (rep_roles[roles == MERGED] == DESTINATION).all()


@SETTINGS
@given(
    h=st.integers(2, 20), w=st.integers(2, 20), c=st.integers(16, 32), seed=seeds,
    ratio=st.floats(0.01, 0.75), with_importance=st.booleans(),
)
def test_importance_with_whole_pool_is_tome(h, w, c, seed, ratio, with_importance):
    """Pool covering all tokens (or no importance yet): the method is ToMeSD with random 2x2 cells.

    Many channels: with few, cosine similarities near 1 tie in float32 and the two methods may break
    the tie at the merge/independent boundary differently (argsort vs topk)."""
    n = h * w
    assume(int(n * ratio) > 0)
    config = ImportanceMerge(ratio=ratio, pool=10.0 if with_importance else 0.4, dst=0.25)
    assert not with_importance or config.pool_size(n) >= n
    x = randn(1, n, c, seed=seed)
    importance = importance_for(1, n, seed) if with_importance else None
    ours = config.make_plan(x, ctx(h, w, seed, importance=importance))
    # tomesd uses random cells only for even batches: compare against a batch of two copies of x
    tome = ToMe(ratio=ratio, sx=2, sy=2, use_rand=True).make_plan(torch.cat([x, x]), ctx(h, w, seed))
    assert ours is not None and tome is not None
    assert ours.num_dst == tome.num_dst and ours.num_kept == tome.num_kept
    assert torch.equal(ours.kept[0, : ours.num_dst], tome.kept[0, : tome.num_dst])  # the same random cells
    assert as_sets(ours.kept) == as_sets(tome.kept[:1])
    # the same token -> kept token mapping; only the order of the independent slots may differ
    assert torch.equal(representative(ours)[0], representative(tome)[0])
    torch.testing.assert_close(ours.unmerge(ours.merge(x))[0], tome.unmerge(tome.merge(torch.cat([x, x])))[0])


def test_importance_with_whole_pool_slot_order_differs_from_tome():
    """Documented, not a bug: ToMe lists independent slots by decreasing similarity (argsort), ImportanceMerge
    by increasing similarity (topk largest=False), so ``assign`` differs by a permutation of those slots."""
    h = w = 8
    x = randn(1, 64, 8, seed=0)
    ours = ImportanceMerge(ratio=0.25, pool=0.4, dst=0.25).make_plan(x, ctx(h, w, 0))
    tome = ToMe(ratio=0.25).make_plan(torch.cat([x, x]), ctx(h, w, 0))
    assert torch.equal(representative(ours)[0], representative(tome)[0])
    assert torch.equal(ours.kept[0].sort().values, tome.kept[0].sort().values)


def test_importance_config_helpers():
    config = ImportanceMerge(ratio=0.7, pool=0.4, dst=0.25)
    n = 4096
    m = n - int(n * 0.7)
    assert config.pool_size(n) == math.floor(m * 1.4)
    assert config.num_destinations(n) == 1024
    assert ImportanceMerge(ratio=0.25, pool=0.4).pool_size(100) == 100  # capped at N
    assert ImportanceMerge(ratio=0.5, pool=0.0).pool_size(100) == 50  # never below M
    assert ImportanceMerge(dst=0.05, ratio=0.5).num_destinations(10) == 1  # at least one


# ----------------------------------------------------------------------------------------------------------
# helpers of tokenmerge.plan
# ----------------------------------------------------------------------------------------------------------


@SETTINGS
@given(sides, sides, st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), seeds)
def test_cell_destinations(h, w, sy, sx, batch, seed):
    cells = (h // sy) * (w // sx)
    plain = cell_destinations(h, w, sy, sx, batch=batch)
    assert plain.shape == (batch, cells) and plain.dtype == torch.long
    check_one_per_cell(plain, h, w, sy, sx, top_left=True)
    drawn = cell_destinations(h, w, sy, sx, batch=batch, generator=torch.Generator().manual_seed(seed))
    assert drawn.shape == (batch, cells)
    check_one_per_cell(drawn, h, w, sy, sx)
    again = cell_destinations(h, w, sy, sx, batch=batch, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(drawn, again)


def test_cell_destinations_matches_tomesd_draw():
    """Same draw as tomesd: randint(sy*sx, (hsy, wsx, 1)) from the same generator state."""
    h, w, sy, sx = 7, 9, 2, 3
    ours = cell_destinations(h, w, sy, sx, generator=torch.Generator().manual_seed(5))
    offset = torch.randint(sy * sx, size=(h // sy, w // sx, 1), generator=torch.Generator().manual_seed(5))[..., 0]
    expected = []
    for cy in range(h // sy):
        for cx in range(w // sx):
            r, q = divmod(int(offset[cy, cx]), sx)
            expected.append((cy * sy + r) * w + cx * sx + q)
    assert ours[0].tolist() == expected


def test_cell_destinations_random_cover_the_cell():
    """Over many draws, every position of a cell is used (the draw is not stuck on a corner)."""
    dst = cell_destinations(6, 6, 2, 3, batch=200, generator=torch.Generator().manual_seed(0))
    assert set(dst[:, 0].tolist()) == {0, 1, 2, 6, 7, 8}


@SETTINGS
@given(st.integers(1, 60), st.integers(1, 3), seeds, st.data())
def test_complement(n, batch, seed, data):
    k = data.draw(st.integers(0, n))
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(batch)])
    rest = complement(indices, n)
    assert rest.shape == (batch, n - k)
    for idx, other in zip(indices.tolist(), rest.tolist()):
        assert other == sorted(other)
        assert set(idx).isdisjoint(other)
        assert set(idx) | set(other) == set(range(n))


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 12), st.integers(1, 6), seeds,
       st.integers(1, 200))
def test_nearest_destination_matches_brute_force(batch, num_src, num_dst, c, seed, max_elements):
    src = randn(batch, num_src, c, seed=seed)
    dst = randn(batch, num_dst, c, seed=seed + 1)
    # brute force cosine, float64
    s = src.double() / src.double().norm(dim=-1, keepdim=True)
    d = dst.double() / dst.double().norm(dim=-1, keepdim=True)
    sim = s @ d.transpose(1, 2)
    expected_best = sim.max(dim=-1).values
    for limit in (1 << 26, max_elements):  # one matrix, then chunks of a few rows
        best, where = nearest_destination(src, dst, max_elements=limit)
        assert best.shape == where.shape == (batch, num_src)
        torch.testing.assert_close(best.double(), expected_best, atol=1e-5, rtol=0)
        # the chosen destination is a best one (up to float ties)
        chosen = sim.gather(2, where[..., None])[..., 0]
        assert (chosen >= expected_best - 1e-5).all()
    full = nearest_destination(src, dst)
    chunked = nearest_destination(src, dst, max_elements=max_elements)
    torch.testing.assert_close(chunked[0], full[0], atol=1e-6, rtol=0)


def test_nearest_destination_zero_destination_does_not_attract_everything():
    """A zero-norm token has similarity 0 (not NaN, which max() would pick for every source)."""
    src = randn(1, 20, 8, seed=0)
    dst = randn(1, 4, 8, seed=1)
    dst[0, 0] = 0.0
    best, where = nearest_destination(src, dst)
    assert torch.isfinite(best).all()
    expected = (F.normalize(src, dim=-1) @ F.normalize(dst, dim=-1).transpose(1, 2)).max(dim=-1).indices
    assert torch.equal(where, expected)


def test_nearest_destination_chunked_is_exact_on_clear_winners():
    src = randn(2, 37, 4, seed=0)
    dst = randn(2, 5, 4, seed=1)
    full_best, full_where = nearest_destination(src, dst)
    for limit in (1, 7, 10, 11, 73, 10_000):
        best, where = nearest_destination(src, dst, max_elements=limit)
        assert torch.equal(where, full_where)
        torch.testing.assert_close(best, full_best, atol=1e-6, rtol=0)


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 30), st.integers(1, 5), seeds, st.data())
def test_gather_tokens(batch, n, c, seed, data):
    k = data.draw(st.integers(0, 2 * n))
    x = randn(batch, n, c, seed=seed)
    indices = torch.randint(n, (batch, k), generator=torch.Generator().manual_seed(seed))
    out = gather_tokens(x, indices)
    assert out.shape == (batch, k, c)
    for b in range(batch):
        assert torch.equal(out[b], x[b, indices[b]])
    # works with expanded (non-contiguous) indices, as ToMe passes them
    expanded = indices[:1].expand(batch, -1)
    out = gather_tokens(x, expanded)
    for b in range(batch):
        assert torch.equal(out[b], x[b, indices[0]])


SHARING_METHODS = [ToMe(ratio=0.5, use_rand=False), ToMe(ratio=0.5), ToMe(ratio=0.5, match_window=1),
                   ImportanceMerge(ratio=0.5, prune_steps=0.0), ImportanceMerge(ratio=0.5, prune_steps=1.0)]


def sharing_plans(seed: int) -> list[MergePlan]:
    """A plan of every method that reads shape constants, on a 10 x 12 grid with a CFG batch of 2."""
    x = randn(2, 120, 8, seed=seed)
    plans = []
    for method in SHARING_METHODS:
        ctx = PlanContext(grid=(10, 12), generator=torch.Generator().manual_seed(seed), guided=CFG,
                          prune_phase=getattr(method, "prune_steps", 0.0) > 0, importance=randn(1, 120, seed=seed + 1))
        plan = method.make_plan(x, ctx)
        plan.unmerge(plan.merge(x))
        plans.append(plan)
    return plans


def test_shape_constants_are_built_once_and_never_written(monkeypatch):
    """Plans share the index tensors of a grid (made once, not per block and step); no plan may write into them."""
    monkeypatch.setattr(plan_module, "_SHAPE_CONSTANTS", {})
    fresh = sharing_plans(seed=0)
    cache = plan_module._SHAPE_CONSTANTS
    assert {key[0] for key in cache} >= {"cell corners", "cell sources", "window candidates", "batch offsets"}
    before = {key: tuple(t.clone() for t in torch.utils._pytree.tree_leaves(v)) for key, v in cache.items()}
    objects = {key: id(value) for key, value in cache.items()}
    warm = sharing_plans(seed=0)
    sharing_plans(seed=1)
    assert {key: id(value) for key, value in cache.items() if key in objects} == objects  # reused, not rebuilt
    for key, tensors in before.items():
        for saved, now in zip(tensors, torch.utils._pytree.tree_leaves(cache[key])):
            assert torch.equal(saved, now), key
    for a, b in zip(fresh, warm):  # a plan from the cache is the plan built from scratch
        assert torch.equal(a.kept, b.kept) and torch.equal(a.assign, b.assign)


def test_shape_constants_made_in_inference_mode_serve_autograd(monkeypatch):
    """Built inside ``torch.inference_mode`` (a pipeline may run there), the constants are ordinary tensors, so
    a later plan with gradients (fine-tuning through the patch) can save them for backward."""
    monkeypatch.setattr(plan_module, "_SHAPE_CONSTANTS", {})
    with torch.inference_mode():
        sharing_plans(seed=0)
    assert not any(t.is_inference() for v in plan_module._SHAPE_CONSTANTS.values()
                   for t in torch.utils._pytree.tree_leaves(v))
    x = randn(2, 120, 8, seed=2).requires_grad_()
    plan = ToMe(ratio=0.5, use_rand=False, match_window=1).make_plan(x, PlanContext(grid=(10, 12)))
    plan.unmerge(plan.merge(x)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_plan_from_matching_by_hand():
    # 6 tokens: destinations 1 and 4; sources 0, 2, 3, 5; source 3 (position 2 in src) stays independent
    dst = torch.tensor([[1, 4]])
    src = torch.tensor([[0, 2, 3, 5]])
    nearest = torch.tensor([[0, 1, 1, 1]])
    plan = plan_from_matching(dst, torch.tensor([[2]]), src, nearest, 6)
    assert plan.kept.tolist() == [[1, 4, 3]]
    assert plan.assign.tolist() == [[0, 0, 1, 2, 1, 1]]
    assert plan.num_dst == 2
    x = torch.arange(6.0).view(1, 6, 1)
    assert plan.merge(x).flatten().tolist() == pytest.approx([0.5, (2 + 4 + 5) / 3, 3.0])
    assert plan.roles().tolist() == [[MERGED, DESTINATION, MERGED, INDEPENDENT, DESTINATION, MERGED]]
    pruned = plan_from_matching(dst, torch.tensor([[2]]), src, nearest, 6, prune=True)
    assert pruned.merge(x).flatten().tolist() == [1.0, 4.0, 3.0]
    assert pruned.unmerge(pruned.merge(x)).flatten().tolist() == [1.0, 1.0, 4.0, 3.0, 4.0, 4.0]


# ----------------------------------------------------------------------------------------------------------
# shape check and dtypes
# ----------------------------------------------------------------------------------------------------------


def _small_plan(prune: bool = False) -> MergePlan:
    return ImportanceMerge(ratio=0.5).make_plan(
        randn(2, 16, 3, seed=0), ctx(4, 4, 0, prune_phase=prune)
    )


@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize(
    "method,shape",
    [
        ("merge", (2, 15, 3)),  # wrong token count
        ("merge", (1, 16, 3)),  # wrong batch
        ("merge", (32, 3)),  # not (B, N, C)
        ("merge", (2, 16, 3, 1)),
        ("unmerge", (2, 16, 3)),  # N tokens where M are expected
        ("unmerge", (4, 8, 3)),
        ("unmerge", (16, 3)),
    ],
)
def test_check_rejects_wrong_shapes(method, shape, prune):
    plan = _small_plan(prune)
    assert plan.num_kept == 8
    with pytest.raises(RuntimeError, match=r"tokenmerge: .*" + re.escape(str(tuple(shape)))):
        getattr(plan, method)(torch.zeros(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prune", [False, True])
def test_low_precision_dtypes(dtype, prune):
    plan = _small_plan(prune)
    x32 = randn(2, 16, 3, seed=4)
    x = x32.to(dtype)
    merged = plan.merge(x)
    assert merged.dtype == dtype
    ref = plan.merge(x.float())
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.float16 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(merged.float(), ref, **tol)
    torch.testing.assert_close(merged.float(), plan.merge(x32), **tol)
    back = plan.unmerge(merged)
    assert back.dtype == dtype and back.shape == x.shape
    assert torch.equal(gather_tokens(back, plan.kept), merged)
    assert torch.equal(back, gather_tokens(merged, plan.assign))
    # the float32 plan still works after a low-precision call (per-dtype weight cache)
    torch.testing.assert_close(plan.merge(x32), ref, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_methods_plan_on_low_precision_inputs(dtype):
    x = randn(2, 100, 4, seed=1).to(dtype)
    importance = importance_for(1, 100, 0)
    for config, context in [
        (ToMe(ratio=0.5), ctx(10, 10, 0)),
        (ImportanceMerge(ratio=0.6), ctx(10, 10, 0, guided=CFG, importance=importance)),
    ]:
        plan = config.make_plan(x, context)
        merged = plan.merge(x)
        assert merged.dtype == dtype and torch.isfinite(merged).all()
        assert plan.unmerge(merged).shape == x.shape
