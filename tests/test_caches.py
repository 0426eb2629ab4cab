"""Merging stacked with diffusers' cache hooks (:mod:`tokenmerge.caches`), on the pipelines as diffusers' fast tests
build them:

* caches that skip whole blocks (FirstBlockCache, MagCache, TaylorSeer's lite mode) and the one that hands back an
  earlier attention output (PyramidAttentionBroadcast) stack with every method in either order of enabling: both
  act, a skipped block builds no plan, removing either leaves the other's output bit for bit, both gone is unpatched;
* an attention output PyramidAttentionBroadcast hands back is unmerged with the plan it was computed under;
* ImportanceMerge's importance is the guidance the sampler applied, cached step or not;
* caches that extrapolate a merged part's output (TaylorSeer on attention, FasterCache) are refused in either order.
"""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.api import state_of

from .models.helpers import no_hooks_left
from .test_pipeline_conformance import DIFFUSERS, flux, sd_text2img, wan

hooks = pytest.importorskip("diffusers.hooks")
if DIFFUSERS < (0, 36):
    pytest.skip(f"the cache hooks tested here need diffusers >= 0.36 ({DIFFUSERS})", allow_module_level=True)

STEPS = 6


def everywhere(pipe) -> dict:
    """PyramidAttentionBroadcast over the whole run: attention computed every second call, else reused."""
    return dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=lambda: 500)


CACHES = {
    "first-block": lambda pipe: hooks.FirstBlockCacheConfig(threshold=0.5),
    "mag": lambda pipe: hooks.MagCacheConfig(threshold=1.0, num_inference_steps=STEPS,
                                             mag_ratios=hooks.mag_cache.FLUX_MAG_RATIOS),
    "taylorseer-lite": lambda pipe: hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                                use_lite_mode=True),
    "pab": lambda pipe: hooks.PyramidAttentionBroadcastConfig(**everywhere(pipe)),
}
#: Caches that skip whole blocks: fewer plans than merging alone.
SKIP_BLOCKS = {"first-block", "mag", "taylorseer-lite"}


class Built:
    def __init__(self, build, **call) -> None:
        self.pipe, self.call = build()
        self.call.update(call)
        self.pipe.set_progress_bar_config(disable=True)
        self.unpatched = self.run()

    def run(self, **overrides) -> torch.Tensor:
        out = self.pipe(**{"num_inference_steps": STEPS, "output_type": "pt", **self.call, **overrides},
                        generator=torch.Generator().manual_seed(0))
        return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


@pytest.fixture(scope="module", params=["flux", "wan"])
def built(request) -> Built:
    if request.param == "flux":  # true CFG: two calls per step, so ImportanceMerge has its guidance signal
        return Built(flux, true_cfg_scale=3.0, negative_prompt="a cat")
    return Built(wan)


CONFIGS = [ToMe(ratio=0.5, seed=0, min_tokens=0), ImportanceMerge(ratio=0.5, seed=0, min_tokens=0)]


@pytest.mark.parametrize("merge_first", [True, False], ids=["merge-then-cache", "cache-then-merge"])
@pytest.mark.parametrize("config", CONFIGS, ids=["tome", "importance"])
@pytest.mark.parametrize("cache", list(CACHES))
def test_stacked_in_either_order_and_each_removable(built, cache, config, merge_first):
    pipe, denoiser = built.pipe, built.pipe.transformer
    alone = []
    with tokenmerge.patched(pipe, config, on_plan=alone.append):
        merged = built.run()
    denoiser.enable_cache(CACHES[cache](pipe))
    cached = built.run()
    denoiser.disable_cache()
    assert torch.equal(built.run(), built.unpatched)

    events = []
    if merge_first:
        tokenmerge.apply(pipe, config, on_plan=events.append)
        denoiser.enable_cache(CACHES[cache](pipe))
    else:
        denoiser.enable_cache(CACHES[cache](pipe))
        tokenmerge.apply(pipe, config, on_plan=events.append)
    both = built.run()
    assert not torch.allclose(both, cached, atol=1e-5) and not torch.allclose(both, merged, atol=1e-5)
    # The step clock counts the sampler's steps, whichever the cache computes (MagCache skips every block of some).
    assert state_of(pipe).clock.step == STEPS - 1 and {e.step for e in events} <= set(range(STEPS))
    if cache in SKIP_BLOCKS:  # a block the cache skips builds no plan
        assert 0 < len(events) < len(alone)
    else:
        assert len(events) == len(alone)
    if merge_first:
        denoiser.disable_cache()
        assert torch.equal(built.run(), merged)
        tokenmerge.remove(pipe)
    else:
        tokenmerge.remove(pipe)
        assert torch.equal(built.run(), cached)
        denoiser.disable_cache()
    assert torch.equal(built.run(), built.unpatched) and no_hooks_left(denoiser)


def attention_outputs(module: torch.nn.Module, handles: list) -> list[torch.Tensor]:
    """Every output of ``module`` as the block receives it (a hook registered after tokenmerge's: unmerged)."""
    seen = []

    def keep(mod, args, output):
        seen.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    handles.append(module.register_forward_hook(keep))
    return seen


@pytest.mark.parametrize("case", ["sd-unet", "flux", "wan"])
def test_broadcast_attention_is_unmerged_with_the_plan_it_was_made_under(case):
    """PyramidAttentionBroadcast hands back the merged output of the call before; unmerged with that call's plan
    it is that call's output again, bit for bit, though this call's plan differs."""
    build = {"sd-unet": sd_text2img, "flux": flux, "wan": wan}[case]
    pipe, call = build()
    if case == "wan":
        call["guidance_scale"] = 1.0  # one call per step (PyramidAttentionBroadcast counts calls, not steps)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.unet if case == "sd-unet" else pipe.transformer
    events = []
    tokenmerge.apply(pipe, ToMe(ratio=0.5, seed=0, min_tokens=0), on_plan=events.append)
    hooks.apply_pyramid_attention_broadcast(denoiser, hooks.PyramidAttentionBroadcastConfig(**everywhere(pipe)))
    block = next(t for t in state_of(pipe).merged_parts.values())[0].rsplit(".", 1)[0]
    attention = denoiser.get_submodule(block + (".attn1" if case != "flux" else ".attn"))
    handles = []
    seen = attention_outputs(attention, handles)
    pipe(**call, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0))
    plans = [e.plan for e in events if e.block == block]
    assert len(seen) == len(plans) == 4
    assert not torch.equal(plans[0].assign, plans[1].assign), "the test needs plans that differ between steps"
    assert torch.equal(seen[1], seen[0]) and torch.equal(seen[3], seen[2])  # reused, as computed
    assert not torch.equal(seen[2], seen[1])  # computed anew
    for handle in handles:
        handle.remove()
    tokenmerge.remove(pipe)


def test_importance_is_the_guidance_the_sampler_applied_on_cached_steps():
    """FirstBlockCache skips the blocks in some calls; the importance of each next step is |cond - uncond| of the
    predictions the pipeline received, cached or not."""
    built = Built(flux, true_cfg_scale=3.0, negative_prompt="a cat")
    pipe, denoiser = built.pipe, built.pipe.transformer
    events = []
    config = ImportanceMerge(ratio=0.5, importance="cfg", seed=0, min_tokens=0)
    tokenmerge.apply(pipe, config, on_plan=events.append)
    denoiser.enable_cache(hooks.FirstBlockCacheConfig(threshold=0.5))
    state = state_of(pipe)
    outputs, importances = [], []

    def record(module, args, output):
        outputs.append(state.adapter.prediction(output).detach().clone())
        if len(outputs) % 2 == 0:  # the step's second (unconditional) call: its importance is set
            importances.append(state.importance.clone())

    handle = denoiser.register_forward_hook(record)
    built.run()
    handle.remove()
    blocks = len(state.merged_parts)
    planned = [sum(e.step == step for e in events) for step in range(STEPS)]
    assert min(planned) < 2 * blocks, "no call was cached: the test needs one"
    for step, importance in enumerate(importances):
        cond, uncond = outputs[2 * step], outputs[2 * step + 1]
        torch.testing.assert_close(importance, (cond - uncond).abs().float().mean(dim=1))
    denoiser.disable_cache()
    tokenmerge.remove(pipe)


EXTRAPOLATING = {
    "taylorseer": lambda pipe: hooks.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1),
    "faster-cache": lambda pipe: hooks.FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901), unconditional_batch_skip_range=2,
        current_timestep_callback=lambda: pipe.current_timestep, attention_weight_callback=lambda _: 0.5,
        is_guidance_distilled=True),
}


@pytest.mark.parametrize("cache", list(EXTRAPOLATING))
def test_a_cache_that_extrapolates_merged_outputs_is_refused_in_either_order(cache):
    built = Built(flux)
    pipe, denoiser = built.pipe, built.pipe.transformer
    denoiser.enable_cache(EXTRAPOLATING[cache](pipe))
    with pytest.raises(ValueError, match="extrapolates its output .*use_lite_mode=True"):
        tokenmerge.apply(pipe, ToMe(ratio=0.5))
    assert no_hooks_left(denoiser) and tokenmerge.current_config(pipe) is None
    cached = built.run()
    denoiser.disable_cache()

    tokenmerge.apply(pipe, ToMe(ratio=0.5))
    denoiser.enable_cache(EXTRAPOLATING[cache](pipe))
    with pytest.raises(ValueError, match="extrapolates its output"):
        built.run()
    tokenmerge.remove(pipe)
    assert torch.equal(built.run(), cached)
    denoiser.disable_cache()
    assert torch.equal(built.run(), built.unpatched)
