"""SD3 / SD3.5 (``SD3Transformer2DModel``): image tokens merged inside the joint attention, the text never;
SD3.5's dual attention; the middle-half placement; CFG pairs sharing plans."""

from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.tools.tiny import tiny_denoiser

from .helpers import Shuffle
from .kit import FamilyConformance

LATENT = 16  # an 8 x 8 patch grid (patch size 2)
TEXT = 7


def call(model, t=500, seed=0):
    """A CFG batch as StableDiffusion3Pipeline makes it: the latent twice, [uncond; cond] text, a timestep each."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, LATENT, LATENT, generator=gen).repeat(2, 1, 1, 1)
    text = torch.randn(2, TEXT, 32, generator=gen)
    pooled = torch.randn(2, 64, generator=gen)
    with torch.no_grad():
        return model(x, encoder_hidden_states=text, pooled_projections=pooled,
                     timestep=torch.full((2,), float(t))).sample


#: SD3.5's dual attention and q/k norms arrived in diffusers 0.31; older versions build an SD3 from its config.
HAS_SD35 = tuple(int(part) for part in diffusers.__version__.split(".")[:2]) >= (0, 31)
needs_sd35 = pytest.mark.skipif(not HAS_SD35, reason=f"SD3.5 needs diffusers >= 0.31 ({diffusers.__version__})")


def sd3():
    return tiny_denoiser("sd3")


def sd35():
    return tiny_denoiser("sd35")


class TestSD3(FamilyConformance):
    build = staticmethod(sd3)
    call = staticmethod(call)
    takes_attention_modes = False  # the joint attention takes no mask and computes its image keys itself


@needs_sd35
class TestSD35(FamilyConformance):
    build = staticmethod(sd35)
    call = staticmethod(call)
    takes_attention_modes = False


class Recorder:
    """Wraps a joint attention's processor: records the image and text lengths it is called with and returns."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        image, text = out if isinstance(out, tuple) else (out, None)
        self.calls.append((hidden_states.shape[1], None if encoder_hidden_states is None else
                           encoder_hidden_states.shape[1], image.shape[1], None if text is None else text.shape[1]))
        return out


@pytest.mark.parametrize("build", [sd3, pytest.param(sd35, marks=needs_sd35)], ids=["sd3", "sd3.5"])
def test_only_image_tokens_are_merged_in_the_placed_blocks_and_the_text_passes_whole(build):
    model = build()
    recorders = {}
    for i, block in enumerate(model.transformer_blocks):
        for name in ("attn", "attn2"):
            attention = getattr(block, name, None)
            if attention is not None:
                recorders[i, name] = Recorder(attention.processor)
                attention.set_processor(recorders[i, name])
    events = []
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0, layers=(0.25, 0.75)), on_plan=events.append):
        call(model)
    tokens = (LATENT // 2) ** 2
    kept = tokens - tokens // 2
    assert {e.block for e in events} == {"transformer_blocks.1", "transformer_blocks.2"}  # blocks 1-2 of 4
    assert {e.grid for e in events} == {(8, 8)}
    for (i, name), recorder in recorders.items():
        image = kept if i in (1, 2) else tokens
        if name == "attn":  # joint: merged image queries, the whole text, both returned at those lengths
            assert recorder.calls == [(image, TEXT, image, TEXT)], (i, name)
        else:  # SD3.5's image-only attention
            assert recorder.calls == [(image, None, image, None)], (i, name)
    assert any(name == "attn2" for _, name in recorders) == (build is sd35)


def test_cfg_pairs_share_their_plan_and_importance_comes_from_the_guidance_difference():
    model = sd3()
    events = []
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, min_tokens=0, seed=0), on_plan=events.append):
        call(model, t=900)
        call(model, t=500)
    later = [e for e in events if e.step == 1]
    assert later and all(e.importance is not None and e.importance.shape == (1, 64) for e in later)
    assert all(torch.equal(e.plan.kept[0], e.plan.kept[1]) for e in events)  # uncond and cond: one plan


def test_size_aware_keys_and_kv_only_raise_naming_the_joint_attention():
    model = sd3()
    for config in (ToMe(proportional_attention=True), ImportanceMerge(merge_queries=False)):
        with pytest.raises(ValueError, match="JointAttnProcessor2_0"):
            tokenmerge.apply(model, config)
    assert tokenmerge.current_config(model) is None
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5)):
        assert tokenmerge.current_config(model).proportional_attention is False  # the family preset


def test_the_skip_layer_guidance_call_is_left_whole_and_not_counted_as_a_step():
    """SD3.5's skip-layer guidance calls the transformer a second time in a step, on the conditional half only and
    with ``skip_layers``: it must neither advance the step clock nor break CFG importance (batch 1, no pair)."""
    from diffusers import StableDiffusion3Pipeline

    from tests.test_pipeline_conformance import SD3_CALL, sd3_components

    pipe = StableDiffusion3Pipeline(**sd3_components())
    pipe.set_progress_bar_config(disable=True)
    if "skip_guidance_layers" not in inspect.signature(pipe.__call__).parameters:
        pytest.skip(f"StableDiffusion3Pipeline has no skip-layer guidance in diffusers {diffusers.__version__}")
    calls = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("skip_layers")), with_kwargs=True)
    events = []
    call = dict(SD3_CALL, num_inference_steps=3, skip_guidance_layers=[1], skip_layer_guidance_start=0.0,
                skip_layer_guidance_stop=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))
    with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5, min_tokens=0, seed=0), on_plan=events.append):
        merged = pipe(**call).images
    hook.remove()
    assert calls == [None, None, [1], None, [1]]  # steps 1 and 2 make the layer-skipping call
    blocks = {e.block for e in events}
    assert sorted(e.step for e in events) == sorted(list(range(3)) * len(blocks)), "one plan per block and step"
    assert all(e.importance is not None for e in events if e.step > 0)
    assert torch.isfinite(merged).all()


def test_crossattn_importance_is_the_last_joint_attention_share_of_the_text():
    """Against the joint softmax over [image; text] keys computed here from the block's own projections."""
    from tokenmerge.signals import joint_text_map

    model = sd3()
    attn = model.transformer_blocks[-1].attn
    torch.manual_seed(0)
    image, context = torch.randn(2, 64, 32), torch.randn(2, TEXT, 32)
    with torch.no_grad():
        got = joint_text_map(attn, image, context, None)
        q = attn.to_q(image).unflatten(-1, (attn.heads, -1))
        k = torch.cat([attn.to_k(image), attn.add_k_proj(context)], dim=1).unflatten(-1, (attn.heads, -1))
        probs = (torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    torch.testing.assert_close(got, probs[..., 64:].sum(-1).mean(1), atol=1e-5, rtol=1e-5)
    events = []
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, importance="crossattn", min_tokens=0, seed=0),
                            on_plan=events.append):
        call(model, t=900)
        call(model, t=800)
    assert all(e.importance is None for e in events if e.step == 0)
    assert all(e.importance is not None and e.importance.shape == (1, 64) for e in events if e.step == 1)


@pytest.mark.skipif(not hasattr(diffusers.models.attention_processor, "SD3IPAdapterJointAttnProcessor2_0"),
                    reason=f"SD3's IP-Adapter needs diffusers >= 0.32 ({diffusers.__version__})")
def test_the_ip_adapter_attends_merged_queries_to_merged_image_keys():
    """SD3's IP-Adapter (SD3IPAdapterJointAttnProcessor2_0) attends the image queries to the image keys and the
    adapter's tokens, inside the joint attention: merged, both are the merged tokens, so it runs in the merged space.
    A plan that only reorders the tokens leaves the output unchanged with the adapter on (its path is exercised:
    the output differs from the adapter off), and ratio 0 and remove() are bit-identical."""
    from diffusers.models.attention_processor import SD3IPAdapterJointAttnProcessor2_0

    model = sd3()
    torch.manual_seed(0)
    for block in model.transformer_blocks:
        block.attn.set_processor(SD3IPAdapterJointAttnProcessor2_0(hidden_size=32, ip_hidden_states_dim=16, head_dim=8,
                                                                   timesteps_emb_dim=32, scale=1.0))
    gen = torch.Generator().manual_seed(1)
    ip = {"ip_hidden_states": torch.randn(2, 4, 16, generator=gen), "temb": torch.randn(2, 32, generator=gen)}

    def run(ip_kwargs):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, LATENT, LATENT, generator=gen).repeat(2, 1, 1, 1)
        with torch.no_grad():
            return model(x, encoder_hidden_states=torch.randn(2, TEXT, 32, generator=gen),
                         pooled_projections=torch.randn(2, 64, generator=gen), timestep=torch.full((2,), 500.0),
                         joint_attention_kwargs=dict(ip_kwargs) if ip_kwargs else None).sample

    with_ip, without = run(ip), run(None)
    assert not torch.allclose(with_ip, without, atol=1e-4)
    with tokenmerge.patched(model, ToMe(ratio=0.0)):
        assert torch.equal(run(ip), with_ip)
    with tokenmerge.patched(model, Shuffle(ratio=0.5, min_tokens=0, layers=(0.0, 1.0))):
        torch.testing.assert_close(run(ip), with_ip, atol=1e-5, rtol=1e-5)
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, min_tokens=0, seed=0, layers=(0.0, 1.0))):
        merged = run(ip)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, with_ip, atol=1e-5)
    assert torch.equal(run(ip), with_ip)
