"""Zero123++-like multi-view U-Net: reference keys/values appended in self-attention, six views tiled 3 x 2."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge
from tokenmerge.models import example_inputs
from tokenmerge.tools.tiny import ReferenceAttnProcessor, tiny_zero123pp

from .kit import FamilyConformance

VIEW = 8  # latent side of one view (320 px / 8 = 40 in the real model)
TILED = (3 * VIEW, 2 * VIEW)  # six views, 3 rows x 2 columns


@pytest.fixture(scope="module")
def model():
    return tiny_zero123pp()


def call(model, t=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    views = torch.randn(2, 4, *TILED, generator=gen)  # CFG: [uncond; cond]
    text = torch.randn(2, 7, 32, generator=gen)
    reference = torch.randn(1, 4, VIEW, VIEW, generator=gen)  # the input image's latent
    with torch.no_grad():
        return model(views, torch.tensor(t), text, cross_attention_kwargs={"cond_lat": reference}).sample


class TestZero123Plus(FamilyConformance):
    build = staticmethod(tiny_zero123pp)
    call = staticmethod(call)
    takes_attention_modes = False  # its reference attention extends the keys inside its own processor
    example_size = (192, 128)  # six views tiled 3 x 2
    # The inner U-Net is compiled: the wrapper's own work (the reference pass, its noise) stays eager around it.
    compile_site = "unet"


class Recording(ReferenceAttnProcessor):
    def __init__(self, name):
        super().__init__(name)
        self.calls = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, mode=None,
                 ref_dict=None, **kwargs):
        stored = ref_dict.get(self.name) if ref_dict else None
        keys = hidden_states.shape[1] + (stored.shape[1] if mode == "r" else 0)
        self.calls.append((mode, hidden_states.shape[1], keys))
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, mode, ref_dict)


def test_views_are_merged_and_attend_to_the_whole_reference():
    model = tiny_zero123pp()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    recorder = Recording(name)
    model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.set_processor(recorder)
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, seed=0)):
        call(model)
    views, reference = TILED[0] * TILED[1], VIEW * VIEW
    kept = views - int(views * 0.5)
    # The reference pass is left whole; the views' merged queries see merged views + the full reference.
    assert recorder.calls == [("w", reference, reference), ("r", kept, kept + reference)]


def test_preset_merges_the_first_two_and_last_two_blocks_on_the_tiled_grid(model):
    events = []
    with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, seed=0), on_plan=events.append):
        config = tokenmerge.current_config(model)
        call(model, t=990)
        importance = model._tokenmerge.importance
        call(model, t=500)
    assert (config.pool, config.prune_steps, config.max_downsample) == (0.6, 10 / 50, 2)
    stages = {e.block.rsplit(".attentions", 1)[0]: e.grid for e in events}
    assert stages == {"down_blocks.0": TILED, "down_blocks.1": (12, 8), "up_blocks.2": (12, 8),
                      "up_blocks.3": TILED}  # level 2 (down_blocks.2, up_blocks.1) is not merged
    assert importance.shape == (1, *TILED)  # one map over all six tiled views
    assert all(e.plan.num_kept == e.grid[0] * e.grid[1] - int(e.grid[0] * e.grid[1] * 0.5) for e in events)


@pytest.mark.parametrize("fields", [dict(proportional_attention=True), dict(merge_queries=False)])
def test_size_aware_keys_and_kv_only_raise_naming_the_reference_attention(model, fields):
    with pytest.raises(ValueError, match="reference attention appends the reference image's tokens"):
        tokenmerge.apply(model, ImportanceMerge(**fields))


def test_example_inputs_tile_the_views_and_carry_the_reference_latent(model):
    args, kwargs = example_inputs(model, (192, 128), images=1)
    assert args[0].shape == (2, 4, 24, 16)  # 3 x 2 views of 64 px
    assert kwargs["cross_attention_kwargs"]["cond_lat"].shape == (2, 4, 40, 40)  # the 320 px condition image
