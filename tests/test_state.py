"""The per-patch state: the private random stream lent to the device's generator for each denoiser call."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ToMe
from tokenmerge.state import PrivateRNG

from .conftest import run, unet_inputs


def draws(rng: PrivateRNG, calls: int) -> torch.Tensor:
    out = []
    for _ in range(calls):
        rng.load(torch.device("cpu"))
        out.append(torch.rand(4))
        rng.unload()
    return torch.cat(out)


@pytest.mark.parametrize("seed", [None, 7])
def test_private_rng_is_one_stream_across_calls_and_leaves_the_global_rng_alone(seed):
    torch.manual_seed(3)
    user = torch.get_rng_state()
    expected = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator().set_state(user)
    rng = PrivateRNG(seed)
    got = draws(rng, 3)
    assert torch.equal(torch.get_rng_state(), user)  # not consumed, not replaced
    torch.testing.assert_close(got, torch.rand(12, generator=expected), rtol=0, atol=0)
    rng.restart()  # a new run: the stream starts again from the fork (or the seed)
    torch.testing.assert_close(draws(rng, 1), got[:4], rtol=0, atol=0)


def test_the_global_rng_is_given_back_when_the_call_raises(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    bad = (args[0], args[1], args[2][..., :3])  # text states of the wrong width: the U-Net raises mid-call
    before = torch.get_rng_state()
    with tokenmerge.patched(sd1_unet, ToMe(ratio=0.5, min_tokens=0)):
        with pytest.raises(RuntimeError):
            run(sd1_unet, bad, kwargs)
        assert torch.equal(torch.get_rng_state(), before)
        assert sd1_unet._tokenmerge.rng._lent is None
        run(sd1_unet, args, kwargs)  # and the next call works
    assert torch.equal(torch.get_rng_state(), before)


def test_a_device_without_a_random_state_is_refused_with_a_fix():
    """Draws on such a device could not be kept apart from the user's: the error names a config that draws nothing."""
    with pytest.raises(ValueError, match=r"'hpu'.*use_rand=False"):
        PrivateRNG(None).load(torch.device("hpu"))
