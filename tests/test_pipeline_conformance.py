"""Pipeline conformance: every supported diffusers pipeline, built as diffusers' own fast tests build it (their
``get_dummy_components``: two-level U-Nets with attention only at the lower level, ``layers_per_block=2``, a
5-layer CLIP text encoder of width 32), offline (tokenizers built here stand in for ``hf-internal-testing``'s), and
the real Zero123++ community pipeline. On each, for every registered method:

* ratio 0 is bit-identical to the unpatched pipeline, and so is the output after ``remove()``;
* at ratio 0.5 the method merges: every plan keeps fewer tokens than its block has, the output moves, and it stays
  finite (every method runs on every pipeline here: none refuses one);
* with guidance off, CFG importance raises naming guidance, and a method that needs none still merges.

A new pipeline is one entry in :data:`PIPELINES`; a new method is checked on all of them by
:data:`tokenmerge.methods.METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import pytest
import torch
from PIL import Image

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.methods import METHODS
from tokenmerge.tools.tiny import _char_tokenizer

from .models.helpers import no_hooks_left
from .text_encoders import clip_text_encoder, t5_parts

STEPS = 2
DIFFUSERS = tuple(int(part) for part in diffusers.__version__.split(".")[:2])


def image(size: int = 64, seed: int = 3) -> Image.Image:
    pixels = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))
    return Image.fromarray((pixels * 255).byte().numpy())


def fast_test_vae(norm_num_groups: int = 32):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=norm_num_groups).eval()


def fast_test_unet(**overrides):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32)
    return UNet2DConditionModel(**{**config, **overrides}).eval()


def ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False)


def sd_components(**unet):
    return dict(unet=fast_test_unet(**unet), scheduler=ddim(), vae=fast_test_vae(), text_encoder=clip_text_encoder(),
                tokenizer=_char_tokenizer(), safety_checker=None, feature_extractor=None,
                requires_safety_checker=False)


def sd_text2img():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**sd_components()), dict(prompt="a painting of a squirrel", guidance_scale=6.0)


def sd_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    return StableDiffusionImg2ImgPipeline(**sd_components()), dict(
        prompt="a painting of a squirrel", image=image(), strength=0.75, num_inference_steps=4, guidance_scale=6.0)


def sd_inpaint():
    from diffusers import StableDiffusionInpaintPipeline

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    return StableDiffusionInpaintPipeline(**sd_components(in_channels=9)), dict(
        prompt="a painting of a squirrel", image=image(), mask_image=mask, guidance_scale=6.0)


def sd_controlnet():
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    torch.manual_seed(0)
    controlnet = ControlNetModel(block_out_channels=(32, 64), layers_per_block=2, in_channels=4,
                                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), cross_attention_dim=32,
                                 conditioning_embedding_out_channels=(16, 32)).eval()
    return StableDiffusionControlNetPipeline(**sd_components(), controlnet=controlnet), dict(
        prompt="a painting of a squirrel", image=image(), guidance_scale=6.0)


def sd_pag():
    from diffusers import StableDiffusionPAGPipeline

    return StableDiffusionPAGPipeline(**sd_components(), pag_applied_layers=["mid"]), dict(
        prompt="a painting of a squirrel", guidance_scale=6.0, pag_scale=3.0)


def instruct_pix2pix():
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return StableDiffusionInstructPix2PixPipeline(**sd_components(in_channels=8)), dict(
        prompt="turn it into a squirrel", image=image(), guidance_scale=6.0, image_guidance_scale=1.5)


def sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    unet = fast_test_unet(attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
                          addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                          projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        unet=unet, scheduler=scheduler, vae=fast_test_vae(), text_encoder=clip_text_encoder(),
        tokenizer=_char_tokenizer(), text_encoder_2=clip_text_encoder(with_projection=True),
        tokenizer_2=_char_tokenizer())
    return pipe, dict(prompt="a painting of a squirrel", guidance_scale=5.0)


def lcm():
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    components = sd_components(time_cond_proj_dim=256, norm_num_groups=2)
    components["scheduler"] = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                           clip_sample=False, set_alpha_to_one=False)
    return LatentConsistencyModelPipeline(**components), dict(prompt="a painting of a squirrel", guidance_scale=6.0)


def animatediff():
    from diffusers import AnimateDiffPipeline, MotionAdapter

    unet = fast_test_unet(norm_num_groups=2)
    torch.manual_seed(0)
    motion = MotionAdapter(block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=2,
                           motion_num_attention_heads=4)
    components = sd_components()
    for unused in ("safety_checker", "requires_safety_checker"):
        components.pop(unused)
    components.update(unet=unet, motion_adapter=motion)
    return AnimateDiffPipeline(**components), dict(prompt="a squirrel running", num_frames=4, guidance_scale=7.5)


def pixart():
    from diffusers import AutoencoderKL, DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6).eval()
    torch.manual_seed(0)
    pipe = PixArtAlphaPipeline(transformer=transformer, vae=AutoencoderKL().eval(), scheduler=DDIMScheduler(),
                               **t5_parts())
    return pipe, dict(prompt="a painting of a squirrel", guidance_scale=5.0, height=16, width=16,
                      use_resolution_binning=False, max_sequence_length=16, clean_caption=False)


def dit():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=16, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False).eval()
    torch.manual_seed(0)
    return DiTPipeline(transformer=transformer, vae=AutoencoderKL().eval(), scheduler=DDIMScheduler()), dict(
        class_labels=[1], guidance_scale=4.0)


def sd3_components():
    """diffusers' SD3 fast-test components: two CLIP encoders with projections, a T5, a one-level VAE."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    t5 = t5_parts()
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                text_encoder=clip_text_encoder(with_projection=True), tokenizer=_char_tokenizer(),
                text_encoder_2=clip_text_encoder(with_projection=True), tokenizer_2=_char_tokenizer(),
                text_encoder_3=t5["text_encoder"], tokenizer_3=t5["tokenizer"])


SD3_CALL = dict(prompt="a painting of a squirrel", height=32, width=32, guidance_scale=5.0, max_sequence_length=16)


def sd3():
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**sd3_components()), dict(SD3_CALL)


def sd3_controlnet():
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    torch.manual_seed(0)
    controlnet = SD3ControlNetModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4).eval()
    control = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    return StableDiffusion3ControlNetPipeline(**sd3_components(), controlnet=controlnet), dict(
        SD3_CALL, control_image=control, controlnet_conditioning_scale=1.0)


def flux_components():
    """diffusers' FLUX fast-test components (a one-level VAE of one latent channel, CLIP and T5 of width 32), with
    two blocks of each stream."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                        latent_channels=1, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
                        shift_factor=0.0609, scaling_factor=1.5035).eval()
    t5 = t5_parts()
    return dict(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(),
                text_encoder=clip_text_encoder(), tokenizer=_char_tokenizer(),
                text_encoder_2=t5["text_encoder"], tokenizer_2=t5["tokenizer"])


#: A 16 x 24 token grid (the one-level VAE keeps the pixel size; FLUX packs 2 x 2).
FLUX_CALL = dict(prompt="a painting of a squirrel", height=32, width=48, guidance_scale=5.0, max_sequence_length=16)


def flux():
    from diffusers import FluxPipeline

    return FluxPipeline(**flux_components()), dict(FLUX_CALL)


def flux_controlnet():
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    torch.manual_seed(0)
    controlnet = FluxControlNetModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    control = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(4))
    return FluxControlNetPipeline(**flux_components(), controlnet=controlnet), dict(
        FLUX_CALL, control_image=control, controlnet_conditioning_scale=1.0)


def wan_transformer(**overrides):
    """diffusers' Wan fast-test transformer (16 latent channels, text of width 32), two blocks."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32), **overrides}).eval()


def wan_components(**pipeline):
    """diffusers' Wan fast-test components: the causal video VAE (3 base channels, 8x in space, 4x in time), the
    flow-matching scheduler, T5 of width 32."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    return dict(transformer=wan_transformer(), vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                **t5_parts(), **pipeline)


#: 9 frames of 64 x 64: 3 latent frames of a 4 x 4 token grid; CFG as two calls per step.
WAN_CALL = dict(prompt="a painting of a squirrel", negative_prompt="a cat", height=64, width=64, num_frames=9,
                guidance_scale=5.0, max_sequence_length=16)


def wan():
    from diffusers import WanPipeline

    return WanPipeline(**wan_components()), dict(WAN_CALL)


def wan22():
    """Wan 2.2 A14B's layout: a second expert for the low-noise steps (t < 900: the last two of four)."""
    from diffusers import WanPipeline

    torch.manual_seed(1)
    return WanPipeline(**wan_components(transformer_2=wan_transformer(), boundary_ratio=0.9)), dict(WAN_CALL)


def zero123pp():
    from .models.test_zero123pp_pipeline import HEIGHT, VIEW_PX, WIDTH, build_pipeline

    return build_pipeline(), dict(image=image(VIEW_PX), height=HEIGHT, width=WIDTH, guidance_scale=4.0)


@dataclass(frozen=True)
class Case:
    build: Callable[[], tuple]
    #: Whether the pipeline batches classifier-free guidance (it has a guidance-off path to test).
    guides: bool = True
    #: The oldest diffusers (major, minor) whose version of the pipeline tokenmerge supports.
    needs: tuple[int, int] = (0, 0)


PIPELINES = {
    "sd": Case(sd_text2img), "sd-img2img": Case(sd_img2img), "sd-inpaint": Case(sd_inpaint),
    "sd-controlnet": Case(sd_controlnet), "sd-pag": Case(sd_pag), "instruct-pix2pix": Case(instruct_pix2pix),
    "sdxl": Case(sdxl), "lcm": Case(lcm, guides=False), "animatediff": Case(animatediff), "pixart": Case(pixart),
    "dit": Case(dit), "zero123pp": Case(zero123pp), "sd3": Case(sd3), "sd3-controlnet": Case(sd3_controlnet),
    "flux": Case(flux, guides=False, needs=(0, 35)), "flux-controlnet": Case(flux_controlnet, guides=False, needs=(0, 35)),
    "wan": Case(wan, needs=(0, 35)), "wan2.2": Case(wan22, needs=(0, 35)),
}


class Built:
    """A pipeline, its call, and its unpatched output (computed once)."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.pipe, self.call = case.build()
        self.pipe.set_progress_bar_config(disable=True)
        self.unpatched = self.run()

    def run(self, **overrides) -> torch.Tensor:
        call = {"num_inference_steps": STEPS, "output_type": "pt", **self.call, **overrides}
        torch.manual_seed(0)  # what draws from the global generator (Zero123++'s reference noise, the VAE's sample)
        out = self.pipe(**call, generator=torch.Generator().manual_seed(0))
        return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)

    @property
    def denoiser(self) -> torch.nn.Module:
        unet = getattr(self.pipe, "unet", None)
        return unet if unet is not None else self.pipe.transformer


@pytest.fixture(params=list(PIPELINES), scope="module")
def built(request) -> Built:
    """Built once per pipeline: pytest groups the tests by it, so one pipeline is alive at a time."""
    case = PIPELINES[request.param]
    if DIFFUSERS < case.needs:
        pytest.skip(f"{request.param} needs diffusers >= {'.'.join(map(str, case.needs))} ({diffusers.__version__})")
    return Built(case)


@pytest.mark.parametrize("method", list(METHODS))
def test_ratio_zero_is_bit_identical(built, method):
    with tokenmerge.patched(built.pipe, METHODS[method](ratio=0.0, seed=0)):
        assert torch.equal(built.run(), built.unpatched)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_merges_and_remove_restores(built, method):
    events = []
    with tokenmerge.patched(built.pipe, METHODS[method](ratio=0.5, seed=0, min_tokens=0), on_plan=events.append):
        merged = built.run()
    plans = [e.plan for e in events if e.plan is not None]
    assert plans, "no block was merged"
    assert all(plan.kept.shape[1] < plan.assign.shape[1] for plan in plans), "a plan kept every token"
    assert torch.isfinite(merged).all() and not torch.allclose(merged, built.unpatched, atol=1e-5)
    assert torch.equal(built.run(), built.unpatched) and no_hooks_left(built.denoiser)
    assert tokenmerge.current_config(built.pipe) is None


def test_guidance_off_refuses_cfg_importance_and_other_methods_merge(built):
    if not built.case.guides:
        with pytest.raises(ValueError, match="guidance"):
            with tokenmerge.patched(built.pipe, ImportanceMerge(ratio=0.5, importance="cfg", seed=0)):
                built.run()
        return
    off = built.run(guidance_scale=1.0)
    with pytest.raises(ValueError, match="guidance"):
        with tokenmerge.patched(built.pipe, ImportanceMerge(ratio=0.5, importance="cfg", seed=0)):
            built.run(guidance_scale=1.0)
    events = []
    with tokenmerge.patched(built.pipe, ToMe(ratio=0.5, min_tokens=0), on_plan=events.append):
        merged = built.run(guidance_scale=1.0)
    assert events and not torch.allclose(merged, off, atol=1e-5)
    assert torch.equal(built.run(guidance_scale=1.0), off)
