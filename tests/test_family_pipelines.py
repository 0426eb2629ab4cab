"""The model families end to end: the real diffusers pipelines (PixArt-alpha/Sigma, LCM, AnimateDiff, DiT),
built offline from tiny random-weight components, patched, run for a few steps and restored."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    AnimateDiffPipeline,
    DDIMScheduler,
    DiTPipeline,
    DPMSolverMultistepScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    MotionAdapter,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
)

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.models.animatediff import text_per_frame
from tokenmerge.tools.tiny import tiny_dit, tiny_lcm_unet, tiny_pipeline, tiny_pixart

from .models.helpers import no_hooks_left
from .test_hooks import HostSyncs
from .text_encoders import t5_parts

PROMPT = dict(prompt="a red circle", height=64, width=64, output_type="latent")


@pytest.fixture(scope="module")
def sd():
    """VAE, CLIP text encoder and tokenizer, and an SD 1.x U-Net: the tiny SD pipeline's parts."""
    return tiny_pipeline("sd1").components


def generate(pipe, **kwargs) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(generator=torch.Generator().manual_seed(0), **kwargs)
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


def check_merges_and_restores(pipe, configs, **kwargs) -> dict[str, list]:
    """Each config changes the output and keeps it finite, without a host sync from tokenmerge (test_hooks.py)
    but the one documented read per generation where the pipeline does not say whether it guides (PixArt, DiT:
    ``PatchState._guided_batch``); remove() restores it bit for bit.

    Returns the plan events of each config (by class name) and checks that ImportanceMerge's signal reached
    the blocks through the real pipeline: no map at the first step, a map at every later one.
    """
    unpatched = generate(pipe, **kwargs)
    events = {}
    for config in configs:
        recorded = events.setdefault(type(config).__name__, [])
        tokenmerge.apply(pipe, config, on_plan=recorded.append)
        with HostSyncs() as syncs:
            merged = generate(pipe, **kwargs)
        assert len(syncs.found) <= 1 and all("(_guided_batch)" in found for found in syncs.found), config
        assert torch.isfinite(merged).all() and not torch.allclose(merged, unpatched, atol=1e-4), config
        if isinstance(config, ImportanceMerge):
            assert {e.step for e in recorded if e.importance is None} == {0}
    tokenmerge.remove(pipe)
    assert torch.equal(generate(pipe, **kwargs), unpatched)
    assert no_hooks_left(pipe.unet if hasattr(pipe, "unet") else pipe.transformer)
    return events


@pytest.mark.parametrize("pipeline_class", [PixArtAlphaPipeline, PixArtSigmaPipeline], ids=["alpha", "sigma"])
def test_pixart(sd, pipeline_class):
    pipe = pipeline_class(vae=sd["vae"], transformer=tiny_pixart(), scheduler=DPMSolverMultistepScheduler(),
                          **t5_parts())
    kwargs = dict(PROMPT, height=128, width=128, num_inference_steps=3, guidance_scale=4.5, clean_caption=False,
                  use_resolution_binning=False, max_sequence_length=16)  # binning needs sample_size >= 32
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5)):
        config = tokenmerge.current_config(pipe)
    assert (config.layers, config.merge_crossattn, config.match) == ((0.25, 0.75), True, "grid")  # the preset
    events = check_merges_and_restores(pipe, [ToMe(ratio=0.5, seed=0), ImportanceMerge(ratio=0.5, seed=0)],
                                       **kwargs)
    assert {e.block for e in events["ToMe"]} == {"transformer_blocks.1", "transformer_blocks.2"}  # 1-2 of 4
    assert {e.grid for e in events["ImportanceMerge"]} == {(8, 8)}  # 16x16 latent, 2x2 patches


def lcm_pipe(sd):
    return LatentConsistencyModelPipeline(
        vae=sd["vae"], text_encoder=sd["text_encoder"], tokenizer=sd["tokenizer"], unet=tiny_lcm_unet(),
        scheduler=LCMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def test_lcm_takes_importance_from_cross_attention(sd):
    pipe = lcm_pipe(sd)
    kwargs = dict(PROMPT, num_inference_steps=4)
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5)):
        assert tokenmerge.current_config(pipe).importance == "crossattn"  # the preset
    check_merges_and_restores(pipe, [ImportanceMerge(ratio=0.5, seed=0)], **kwargs)


@pytest.mark.parametrize("images", [1, 2])
def test_lcm_refuses_cfg_importance_and_names_crossattn(sd, images):
    pipe = lcm_pipe(sd)
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5, importance="cfg")):
        with pytest.raises(ValueError, match="importance='crossattn'"):  # an even batch is no CFG batch either
            generate(pipe, num_inference_steps=2, num_images_per_prompt=images, **PROMPT)


def test_animatediff(sd):
    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(32, 64, 64), motion_layers_per_block=1, motion_num_attention_heads=2,
                            motion_norm_num_groups=16, motion_max_seq_length=16)
    # The documented path: an SD U-Net and a motion adapter; the pipeline builds the UNetMotionModel.
    pipe = AnimateDiffPipeline(vae=sd["vae"], text_encoder=sd["text_encoder"], tokenizer=sd["tokenizer"],
                               unet=sd["unet"], motion_adapter=adapter,
                               scheduler=DDIMScheduler(beta_schedule="linear", clip_sample=False))
    kwargs = dict(PROMPT, num_frames=4, num_inference_steps=3, guidance_scale=7.5)
    texts = []  # the text states the pipeline gives its UNetMotionModel: per video or per frame, by diffusers version
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kw: texts.append(kw["encoder_hidden_states"].shape), with_kwargs=True)
    generate(pipe, **kwargs)
    hook.remove()
    assert texts[0] == text_per_frame(torch.zeros(2, 77, 32), 4).shape  # what the adapter's example inputs pass
    spatial = ToMe(ratio=0.5, seed=0)
    temporal = ToMe(ratio=0.5, seed=0, temporal_ratio=0.5)
    events = check_merges_and_restores(pipe, [spatial, ImportanceMerge(ratio=0.5, seed=0), temporal], **kwargs)
    assert {e.grid for e in events["ImportanceMerge"]} == {(8, 8)}
    assert all(e.importance.shape == (4, 64) for e in events["ImportanceMerge"] if e.importance is not None)
    with tokenmerge.patched(pipe, spatial):  # frames merged in time: another output than spatial merging alone
        spatial_only = generate(pipe, **kwargs)
    with tokenmerge.patched(pipe, temporal):
        assert any(m._forward_pre_hooks for n, m in pipe.unet.named_modules() if ".motion_modules." in n)
        assert not torch.allclose(generate(pipe, **kwargs), spatial_only, atol=1e-4)


def dit_pipe(sd):
    return DiTPipeline(transformer=tiny_dit(), vae=sd["vae"], scheduler=DPMSolverMultistepScheduler(),
                       id2label={0: "tench", 1: "goldfish"})


def test_dit(sd):
    pipe = dit_pipe(sd)
    kwargs = dict(class_labels=[0, 1], num_inference_steps=3, guidance_scale=4.0, output_type="np")  # 128 px
    events = check_merges_and_restores(pipe, [ToMe(ratio=0.5, seed=0), ImportanceMerge(ratio=0.5, seed=0)],
                                       **kwargs)
    for event in events["ImportanceMerge"]:  # batch [cond 0, cond 1, null, null]: a plan per image and its twin
        assert torch.equal(event.plan.kept[:2], event.plan.kept[2:])


def test_dit_without_guidance_refuses_cfg_importance(sd):
    # DiTPipeline keeps its guidance switch local: two class labels at guidance_scale=1 are two images, not a pair.
    pipe = dit_pipe(sd)
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5)):
        with pytest.raises(ValueError, match="needs classifier-free guidance"):
            generate(pipe, class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    events = []
    with tokenmerge.patched(pipe, ToMe(ratio=0.5, seed=0), on_plan=events.append):
        generate(pipe, class_labels=[0, 1], num_inference_steps=2, guidance_scale=1.0, output_type="np")
    assert events and all(not torch.equal(e.plan.kept[0], e.plan.kept[1]) for e in events)  # a plan per image


def pixart_pipe(sd):
    return PixArtAlphaPipeline(vae=sd["vae"], transformer=tiny_pixart(), scheduler=DPMSolverMultistepScheduler(),
                               **t5_parts())


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_pixart_tells_cfg_pairs_from_two_images(sd, guidance):
    pipe = pixart_pipe(sd)
    kwargs = dict(PROMPT, height=128, width=128, num_inference_steps=2, guidance_scale=guidance, clean_caption=False,
                  use_resolution_binning=False, max_sequence_length=16, num_images_per_prompt=2)
    # A CFG pair shares one plan; two images get one each (PixArt's grid matching would make them equal anyway).
    config = ImportanceMerge(ratio=0.5, seed=0, prune_steps=0, match="features", importance=torch.rand(16, 16))
    events = []
    with tokenmerge.patched(pipe, config, on_plan=events.append):
        generate(pipe, **kwargs)
    shared = [torch.equal(e.plan.kept[0], e.plan.kept[e.plan.kept.shape[0] // 2]) for e in events]
    assert events and all(shared) == (guidance > 1) and any(shared) == (guidance > 1)
