"""ToMe against the reference implementation, the tomesd package (0.1.3)."""

from __future__ import annotations

import logging

import pytest
import tomesd
import torch

import tokenmerge
from tokenmerge import ToMe

from .conftest import run, unet_inputs


def tomesd_output(unet, args, kwargs, **settings):
    tomesd.apply_patch(unet, **settings)
    try:
        return run(unet, args, kwargs)
    finally:
        tomesd.remove_patch(unet)


def ours_output(unet, args, kwargs, config):
    with tokenmerge.patched(unet, config):
        return run(unet, args, kwargs)


@pytest.mark.parametrize(
    "settings",
    [
        dict(ratio=0.5),
        dict(ratio=0.3, max_downsample=2),
        dict(ratio=0.75, merge_crossattn=True, merge_mlp=True),
        dict(ratio=0.6, sx=4, sy=2, max_downsample=4),
        dict(ratio=0.4, merge_attn=False, merge_mlp=True),
    ],
)
@pytest.mark.parametrize("batch,size", [(2, (16, 16)), (1, (15, 17)), (3, (12, 20)), (4, (10, 14))])
def test_matches_tomesd_without_randomness(sd1_unet, settings, batch, size):
    # tomesd merges every block however small; our automatic floor (CPU: 64 tokens) skips the 35- and 60-token
    # level-1 blocks of the 10x14 and 12x20 latents, so parity is with min_tokens=0.
    args, kwargs = unet_inputs(sd1_unet, batch, *size)
    expected = tomesd_output(sd1_unet, args, kwargs, use_rand=False, **settings)
    actual = ours_output(sd1_unet, args, kwargs, ToMe(use_rand=False, min_tokens=0, **settings))
    assert not torch.equal(expected, run(sd1_unet, args, kwargs)), "the setting must actually merge"
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_matches_tomesd_random_cells_from_the_same_rng_state(sd1_unet):
    # tomesd forks the global RNG at first use; with seed=None we fork it at the start of the run.
    args, kwargs = unet_inputs(sd1_unet, 2, 16, 16)
    torch.manual_seed(123)
    expected = tomesd_output(sd1_unet, args, kwargs, ratio=0.5, max_downsample=2)
    torch.manual_seed(123)
    actual = ours_output(sd1_unet, args, kwargs, ToMe(ratio=0.5, max_downsample=2))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    # seed=123 seeds the private generator exactly like torch.manual_seed(123) seeds the global one.
    seeded = ours_output(sd1_unet, args, kwargs, ToMe(ratio=0.5, max_downsample=2, seed=123))
    torch.testing.assert_close(seeded, expected, atol=1e-5, rtol=0)


def test_odd_latent_sizes_where_tomesd_infers_the_wrong_grid(sd1_unet):
    """tomesd guesses a level's grid from the token count; at 9x13, level 2 it guesses 3x5 for a 3x4 grid
    and crashes. We derive the grid from the level, so merging works there too."""
    args, kwargs = unet_inputs(sd1_unet, 2, 9, 13)
    with pytest.raises(RuntimeError):
        tomesd_output(sd1_unet, args, kwargs, ratio=0.5, max_downsample=4)
    out = ours_output(sd1_unet, args, kwargs, ToMe(ratio=0.5, max_downsample=4))
    assert out.shape == args[0].shape and torch.isfinite(out).all()


def test_random_cells_do_not_consume_global_rng(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    before = torch.get_rng_state()
    ours_output(sd1_unet, args, kwargs, ToMe(ratio=0.5))
    assert torch.equal(before, torch.get_rng_state())


def test_seed_changes_random_cells(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    a = ours_output(sd1_unet, args, kwargs, ToMe(seed=1))
    b = ours_output(sd1_unet, args, kwargs, ToMe(seed=1))
    c = ours_output(sd1_unet, args, kwargs, ToMe(seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sdxl_merges_where_tomesd_patches_nothing(sdxl_unet):
    """SDXL has no attention at its top level: tomesd's default is a silent no-op, ours merges level 1."""
    args, kwargs = unet_inputs(sdxl_unet, 2)
    unpatched = run(sdxl_unet, args, kwargs)
    assert torch.equal(tomesd_output(sdxl_unet, args, kwargs, ratio=0.5), unpatched)
    assert not torch.allclose(ours_output(sdxl_unet, args, kwargs, ToMe(ratio=0.5)), unpatched, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(ratio=0.8), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio=0.95, sx=4, sy=4), "ratio"),
        (dict(ratio=float("nan")), "ratio"),
        (dict(sx=0), "sx"),
        (dict(sx=1, sy=1), "sx * sy"),
        (dict(max_downsample=3), "max_downsample"),
        (dict(merge_attn=False), "merge_attn"),
        (dict(seed="x"), "seed"),
        (dict(min_tokens=-1), "min_tokens"),
        (dict(min_tokens=True), "min_tokens"),
        (dict(min_tokens=64.0), "min_tokens"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace("*", r"\*")):
        ToMe(**kwargs)


def test_max_ratio_follows_stride():
    """tomesd clamps a ratio above 1 - 1/(sx*sy) silently; we accept up to it and raise beyond."""
    assert ToMe(ratio=0.875, sx=4, sy=2).max_ratio() == 0.875
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 0.875\]"):
        ToMe(ratio=0.876, sx=4, sy=2)


def test_blocks_below_min_tokens_are_skipped_and_reported(sd1_unet):
    """10x14 latent: level 0 has 140 tokens, level 1 has 5x7 = 35, below the default floor of 64."""
    args, kwargs = unet_inputs(sd1_unet, 2, 10, 14)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, use_rand=False, max_downsample=2)) as model:
        floored = run(model, args, kwargs)
        skipped = tokenmerge.skipped_blocks(model)
    assert skipped and set(skipped.values()) == {35}
    assert all(".1." in name for name in skipped), "only level-1 blocks are skipped"
    # Skipping level 1 is exactly merging level 0 alone; min_tokens=0 merges level 1 too.
    level0 = ours_output(sd1_unet, args, kwargs, ToMe(ratio=0.5, use_rand=False, max_downsample=1, min_tokens=0))
    torch.testing.assert_close(floored, level0, atol=0, rtol=0)
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, use_rand=False, max_downsample=2, min_tokens=0)) as model:
        assert not torch.allclose(run(model, args, kwargs), floored, atol=1e-5)
        assert tokenmerge.skipped_blocks(model) == {}


def test_the_automatic_floor_counts_tokens_on_cpu_and_work_on_cuda():
    """min_tokens=None: fewer than 64 tokens on CPU; on CUDA batch x tokens below 65536 and a self-attention below
    1 TFLOP (4 B N^2 C). An int: tokens anywhere."""
    auto = ToMe()
    assert auto.min_tokens is None
    assert not auto.merges(1000, 63, 320, "cpu") and auto.merges(1, 64, 320, "cpu")
    # The H100 measurements the CUDA floor comes from (CFG batch 2): SD 1.5 at 512 / 1024 px skipped, SDXL at
    # 2048 px merged at its 128x128 level (640 channels) but not its 64x64 one (1280 channels), SD 1.5 2048 merged.
    assert not auto.merges(2, 64 * 64, 320, "cuda") and not auto.merges(2, 128 * 128, 320, "cuda")
    assert auto.merges(2, 128 * 128, 640, "cuda") and not auto.merges(2, 64 * 64, 1280, "cuda")
    assert auto.merges(2, 256 * 256, 320, "cuda") and auto.merges(500, 1024, 320, "cuda")
    assert auto.merges(1100, 63, 320, "cuda")  # 69300: on CUDA the work counts, not the tokens
    for device in ("cpu", "cuda"):
        assert ToMe(min_tokens=0).merges(1, 1, 320, device)
        assert not ToMe(min_tokens=64).merges(1000, 63, 320, device) and ToMe(min_tokens=64).merges(1, 64, 320, device)
    assert auto.floor("cuda") == "the automatic floor (cuda: batch x tokens < 65536 and self-attention < 1 TFLOP)"
    assert auto.floor("cpu") == "the automatic floor (cpu: 64 tokens)"
    assert ToMe(min_tokens=16).floor("cuda") == "min_tokens=16"


def test_a_latent_too_small_to_pay_is_computed_unmerged(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2, 6, 6)  # 36 tokens at the top level
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5)) as model:
        out = run(model, args, kwargs)
        assert len(tokenmerge.skipped_blocks(model)) == len(tokenmerge.models.adapter_for(sd1_unet).targets(ToMe()))
    assert torch.equal(out, run(sd1_unet, args, kwargs))


def test_a_skipped_block_is_said_once_per_patch(sd1_unet, caplog):
    """The floor is not silent: the first skipped block is logged with the floor and the way around it."""
    small = unet_inputs(sd1_unet, 2, 6, 6)  # 36 tokens: below the CPU floor
    large = unet_inputs(sd1_unet, 2, 16, 16)  # 256 tokens: merged
    with caplog.at_level(logging.WARNING, logger="tokenmerge"):
        with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5)) as model:
            run(model, *large)
            assert caplog.records == []
            run(model, *small)
            run(model, *small)
        [record] = caplog.records
        assert "(batch 2 x 36 tokens x 32 channels) is below the automatic floor (cpu: 64 tokens)" in record.message
        assert "min_tokens=0 merges every block" in record.message
        with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5)) as model:  # a new patch says it again
            run(model, *small)
        assert len(caplog.records) == 2
