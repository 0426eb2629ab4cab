"""plan_every=k: a block's plan is built at every k-th step of a run and reused in between."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ReToM, ToMe
from tokenmerge.tools.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=6):
    return pipe("a red circle", num_inference_steps=steps, height=64, width=64, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def events_of(pipe, config, steps=6, calls=1):
    events = []
    with tokenmerge.patched(pipe, config, on_plan=events.append):
        outputs = [generate(pipe, steps) for _ in range(calls)]
    return events, outputs


def plans_by_step(events, block):
    return [(e.step, e.plan) for e in events if e.block == block]


def test_a_plan_is_built_every_k_steps_and_reused_in_between(pipe):
    events, _ = events_of(pipe, ToMe(ratio=0.5, seed=0, plan_every=3))
    blocks = {e.block for e in events}
    assert len(blocks) >= 2
    for block in blocks:
        steps = plans_by_step(events, block)
        assert [s for s, _ in steps] == list(range(6))
        built = [plan for _, plan in steps]
        assert built[0] is built[1] is built[2] and built[3] is built[4] is built[5]
        assert built[0] is not built[3]


def test_reuse_changes_the_output_and_remove_restores_it(pipe):
    unpatched = generate(pipe)
    _, (every_step,) = events_of(pipe, ToMe(ratio=0.5, seed=0))
    _, (every_third,) = events_of(pipe, ToMe(ratio=0.5, seed=0, plan_every=3))
    assert torch.isfinite(every_third).all() and not torch.equal(every_third, every_step)
    _, (default,) = events_of(pipe, ToMe(ratio=0.5, seed=0, plan_every=1))
    assert torch.equal(default, every_step)  # plan_every=1 is the per-step plan
    assert torch.equal(generate(pipe), unpatched)


def test_the_phase_change_and_a_new_run_rebuild_the_plan(pipe):
    # Steps 0-2 prune, 3-5 merge: the step-3 plan is new although it is within plan_every=6 of step 0.
    config = ImportanceMerge(ratio=0.5, seed=0, prune_steps=0.5, plan_every=6)
    events, _ = events_of(pipe, config, calls=2)
    block = events[0].block
    steps = plans_by_step(events, block)
    assert [s for s, _ in steps] == list(range(6)) * 2
    first_run, second_run = [p for _, p in steps[:6]], [p for _, p in steps[6:]]
    for run in (first_run, second_run):
        assert run[0].prune and run[0] is run[1] is run[2]
        assert not run[3].prune and run[3] is run[4] is run[5]
    assert second_run[0] is not first_run[0]  # a new pipeline call plans afresh


def test_level_sharing_and_reuse_combine(pipe):
    events, _ = events_of(pipe, ToMe(ratio=0.5, seed=0, max_downsample=2, share_plan="level", plan_every=2))
    per_level = {}
    for e in events:
        per_level.setdefault((e.grid, e.step // 2), set()).add(id(e.plan))
    assert per_level and all(len(ids) == 1 for ids in per_level.values())


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_plan_every_must_be_a_positive_int(value):
    for config_class in (ToMe, ImportanceMerge, ReToM):
        with pytest.raises(ValueError, match="plan_every must be an int >= 1"):
            config_class(ratio=0.5, plan_every=value)
