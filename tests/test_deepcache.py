"""Merging stacked with DeepCache (``DeepCacheSDHelper``: the U-Net's deep features reused on cached steps), in
both orders of enabling: each accelerator still works, removing one leaves the other working, and with both gone
the outputs are the unpatched ones bit for bit."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.tools.tiny import tiny_pipeline

DeepCache = pytest.importorskip("DeepCache")

STEPS = 4


@pytest.fixture(scope="module", params=["sd1", "sdxl"])
def pipe(request):
    pipe = tiny_pipeline(request.param)
    pipe.kind = request.param
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe):
    return pipe("a cat", num_inference_steps=STEPS, height=64, width=64, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


def deepcache(pipe):
    helper = DeepCache.DeepCacheSDHelper(pipe=pipe)
    helper.set_params(cache_interval=2, cache_branch_id=0)
    return helper


@pytest.mark.parametrize("merge_first", [True, False], ids=["merge-then-cache", "cache-then-merge"])
@pytest.mark.parametrize("config", [ToMe(ratio=0.5, seed=0, min_tokens=0),
                                    ImportanceMerge(ratio=0.5, seed=0, min_tokens=0, prune_steps=0.25)],
                         ids=["tome", "importance"])
def test_both_run_each_is_removable_and_both_gone_is_unpatched(pipe, config, merge_first):
    unpatched = run(pipe)
    helper = deepcache(pipe)
    helper.enable()
    cached = run(pipe)
    helper.disable()
    with tokenmerge.patched(pipe, config):
        merged = run(pipe)
    assert not torch.allclose(cached, unpatched, atol=1e-4) and not torch.allclose(merged, unpatched, atol=1e-4)

    events = []
    if merge_first:
        tokenmerge.apply(pipe, config, on_plan=events.append)
        helper.enable()
    else:
        helper.enable()
        tokenmerge.apply(pipe, config, on_plan=events.append)
    both = run(pipe)
    # SD 1.x: the patched blocks (the highest-resolution level) are DeepCache's shallow branch: they run, merged, in
    # every step, cached or not. SDXL's first level has no attention: its patched blocks are in the deep branch, which
    # runs (and plans) only in the steps DeepCache computes (every cache_interval-th). The clock counts every step.
    assert sorted({e.step for e in events}) == (list(range(STEPS)) if pipe.kind == "sd1" else [0, 2])
    assert all(e.plan is not None for e in events) and tokenmerge.api.state_of(pipe).clock.step == STEPS - 1
    assert not torch.allclose(both, cached, atol=1e-4) and not torch.allclose(both, merged, atol=1e-4)
    if merge_first:
        helper.disable()
        assert torch.equal(run(pipe), merged)
        tokenmerge.remove(pipe)
    else:
        tokenmerge.remove(pipe)
        assert torch.equal(run(pipe), cached)
        helper.disable()
    assert torch.equal(run(pipe), unpatched)
