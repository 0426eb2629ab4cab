"""The block registry: blocks found by what they are, their parts read by the names their kind gives."""

from __future__ import annotations

import torch
from diffusers.models.attention import BasicTransformerBlock

import tokenmerge
from tokenmerge.models import adapter_for
from tokenmerge.models.blocks import BlockKind, find_blocks, kind_of, register_block
from tokenmerge.tools.tiny import tiny_pixart, tiny_unet

from .test_transformer import pixart_call


def test_every_diffusers_transformer_block_is_found_with_the_models_own_name():
    unet = tiny_unet("sd1")
    expected = {name for name, module in unet.named_modules() if isinstance(module, BasicTransformerBlock)}
    found = {name: block for name, block, kind in find_blocks(unet)}
    assert set(found) == expected and len(expected) == 7  # down: 1 per level x 2, mid: 1, up: 2 per level x 2
    assert all(dict(unet.named_modules())[name] is block for name, block in found.items())
    assert {t.name for t in adapter_for(unet).all_targets()} == expected
    assert kind_of(unet.conv_in) is None and kind_of(unet) is None


def test_a_subclass_of_a_registered_block_is_a_block_of_the_same_kind():
    """Found by ``isinstance``, not by class name: a user's subclass of diffusers' block is patched."""

    class MyBlock(BasicTransformerBlock):
        pass

    unet = tiny_unet("sd1")
    for _, block, _ in find_blocks(unet):
        block.__class__ = MyBlock
    assert kind_of(next(iter(find_blocks(unet)))[1]) == BlockKind()
    assert len(adapter_for(unet).all_targets()) == 7


def test_the_kind_names_the_parts_the_hooks_merge_around():
    """A block registered without a feed-forward part keeps its ``ff`` whole even with ``merge_mlp=True``."""

    class AttentionOnly(BasicTransformerBlock):
        pass

    register_block(AttentionOnly, BlockKind(mlp=None))
    model = tiny_pixart()
    for block in model.transformer_blocks:
        block.__class__ = AttentionOnly
    before = pixart_call(model)
    config = tokenmerge.ToMe(ratio=0.5, merge_mlp=True, min_tokens=0, seed=0)
    targets = adapter_for(model).targets(config)
    assert targets and {t.kind.mlp for t in targets} == {None}
    seen = []
    hook = targets[0].block.ff.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
    with tokenmerge.patched(model, config):
        merged = pixart_call(model)
    hook.remove()
    tokens = model.config.sample_size ** 2 // model.config.patch_size ** 2
    assert seen == [tokens], "ff ran on every token: the kind says the block has no MLP to merge around"
    assert not torch.allclose(merged, before)  # attn1 and attn2 still merged
    assert torch.equal(pixart_call(model), before)
