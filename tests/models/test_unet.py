"""Stable Diffusion U-Nets (SD 1.x, SD 2.x, SDXL) and LCM through the conformance kit."""

from __future__ import annotations

import torch

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
