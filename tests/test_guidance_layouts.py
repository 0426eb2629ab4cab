"""Guidance batches that are not ``[uncond; cond]``: PAG's ``[uncond; cond; perturbed]`` (and ``[cond; perturbed]``
without CFG) and InstructPix2Pix's ``[text+image; image; uncond]``, built from diffusers' own pipeline classes.

ImportanceMerge must take its importance from the right two parts and share one plan among the parts of each
image, with several images per prompt too, where a halves rule would pair rows of different roles."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionInstructPix2PixPipeline, StableDiffusionPAGPipeline, UNet2DConditionModel
from PIL import Image

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.methods.base import INSTRUCT_PIX2PIX, PAG, PAG_CFG
from tokenmerge.models import tiny_configs
from tokenmerge.tools.tiny import tiny_pipeline

IMAGES = 2  # per prompt: the batch is parts x 2, so halves would mix roles


def pag_pipeline():
    pipe = StableDiffusionPAGPipeline(**tiny_pipeline("sd1").components, pag_applied_layers=["mid"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pix2pix_pipeline():
    components = tiny_pipeline("sd1").components
    config = {k: v for k, v in tiny_configs()["sd1"].items() if not k.startswith("_")}
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(**{**config, "in_channels": 8}).eval()  # latent + image latent
    pipe = StableDiffusionInstructPix2PixPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record(pipe, config, **call):
    """Run ``pipe`` patched; return the plan events and the denoiser's predictions, call by call."""
    events, predictions = [], []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: predictions.append(output[0].detach()))
    with tokenmerge.patched(pipe, config, on_plan=events.append):
        pipe(**call, num_images_per_prompt=IMAGES, num_inference_steps=3, height=64, width=64, output_type="pt",
             generator=torch.Generator().manual_seed(0))
    hook.remove()
    return events, predictions


def check_layout(events, predictions, layout):
    steps = sorted({e.step for e in events})
    assert len(steps) == 3
    for event in events:
        kept = event.plan.kept
        assert kept.shape[0] == layout.parts * IMAGES
        for image in range(IMAGES):  # the parts of one image share its plan
            rows = [kept[part * IMAGES + image] for part in range(layout.parts)]
            assert all(torch.equal(rows[0], row) for row in rows[1:])
        assert not torch.equal(kept[0], kept[1]), "two images of a prompt got one plan: roles were mixed"
    for event in events:  # importance of step s: |eps_cond - eps_uncond| of step s - 1, from the layout's parts
        if event.step == 0 or event.grid != (8, 8):
            continue
        eps = predictions[event.step - 1]
        expected = (layout.part(eps, layout.cond) - layout.part(eps, layout.uncond)).abs().mean(dim=1)
        torch.testing.assert_close(event.importance, expected.flatten(1))


def test_pag_with_cfg_takes_importance_from_uncond_and_cond_and_shares_plans_across_three_parts():
    pipe = pag_pipeline()
    events, predictions = record(pipe, ImportanceMerge(ratio=0.5, seed=0, min_tokens=0), prompt="a cat",
                                 guidance_scale=5.0, pag_scale=3.0)
    assert events and predictions[0].shape[0] == 3 * IMAGES
    check_layout(events, predictions, PAG_CFG)
    assert tokenmerge.current_config(pipe) is None


def test_pag_without_cfg_has_no_unconditional_part_and_says_so():
    pipe = pag_pipeline()
    with pytest.raises(ValueError, match=r"perturbed-attention guidance without CFG \[cond; perturbed\].*has none"):
        record(pipe, ImportanceMerge(ratio=0.5, seed=0, min_tokens=0), prompt="a cat", guidance_scale=1.0,
               pag_scale=3.0)
    events, _ = record(pipe, ImportanceMerge(ratio=0.5, seed=0, min_tokens=0, importance="crossattn"),
                       prompt="a cat", guidance_scale=1.0, pag_scale=3.0)
    for event in events:  # [cond; perturbed] of each image share a plan
        kept = event.plan.kept
        assert kept.shape[0] == PAG.parts * IMAGES and torch.equal(kept[0], kept[IMAGES])


def test_instruct_pix2pix_compares_the_fully_conditional_part_with_the_unconditional_one():
    pipe = pix2pix_pipeline()
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy())
    events, predictions = record(pipe, ImportanceMerge(ratio=0.5, seed=0, min_tokens=0), prompt="make it red",
                                 image=image, guidance_scale=5.0, image_guidance_scale=1.5)
    assert predictions[0].shape[0] == 3 * IMAGES
    check_layout(events, predictions, INSTRUCT_PIX2PIX)


def test_other_methods_run_on_three_part_batches_and_remove_restores():
    pipe = pag_pipeline()
    call = dict(prompt="a cat", guidance_scale=5.0, pag_scale=3.0, num_inference_steps=2, height=64, width=64,
                output_type="pt")
    reference = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    with tokenmerge.patched(pipe, ToMe(ratio=0.5, seed=0, min_tokens=0)):
        merged = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(merged, reference)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, reference)


def test_a_batch_that_is_not_a_whole_number_of_the_layouts_parts_is_not_guessed():
    """A denoiser call of batch 2 while the pipeline says it runs [uncond; cond; perturbed] (a call its own loop did
    not make): CFG importance raises naming the layout, instead of taking halves for a pair."""
    pipe = pag_pipeline()
    pipe._guidance_scale, pipe._pag_scale = 5.0, 3.0  # what the pipeline's call sets: CFG and PAG on
    assert pipe.do_classifier_free_guidance and pipe.do_perturbed_attention_guidance
    gen = torch.Generator().manual_seed(0)
    latent, text = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 77, 32, generator=gen)
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5, seed=0, min_tokens=0)):
        with pytest.raises(ValueError, match=r"\[uncond; cond; perturbed\] \(3 parts per image\).*batch size 2"):
            pipe.unet(latent, torch.tensor(500), text)
