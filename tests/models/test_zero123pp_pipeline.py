"""The real Zero123++ community pipeline (``tests/fixtures/zero123plus_pipeline.py``, vendored unchanged), built
from tiny components as diffusers' fast tests build pipelines: patched before its first call (when its U-Net is
still plain) and after (when ``pipe.unet`` is its ``RefOnlyNoisedUNet``), removed and applied again.

The wrapper draws the reference image's noise with ``torch.randn_like`` from the global generator inside every
denoiser call, so these tests also hold tokenmerge to drawing nothing from the user's stream and lending it none
of its own where other code draws.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.models import tiny_configs
from tokenmerge.tools.tiny import _char_tokenizer, _text_encoder, build_denoiser

VIEW_PX = 16  # one view's side in pixels: an 8 x 8 latent (the VAE halves)
HEIGHT, WIDTH = 3 * VIEW_PX, 2 * VIEW_PX  # six views tiled 3 x 2, as Zero123++'s 960 x 640
STEPS = 3


def _import_community_pipeline():
    """The vendored module. Its depth-ControlNet path imports ``torchvision.transforms`` at class level; where
    torchvision is not installed, an inert stand-in is importable only for the import (nothing here uses it)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        # What the module imports from diffusers and transformers, resolved first: their lazy imports probe for
        # torchvision with find_spec, which a stand-in in sys.modules would break.
        import transformers
        from diffusers import (AutoencoderKL, ControlNetModel, DDPMScheduler, DiffusionPipeline,  # noqa: F401
                               EulerAncestralDiscreteScheduler, ImagePipelineOutput, StableDiffusionPipeline,
                               UNet2DConditionModel)
        from diffusers.image_processor import VaeImageProcessor  # noqa: F401
        from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: F401
        from diffusers.schedulers import KarrasDiffusionSchedulers  # noqa: F401

        for name in ("CLIPImageProcessor", "CLIPTextModel", "CLIPTokenizer", "CLIPVisionModelWithProjection"):
            getattr(transformers, name)

        def unavailable(*args, **kwargs):
            raise RuntimeError("torchvision is not installed (the depth ControlNet path needs it)")

        transforms = types.ModuleType("torchvision.transforms")
        transforms.ToTensor = transforms.Normalize = lambda *args, **kwargs: None  # built at class definition
        transforms.Compose = lambda steps: unavailable  # used only on a depth image
        stand_in = types.ModuleType("torchvision")
        stand_in.transforms = transforms
        sys.modules.update({"torchvision": stand_in, "torchvision.transforms": transforms})
        try:
            from tests.fixtures import zero123plus_pipeline
        finally:  # other libraries probe for torchvision with find_spec: leave nothing behind
            del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
        return zero123plus_pipeline
    from tests.fixtures import zero123plus_pipeline
    return zero123plus_pipeline


community = _import_community_pipeline()


def build_pipeline():
    """``Zero123PlusPipeline`` from tiny components: the SD 2 layout U-Net of the family's tiny config, a 2x VAE,
    CLIP text and vision encoders of width 32 (the vision embedding is added to the text states with the ramp)."""
    from diffusers import AutoencoderKL, EulerAncestralDiscreteScheduler
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = {k: v for k, v in tiny_configs()["zero123pp"].items() if k != "_wrapper"}
    unet = build_denoiser(config, seed=0)
    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(16, 16), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, image_size=32,
        patch_size=8, projection_dim=32)).eval()
    scheduler = EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                timestep_spacing="trailing")
    return community.Zero123PlusPipeline(
        vae=vae, text_encoder=_text_encoder(), tokenizer=_char_tokenizer(), unet=unet, scheduler=scheduler,
        vision_encoder=vision,
        feature_extractor_clip=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        feature_extractor_vae=CLIPImageProcessor(size={"shortest_edge": VIEW_PX},
                                                 crop_size={"height": VIEW_PX, "width": VIEW_PX},
                                                 image_mean=[0.5] * 3, image_std=[0.5] * 3),
        ramping_coefficients=[i / 76 for i in range(77)],
    )


@pytest.fixture(scope="module")
def condition_image():
    from PIL import Image

    pixels = torch.Generator().manual_seed(5)
    return Image.fromarray((torch.rand(VIEW_PX, VIEW_PX, 3, generator=pixels) * 255).byte().numpy())


def generate(pipe, image) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents of one generation, and the global RNG state after it (the wrapper's noise comes from there)."""
    torch.manual_seed(0)
    latents = pipe(image, num_inference_steps=STEPS, height=HEIGHT, width=WIDTH, guidance_scale=4.0,
                   output_type="latent", generator=torch.Generator().manual_seed(0)).images
    return latents, torch.get_rng_state()


@pytest.fixture
def pipe():
    return build_pipeline()


@pytest.fixture(scope="module")
def unpatched(condition_image):
    return generate(build_pipeline(), condition_image)


def same(got, expected) -> bool:
    return torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_applied_before_the_first_call_patches_the_wrapper_with_the_family_preset(pipe, condition_image, unpatched):
    tokenmerge.apply(pipe, ImportanceMerge(ratio=0.0))
    assert isinstance(pipe.unet, community.RefOnlyNoisedUNet), "the pipeline is prepared as its call would"
    config = tokenmerge.current_config(pipe)
    assert (config.pool, config.max_downsample, config.proportional_attention) == (0.6, 2, False)
    assert same(generate(pipe, condition_image), unpatched), "ratio 0: the same latents and the same user RNG"


class ShapeRecorder(torch.nn.Module):
    """Wraps the community ``ReferenceOnlyAttnProc`` (a module) of one self-attention: records ``(mode, queries,
    keys)``."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped, self.calls = wrapped, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, mode="w",
                 ref_dict=None, is_cfg_guidance=False):
        queries = hidden_states.shape[1]
        self.calls.append((mode, queries, queries + (ref_dict[self.wrapped.name].shape[1] if mode == "r" else 0)))
        return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, mode, ref_dict,
                            is_cfg_guidance)


def test_views_are_merged_once_per_step_and_the_reference_pass_is_left_whole(pipe, condition_image, unpatched):
    events = []
    tokenmerge.apply(pipe, ImportanceMerge(ratio=0.5, seed=0), on_plan=events.append)
    assert "_tokenmerge" in pipe.unet.__dict__ and "_tokenmerge" not in pipe.unet.unet.__dict__
    attn1 = pipe.unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    recorder = ShapeRecorder(attn1.processor)
    attn1.processor = recorder

    merged = generate(pipe, condition_image)
    views, reference = (HEIGHT // 2) * (WIDTH // 2), (VIEW_PX // 2) ** 2
    kept = views - int(views * 0.5)
    # Each step: the reference pass whole (it stores its own tokens), then the merged views, which attend to
    # themselves and the whole reference.
    assert recorder.calls == [("w", reference, reference), ("r", kept, kept + reference)] * STEPS
    blocks = {e.block for e in events}
    assert sorted(e.step for e in events) == sorted(list(range(STEPS)) * len(blocks)), "one plan per block and step"
    assert not torch.equal(merged[0], unpatched[0]) and torch.isfinite(merged[0]).all()
    assert torch.equal(merged[1], unpatched[1]), "the wrapper's noise and the sampler drew from the user's stream"


def test_remove_restores_and_a_second_apply_works(pipe, condition_image, unpatched):
    tokenmerge.apply(pipe, ToMe(ratio=0.5))
    first = generate(pipe, condition_image)
    tokenmerge.remove(pipe)
    assert same(generate(pipe, condition_image), unpatched) and tokenmerge.current_config(pipe) is None
    tokenmerge.apply(pipe, ToMe(ratio=0.5))
    assert same(generate(pipe, condition_image), first), "applied again after the wrapper exists: the same patch"
    tokenmerge.remove(pipe)
    assert same(generate(pipe, condition_image), unpatched)


@pytest.mark.parametrize("config", [ImportanceMerge(ratio=0.0, seed=0), ToMe(ratio=0.0)], ids=["importance", "tome"])
def test_applied_after_the_first_call_ratio_zero_is_bit_identical(pipe, condition_image, unpatched, config):
    """The plans draw random numbers (ImportanceMerge's destinations, ToMe's cells) while the wrapper draws its
    reference noise: the wrapper must see the user's stream, exactly as unpatched."""
    assert same(generate(pipe, condition_image), unpatched) and config.uses_rng
    tokenmerge.apply(pipe, config)
    assert same(generate(pipe, condition_image), unpatched)


def test_a_unet_patched_alone_then_wrapped_by_the_pipeline_raises_naming_the_fix(pipe, condition_image):
    tokenmerge.apply(pipe.unet, ToMe(ratio=0.5))  # the plain U-Net, before the pipeline wraps it in its call
    with pytest.raises(ValueError, match="reference-attention wrapper.*tokenmerge.apply\\(pipe, config\\)"):
        generate(pipe, condition_image)
    tokenmerge.remove(pipe)  # found beneath the wrapper now in pipe.unet
    assert not hasattr(pipe.unet.unet, "_tokenmerge")
    tokenmerge.apply(pipe, dataclasses.replace(ToMe(ratio=0.5)))
    assert tokenmerge.current_config(pipe).max_downsample == 2, "the family preset survives replace"
    assert torch.isfinite(generate(pipe, condition_image)[0]).all()


def test_the_depth_controlnet_wrapper_of_the_wrapper_is_patched_the_same_way(pipe):
    """``add_controlnet`` wraps the wrapper (``DepthControlUNet``): its ControlNet runs whole on the views, its
    residuals join the merged U-Net's full-length outputs. Called directly: the pipeline's depth-image path needs
    torchvision."""
    pipe.add_controlnet()
    denoiser = pipe.unet
    assert isinstance(denoiser, community.DepthControlUNet)
    gen = torch.Generator().manual_seed(2)
    views = torch.randn(1, 4, HEIGHT // 2, WIDTH // 2, generator=gen).repeat(2, 1, 1, 1)  # CFG: the latent twice
    text = torch.randn(2, 77, 32, generator=gen)
    options = {"cond_lat": torch.randn(2, 4, VIEW_PX // 2, VIEW_PX // 2, generator=gen),
               "control_depth": torch.rand(2, 3, HEIGHT * 4, WIDTH * 4, generator=gen)}

    def call():
        torch.manual_seed(0)  # the wrapper's reference noise
        with torch.no_grad():
            return denoiser(views, torch.tensor(500), text, cross_attention_kwargs=options).sample

    unpatched = call()
    with tokenmerge.patched(pipe, ToMe(ratio=0.0)):
        assert tokenmerge.current_config(pipe).max_downsample == 2
        assert torch.equal(call(), unpatched)
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5, seed=0)):
        merged = call()
    assert torch.isfinite(merged).all() and not torch.allclose(merged, unpatched, atol=1e-5)
    assert torch.equal(call(), unpatched)
