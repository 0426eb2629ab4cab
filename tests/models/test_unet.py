"""Stable Diffusion U-Nets (SD 1.x, SD 2.x, SDXL) and LCM through the conformance kit."""

from __future__ import annotations

import torch

from tokenmerge.models import example_inputs
from tokenmerge.tools.tiny import tiny_lcm_unet, tiny_unet

from ..conftest import run, unet_inputs
from .kit import FamilyConformance


def unet_call(model, t=500, seed=0):
    args, kwargs = unet_inputs(model, seed=seed)
    return run(model, args, kwargs, timestep=t)


def lcm_call(model, t=500, seed=0):
    """LCM's call: no CFG batch, the guidance-scale embedding as ``timestep_cond``."""
    args, kwargs = unet_inputs(model, seed=seed)
    condition = torch.randn(2, model.config.time_cond_proj_dim, generator=torch.Generator().manual_seed(seed))
    return run(model, args, {**kwargs, "timestep_cond": condition}, timestep=t)


class TestSD1(FamilyConformance):
    build = staticmethod(lambda: tiny_unet("sd1"))
    call = staticmethod(unet_call)


class TestSD2(FamilyConformance):
    build = staticmethod(lambda: tiny_unet("sd2"))
    call = staticmethod(unet_call)


class TestSDXL(FamilyConformance):
    build = staticmethod(lambda: tiny_unet("sdxl"))
    call = staticmethod(unet_call)


class TestLCM(FamilyConformance):
    build = staticmethod(tiny_lcm_unet)
    call = staticmethod(lcm_call)


def test_lcm_example_inputs_have_no_cfg_batch_and_a_guidance_embedding():
    lcm = tiny_lcm_unet()
    args, kwargs = example_inputs(lcm, 128, images=2)
    assert args[0].shape == (2, 4, 16, 16) and args[2].shape == (2, 77, 32)  # no CFG: batch = images
    assert kwargs["timestep_cond"].shape == (2, lcm.config.time_cond_proj_dim)


def test_sdxl_example_inputs_carry_its_pooled_text_and_size_ids():
    sdxl = tiny_unet("sdxl")
    args, kwargs = example_inputs(sdxl, (128, 96), images=1)
    assert args[0].shape == (2, 4, 16, 12)
    added = kwargs["added_cond_kwargs"]
    assert added["time_ids"].tolist() == [[128, 96, 0, 0, 128, 96]] * 2  # original size, crop, target size
    assert added["text_embeds"].shape == (2, 32)
