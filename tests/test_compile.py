"""torch.compile of a patched denoiser: no graph breaks where the method draws nothing and ignores the run,
and the compiled graph computes what eager does.

The fast tests compile with ``backend="aot_eager"`` (dynamo's full capture and AOTAutograd's functionalised
graph, run by eager kernels: seconds). Inductor's code generation takes minutes on a 2-core CPU, so the
inductor test runs only with ``TOKENMERGE_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, SiTo, ToFu, ToMe

from .conftest import run, unet_inputs

dynamo = pytest.importorskip("torch._dynamo")
if not dynamo.is_dynamo_supported():
    pytest.skip("torch.compile is not supported on this Python/platform", allow_module_level=True)

# Methods whose plans draw nothing and do not depend on the run (uses_rng and uses_clock are False).
TRACEABLE = [
    ToMe(ratio=0.5, use_rand=False, max_downsample=2),
    ImportanceMerge(ratio=0.5, dst_selection="topk", importance=torch.rand(16, 16), prune_steps=0.0),
]


def graph_breaks(unet, config) -> list[str]:
    args, kwargs = unet_inputs(unet, 2)
    dynamo.reset()
    with tokenmerge.patched(unet, config), torch.no_grad():
        # Through a function, as torch.compile(unet) traces it: the module's own hooks in the same frame
        # (explain(unet) compiles them as separate frames, and counts every extra graph as a break).
        explained = dynamo.explain(lambda *a, **k: unet(*a, **k))(*args, **kwargs)
    return [str(reason.reason).splitlines()[0] for reason in explained.break_reasons] or \
        ["(unlisted)"] * explained.graph_break_count


def test_explain_finds_no_graph_breaks(sd1_unet):
    config = TRACEABLE[1]
    assert not config.uses_rng and not config.uses_clock
    assert graph_breaks(sd1_unet, config) == []


def test_compiled_matches_eager_without_recompiling_per_step(sd1_unet):
    """fullgraph=True raises at any graph break; error_on_recompile at a per-step recompilation."""
    config = ToMe(ratio=0.5, use_rand=False, max_downsample=2, share_plan="level")
    assert not config.uses_rng and not config.uses_clock
    args, kwargs = unet_inputs(sd1_unet, 2)
    other = unet_inputs(sd1_unet, 2, seed=1)[0]
    with tokenmerge.patched(sd1_unet, config):
        eager = [run(sd1_unet, args, kwargs, timestep=t) for t in (900, 500)] + [run(sd1_unet, other, kwargs)]
        dynamo.reset()
        compiled = torch.compile(sd1_unet, fullgraph=True, backend="aot_eager")
        with dynamo.config.patch(error_on_recompile=True):
            got = [run(compiled, args, kwargs, timestep=t) for t in (900, 500)] + [run(compiled, other, kwargs)]
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(eager[0], run(sd1_unet, args, kwargs, timestep=900), atol=1e-4), "must merge"


@pytest.mark.parametrize("config", [ToMe(ratio=0.5, max_downsample=2, seed=0),
                                    ImportanceMerge(ratio=0.5, seed=0, importance=torch.rand(16, 16), prune_steps=0.0)])
def test_plans_that_follow_the_run_compile_once_not_per_step(sd1_unet, config):
    """Random cells (reseeded per run) read the step clock: those hooks run eagerly, so the graphs compiled in
    the first steps serve every later one (traced, they made ImportanceMerge recompile at later steps)."""
    assert config.uses_clock
    args, kwargs = unet_inputs(sd1_unet, 2)
    steps = (999, 800, 600, 400, 200)
    with tokenmerge.patched(sd1_unet, config):
        eager = [run(sd1_unet, args, kwargs, timestep=t) for t in steps]
    with tokenmerge.patched(sd1_unet, config):
        dynamo.reset()
        compiled = torch.compile(sd1_unet, backend="aot_eager")
        # The first two calls compile (the frames that resume after the eager hooks see their shapes then).
        got = [run(compiled, args, kwargs, timestep=t) for t in steps[:2]]
        with dynamo.config.patch(error_on_recompile=True):
            got += [run(compiled, args, kwargs, timestep=t) for t in steps[2:]]
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(eager[1], eager[2], atol=1e-4), "the random cells change per step"


@pytest.mark.skipif(not os.environ.get("TOKENMERGE_SLOW_TESTS"), reason="inductor compiles for minutes on CPU; "
                    "set TOKENMERGE_SLOW_TESTS=1")
@pytest.mark.parametrize("config", [TRACEABLE[0], ToFu(ratio=0.5, use_rand=False), SiTo(ratio=0.5, base="V")])
def test_inductor_matches_eager(sd1_unet, config):
    args, kwargs = unet_inputs(sd1_unet, 2)
    with tokenmerge.patched(sd1_unet, config):
        eager = run(sd1_unet, args, kwargs)
        dynamo.reset()
        compiled = run(torch.compile(sd1_unet, fullgraph=True), args, kwargs)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("config,reads", [(ToMe(use_rand=False), False), (ToMe(), True),
                                          (SiTo(base="V"), False), (ImportanceMerge(), True)])
def test_bare_denoiser_reads_the_timestep_only_when_plans_depend_on_the_run(sd1_unet, config, reads):
    """Reading a device timestep is a host sync (and a graph break): the probe raises when its value is read."""
    class Unreadable:
        def __float__(self):
            raise RuntimeError("the timestep was read")

    tokenmerge.apply(sd1_unet, config)
    state = sd1_unet._tokenmerge
    sample = torch.zeros(2, 4, 16, 16)
    try:
        if reads:
            with pytest.raises(RuntimeError, match="timestep was read"):
                state.begin_call(sample, Unreadable())
        else:
            for expected_step in (0, 1):
                state.begin_call(sample, Unreadable())
                assert state.clock.step == expected_step
    finally:
        tokenmerge.remove(sd1_unet)
