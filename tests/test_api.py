"""apply / remove / patched on bare U-Nets: identity cases, errors, isolation, processors, dtypes."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe

from .conftest import add_lora, run, unet_inputs

CONFIGS = [ToMe(ratio=0.5, seed=0), ImportanceMerge(ratio=0.7, seed=0)]


@pytest.mark.parametrize("config", [ToMe(ratio=0.0), ImportanceMerge(ratio=0.0)])
def test_ratio_zero_is_bit_identical(any_unet, config):
    args, kwargs = unet_inputs(any_unet, 2)
    timesteps = (950, 500)  # a pruning step, then a merging step
    unpatched = [run(any_unet, args, kwargs, timestep=t) for t in timesteps]
    with tokenmerge.patched(any_unet, config):
        for t, expected in zip(timesteps, unpatched):
            assert torch.equal(run(any_unet, args, kwargs, timestep=t), expected)


@pytest.mark.parametrize("config", CONFIGS, ids=["tome", "importance"])
def test_remove_restores_bit_identical_outputs(any_unet, config):
    args, kwargs = unet_inputs(any_unet, 2)
    unpatched = run(any_unet, args, kwargs)
    tokenmerge.apply(any_unet, config)
    merged = [run(any_unet, args, kwargs, timestep=t) for t in (950, 700, 400)]
    tokenmerge.remove(any_unet)
    assert all(not torch.allclose(m, unpatched, atol=1e-4) for m in merged), "the patch must change outputs"
    assert torch.equal(run(any_unet, args, kwargs), unpatched)
    assert not hasattr(any_unet, "_tokenmerge")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in any_unet.modules())


def test_apply_twice_replaces_the_earlier_patch(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    tokenmerge.apply(sd1_unet, ToMe(ratio=0.5, seed=0))
    handles = len(sd1_unet._tokenmerge.handles)
    tokenmerge.apply(sd1_unet, ToMe(ratio=0.3, seed=0))
    twice = run(sd1_unet, args, kwargs)
    assert len(sd1_unet._tokenmerge.handles) == handles
    tokenmerge.remove(sd1_unet)
    tokenmerge.apply(sd1_unet, ToMe(ratio=0.3, seed=0))
    assert torch.equal(run(sd1_unet, args, kwargs), twice)
    tokenmerge.remove(sd1_unet)


def test_patched_restores_the_previous_patch(sd1_unet):
    tokenmerge.apply(sd1_unet, ToMe(ratio=0.5))
    with tokenmerge.patched(sd1_unet, ImportanceMerge(ratio=0.6)) as model:
        assert model is sd1_unet
        assert tokenmerge.current_config(sd1_unet) == ImportanceMerge(ratio=0.6)
    assert tokenmerge.current_config(sd1_unet) == ToMe(ratio=0.5)
    tokenmerge.remove(sd1_unet)
    with tokenmerge.patched(sd1_unet, ToMe()):
        pass
    assert tokenmerge.current_config(sd1_unet) is None


def test_model_without_patchable_blocks_raises():
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=16, cross_attention_dim=32,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None,
    )
    with pytest.raises(ValueError, match="would patch nothing.*no transformer block.*no attention layers.*not supported"):
        tokenmerge.apply(unet, ToMe())


def test_a_unet_whose_attention_is_not_in_transformer_blocks_is_called_unsupported_not_too_narrow():
    """Kandinsky 2.2's U-Net (built as diffusers' fast tests build it) keeps its attention in SimpleCrossAttn blocks:
    widening the placement cannot help, and the error says so instead of suggesting it."""
    kandinsky = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="image", block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", encoder_hid_dim=32, encoder_hid_dim_type="image_proj",
        cross_attention_dim=100, attention_head_dim=4, resnet_time_scale_shift="scale_shift", class_embed_type=None,
    )
    for config in (ToMe(), ToMe(max_downsample=8), ImportanceMerge(max_downsample=8, merge_mlp=True)):
        with pytest.raises(ValueError) as raised:
            tokenmerge.apply(kandinsky, config)
        message = str(raised.value)
        assert "SimpleCrossAttnDownBlock2D" in message and "UNetMidBlock2DSimpleCrossAttn" in message
        assert "not supported" in message and "Widen" not in message and "max_downsample" not in message
        assert tokenmerge.current_config(kandinsky) is None


def test_unsupported_models_and_configs_raise(sd1_unet):
    with pytest.raises(ValueError, match="does not support Linear"):
        tokenmerge.apply(torch.nn.Linear(2, 2), ToMe())
    with pytest.raises(ValueError, match="method config"):
        tokenmerge.apply(sd1_unet, {"ratio": 0.5})
    with pytest.raises(ValueError, match="pipeline or its denoiser"):
        tokenmerge.apply(object(), ToMe())


def test_merging_only_deeper_levels_than_exist_still_patches_the_top(sd1_unet):
    # max_downsample=8 covers every attention level: all 4 + 6 blocks of the tiny SD1 U-Net are hooked.
    tokenmerge.apply(sd1_unet, ToMe(max_downsample=8))
    hooked = [m for m in sd1_unet.modules() if type(m).__name__ == "BasicTransformerBlock" and m._forward_pre_hooks]
    tokenmerge.remove(sd1_unet)
    assert len(hooked) == sum(type(m).__name__ == "BasicTransformerBlock" for m in sd1_unet.modules())


class CountingProcessor(AttnProcessor2_0):
    """A custom processor that records how many query tokens it sees."""

    def __init__(self):
        super().__init__()
        self.tokens = []

    def __call__(self, attn, hidden_states, *args, **kwargs):
        self.tokens.append(hidden_states.shape[1])
        return super().__call__(attn, hidden_states, *args, **kwargs)


@pytest.mark.parametrize("config", CONFIGS, ids=["tome", "importance"])
def test_works_with_any_attention_processor(sd1_unet, config):
    args, kwargs = unet_inputs(sd1_unet, 2)
    outputs = []
    for processor in (AttnProcessor(), AttnProcessor2_0()):
        sd1_unet.set_attn_processor(processor)
        with tokenmerge.patched(sd1_unet, config):
            outputs.append(run(sd1_unet, args, kwargs))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)

    counting = CountingProcessor()
    top = sd1_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    top.set_processor(counting)
    with tokenmerge.patched(sd1_unet, config):
        run(sd1_unet, args, kwargs)
    sd1_unet.set_attn_processor(AttnProcessor2_0())
    assert counting.tokens == [256 - int(256 * config.ratio)]


def test_works_with_peft_lora(sd1_unet):
    add_lora(sd1_unet)
    args, kwargs = unet_inputs(sd1_unet, 2)
    lora = run(sd1_unet, args, kwargs)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.0)):
        assert torch.equal(run(sd1_unet, args, kwargs), lora)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, seed=0)):
        merged = run(sd1_unet, args, kwargs)
    assert torch.isfinite(merged).all() and not torch.allclose(merged, lora, atol=1e-4)
    assert torch.equal(run(sd1_unet, args, kwargs), lora)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", CONFIGS, ids=["tome", "importance"])
def test_half_precision(sd1_unet, dtype, config):
    unet = sd1_unet.to(dtype)
    args, kwargs = unet_inputs(unet, 2, dtype=dtype)
    try:
        unpatched = run(unet, args, kwargs)
    except RuntimeError as err:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"{dtype} convolutions unsupported on this CPU: {err}")
    with tokenmerge.patched(unet, config):
        merged = run(unet, args, kwargs)
    assert merged.dtype == dtype and torch.isfinite(merged).all()
    assert (merged.float() - unpatched.float()).abs().mean() < 0.2
    assert torch.equal(run(unet, args, kwargs), unpatched)


@pytest.mark.parametrize("batch", [1, 3, 4])
@pytest.mark.parametrize("size", [(16, 16), (15, 17), (9, 13), (7, 7)])
def test_batch_sizes_and_odd_resolutions(any_unet, batch, size):
    args, kwargs = unet_inputs(any_unet, batch, *size)
    unpatched = run(any_unet, args, kwargs)
    user_map = torch.rand(*size)  # odd batches carry no CFG pair: importance from a user map
    for config in (ToMe(ratio=0.6, max_downsample=4, seed=0),
                   ImportanceMerge(ratio=0.7, importance=user_map, prune_steps=0.0, max_downsample=2, seed=0)):
        with tokenmerge.patched(any_unet, config):
            out = run(any_unet, args, kwargs)
        assert out.shape == unpatched.shape and torch.isfinite(out).all()
    assert torch.equal(run(any_unet, args, kwargs), unpatched)
