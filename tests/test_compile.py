"""torch.compile of a patched denoiser: no graph breaks for every method's defaults (random draws and the run's
phases included), and the compiled graph computes what eager does.

The fast tests compile with ``backend="aot_eager"`` (dynamo's full capture and AOTAutograd's functionalised
graph, run by eager kernels: seconds). Inductor's code generation takes minutes on a 2-core CPU, so the
inductor test runs only with ``TOKENMERGE_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ReToM, SiTo, ToFu, ToMe
from tokenmerge.methods import METHODS
from tokenmerge.tools.tiny import tiny_pipeline

from .conftest import run, unet_inputs

dynamo = pytest.importorskip("torch._dynamo")
if not dynamo.is_dynamo_supported():
    pytest.skip("torch.compile is not supported on this Python/platform", allow_module_level=True)

# Methods whose plans draw nothing and do not depend on the run (uses_rng and uses_clock are False).
TRACEABLE = [
    ToMe(ratio=0.5, use_rand=False, max_downsample=2),
    ImportanceMerge(ratio=0.5, dst_selection="topk", importance=torch.rand(16, 16), prune_steps=0.0),
]


def graphs(unet, config) -> int:
    """Graphs ``torch._dynamo.explain`` captures in one patched call of ``unet``, as ``torch.compile(unet)`` does:
    the forward in one, and each of the module's own traced hooks with tensor work in a frame of its own."""
    args, kwargs = unet_inputs(unet, 2)
    dynamo.reset()
    with tokenmerge.patched(unet, config), torch.no_grad():
        return dynamo.explain(unet)(*args, **kwargs).graph_count


# ImportanceMerge(importance="cfg") has a second frame: the post-hook computing |eps_cond - eps_uncond|.
@pytest.mark.parametrize("config,frames", [(TRACEABLE[1], 1), (ToMe(), 1), (ImportanceMerge(), 2), (ToFu(), 1),
                                           (SiTo(), 1), (ReToM(), 1),
                                           (ImportanceMerge(importance="crossattn"), 1)])
def test_explain_finds_no_graph_breaks(sd1_unet, config, frames):
    assert graphs(sd1_unet, config) == frames


def counting_backend(compiled: list):
    """``aot_eager`` (eager kernels, so random draws match eager's), recording every graph compiled."""
    aot_eager = dynamo.lookup_backend("aot_eager")

    def backend(gm, example_inputs):
        compiled.append(gm)
        return aot_eager(gm, example_inputs)

    return backend


STEPS = (999, 800, 600, 400, 200)  # a bare denoiser's run: a larger timestep starts the next one


# The defaults draw random numbers restarted per run; ImportanceMerge also changes phase during the run.
@pytest.mark.parametrize("config,graphs", [
    (ToMe(ratio=0.5, max_downsample=2), 1),
    # The U-Net without a map (first step), pruning, merging; and the post-hook's |eps_cond - eps_uncond|
    # (the compiled module's own hooks are frames of their own).
    (ImportanceMerge(ratio=0.5, prune_steps=0.3), 4),
    (ToFu(ratio=0.5), 1),
    (SiTo(ratio=0.5), 1),
    # plan_every, ReToM's period: a step that plans (first with no plan held, then replacing held ones) and one
    # that reuses
    (ToMe(ratio=0.5, max_downsample=2, plan_every=2), 3),
    (ReToM(ratio=0.5, period=2), 3),
    # size-aware keys (as a mask, and as the bias channel through the projection hooks) and K/V-only merging
    (ToMe(ratio=0.5, max_downsample=2, proportional_attention=True, merge_queries=False), 1),
    (ImportanceMerge(ratio=0.5, prune_steps=0.3, proportional_attention=True, bias_via="channel"), 4),
    (SiTo(ratio=0.5, proportional_attention=True, merge_queries=False), 1),
])
def test_plans_that_follow_the_run_compile_with_fullgraph_once_per_phase(sd1_unet, config, graphs):
    """The random stream and the step live in the eager denoiser pre-hook, outside the graph: fullgraph=True
    compiles the patched U-Net, a later run recompiles nothing, and it computes what eager does."""
    assert config.uses_clock
    args, kwargs = unet_inputs(sd1_unet, 2)
    torch.manual_seed(0)
    with tokenmerge.patched(sd1_unet, config):
        eager = [run(sd1_unet, args, kwargs, timestep=t) for t in STEPS]
    compiled_graphs = []
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tokenmerge.patched(sd1_unet, config):
        dynamo.reset()
        compiled = torch.compile(sd1_unet, fullgraph=True, backend=counting_backend(compiled_graphs))
        got = [run(compiled, args, kwargs, timestep=t) for t in STEPS]
        assert len(compiled_graphs) == graphs
        again = [run(compiled, args, kwargs, timestep=t) for t in STEPS]  # a second run, the same fork
    assert len(compiled_graphs) == graphs
    assert torch.equal(torch.get_rng_state(), before), "the user's RNG is neither consumed nor replaced"
    for a, b, c in zip(got, again, eager):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
        torch.testing.assert_close(b, c, atol=1e-5, rtol=0)
    assert not torch.allclose(got[-1], run(sd1_unet, args, kwargs, timestep=STEPS[-1]), atol=1e-4), "must merge"


def test_plans_reported_to_on_plan_run_eagerly_and_compile_once(sd1_unet):
    """An ``on_plan`` callback is Python run per plan: the plan hooks run eagerly, a graph break per block, and the
    graphs compiled in the first steps serve every later one."""
    config = ToMe(ratio=0.5, max_downsample=2)
    args, kwargs = unet_inputs(sd1_unet, 2)
    torch.manual_seed(0)
    with tokenmerge.patched(sd1_unet, config):
        eager = [run(sd1_unet, args, kwargs, timestep=t) for t in STEPS]
    torch.manual_seed(0)
    events = []
    with tokenmerge.patched(sd1_unet, config, on_plan=events.append):
        dynamo.reset()
        compiled_graphs = []
        compiled = torch.compile(sd1_unet, backend=counting_backend(compiled_graphs))
        # The first two calls compile (the frames that resume after the eager hooks see their shapes then).
        got = [run(compiled, args, kwargs, timestep=t) for t in STEPS[:2]]
        assert len(compiled_graphs) > 2, "the U-Net's forward is cut at every patched block"
        with dynamo.config.patch(error_on_recompile=True):
            got += [run(compiled, args, kwargs, timestep=t) for t in STEPS[2:]]
    assert sorted({event.step for event in events}) == list(range(len(STEPS)))
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(not os.environ.get("TOKENMERGE_SLOW_TESTS"), reason="inductor compiles for minutes on CPU; "
                    "set TOKENMERGE_SLOW_TESTS=1")
@pytest.mark.parametrize("config", [TRACEABLE[0], ToFu(ratio=0.5, use_rand=False), SiTo(ratio=0.5, base="V"),
                                    ToMe(ratio=0.5, use_rand=False, proportional_attention=True, merge_queries=False),
                                    ToMe(ratio=0.5, max_downsample=2)])
def test_inductor_matches_eager(sd1_unet, config):
    """Random cells too, with inductor drawing through the eager kernels (``fallback_random``): the same stream."""
    args, kwargs = unet_inputs(sd1_unet, 2)
    torch.manual_seed(0)
    with tokenmerge.patched(sd1_unet, config):
        eager = run(sd1_unet, args, kwargs)
    torch.manual_seed(0)
    with tokenmerge.patched(sd1_unet, config), torch._inductor.config.patch(fallback_random=True):
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


def test_a_compiled_pipeline_makes_the_eager_images():
    """As users compile: ``pipe.unet = torch.compile(pipe.unet, fullgraph=True)``, the flagship's defaults (CFG
    importance, pruning then merging, random destinations), the scheduler telling the steps; two calls."""
    pipe = tiny_pipeline("sd1")
    config = ImportanceMerge(ratio=0.5, min_tokens=0)

    def generate(seed):
        return pipe("a red circle", num_inference_steps=5, height=64, width=64, output_type="latent",
                    generator=torch.Generator().manual_seed(seed)).images

    with tokenmerge.patched(pipe, config):
        eager = [generate(0), generate(1)]
    unet = pipe.unet
    with tokenmerge.patched(pipe, config):
        dynamo.reset()
        pipe.unet = torch.compile(unet, fullgraph=True, backend="aot_eager")
        try:
            compiled = [generate(0), generate(1)]
        finally:
            pipe.unet = unet
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(eager[0], eager[1]), "two seeds, two images"


def test_apply_and_remove_through_a_compiled_wrapper_raise_naming_the_order_that_works():
    """``pipe.unet = torch.compile(pipe.unet)`` after ``apply``: torch.compile does not guard module hooks, so
    removing them beneath the wrapper would leave its traced code merging (it did, silently). remove() raises and
    names the fix, which gives the unpatched outputs back; applying onto a compiled wrapper raises the same way."""
    pipe = tiny_pipeline("sd1")
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a cat", num_inference_steps=2, height=64, width=64, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    reference = generate()
    tokenmerge.apply(pipe, ToMe(ratio=0.5, seed=0, min_tokens=0))
    merged = generate()
    dynamo.reset()
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    torch.testing.assert_close(generate(), merged, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"torch.compile wrapper.*pipe.unet = pipe.unet._orig_mod"):
        tokenmerge.remove(pipe)
    with pytest.raises(ValueError, match=r"torch.compile wrapper.*apply\(pipe, config\) first"):
        tokenmerge.apply(pipe, ImportanceMerge(ratio=0.5))
    pipe.unet = pipe.unet._orig_mod  # the fix the message names
    tokenmerge.remove(pipe)
    assert torch.equal(generate(), reference)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inductor_the_default_backend_compiles_every_method_to_the_eager_outputs(sd1_unet, name):
    """``torch.compile`` with its default backend (inductor), whole graph, each method at its defaults (random cells
    and ImportanceMerge's draws included: ``fallback_random`` draws through the eager kernels, the same stream).
    One per method keeps CI's time in bounds (tens of seconds each on 2 cores)."""
    config = METHODS[name](ratio=0.5, seed=0, min_tokens=0)
    args, kwargs = unet_inputs(sd1_unet, 2)
    with tokenmerge.patched(sd1_unet, config):
        eager = run(sd1_unet, args, kwargs)
    with tokenmerge.patched(sd1_unet, config), torch._inductor.config.patch(fallback_random=True):
        dynamo.reset()
        compiled = run(torch.compile(sd1_unet, fullgraph=True), args, kwargs)
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eager, run(sd1_unet, args, kwargs), atol=1e-4), "must merge"
