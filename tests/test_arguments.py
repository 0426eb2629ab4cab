"""Arguments read by name: a hook finds ``hidden_states`` (or ``timestep``, ``attention_mask``) wherever the call put it."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

import tokenmerge
from tokenmerge.arguments import Signature
from tokenmerge.hooks import BlockPatch
from tokenmerge.models.base import PatchTarget
from tokenmerge.state import PatchState


def test_reads_and_replaces_positional_and_keyword_arguments():
    signature = Signature.of(Attention(16, heads=2, dim_head=8))
    x, mask = torch.ones(1), torch.zeros(1)
    assert signature.read((x,), {}, "hidden_states") is x
    assert signature.read((), {"hidden_states": x}, "hidden_states") is x
    assert signature.read((x, None, mask), {}, "attention_mask") is mask
    assert signature.read((x,), {}, "attention_mask") is None
    y = torch.ones(2)
    assert signature.replace((x, None, mask), {}, "attention_mask", y) == ((x, None, y), {})
    assert signature.replace((x,), {}, "attention_mask", y) == ((x,), {"attention_mask": y})
    assert signature.replace((), {"hidden_states": x}, "hidden_states", y) == ((), {"hidden_states": y})


def test_a_forward_replaced_on_the_instance_is_read_from_the_class():
    """DeepCache replaces ``unet.forward`` with a bare ``(*args, **kwargs)`` wrapper: the names come from the class."""
    block = BasicTransformerBlock(32, 2, 16)
    inner = block.forward
    block.forward = lambda *args, **kwargs: inner(*args, **kwargs)
    signature = Signature.of(block)
    assert signature.positions["hidden_states"] == 0 and signature.positions["attention_mask"] == 1
    x = torch.zeros(1, 4, 32)
    assert signature.read((x,), {}, "hidden_states") is x


def test_an_unknown_argument_is_an_error_not_a_silent_keyword():
    block = torch.nn.Linear(2, 2)  # forward(input): no **kwargs
    with pytest.raises(TypeError, match="Linear.forward takes no argument 'hidden_states'"):
        Signature.of(block).replace((), {}, "hidden_states", torch.ones(1))


class GridOf8x8:
    """The adapter fact a block patch asks for: its grid."""

    cond_first = False

    @staticmethod
    def grid(latent_hw, target, num_tokens):
        return 8, 8

    @staticmethod
    def frame_layout(grid, config):
        return None  # an image's grid, no video frames


def test_a_block_called_by_keyword_merges_as_one_called_positionally():
    torch.manual_seed(0)
    block = BasicTransformerBlock(32, 2, 16).eval()
    x = torch.randn(2, 64, 32)
    config = tokenmerge.ToMe(ratio=0.5, use_rand=False, min_tokens=0)
    outputs = []
    for call in (lambda: block(x), lambda: block(hidden_states=x)):
        state = PatchState(config, adapter=GridOf8x8(), pipeline=None)
        BlockPatch(state, PatchTarget("block", block, 0)).install([block.attn1])
        with torch.no_grad():
            outputs.append(call())
        for handle in state.handles:
            handle.remove()
    with torch.no_grad():
        plain = block(x)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], plain)  # merged: the test can tell a skipped merge
