"""Family presets: fields left out take the family's value, fields passed are kept."""

from __future__ import annotations

import dataclasses

import pytest

from tokenmerge import ImportanceMerge, ReToM, SiTo, ToFu, ToMe, presets


def test_unset_fields_take_the_family_preset_and_set_fields_are_kept():
    resolved = presets.resolve(ImportanceMerge(ratio=0.5), "animatediff")
    assert (resolved.ratio, resolved.pool, resolved.prune_steps) == (0.5, 0.8, 4 / 30)
    kept = presets.resolve(ImportanceMerge(ratio=0.5, pool=0.4), "animatediff")
    assert kept.pool == 0.4 and kept.prune_steps == 4 / 30  # explicit 0.4, even though it is the class default
    positional = presets.resolve(ImportanceMerge(0.5), "zero123pp")
    assert positional.ratio == 0.5 and "ratio" in ImportanceMerge(0.5).explicit_fields()  # positional counts as set
    assert presets.resolve(kept, "animatediff") == kept  # resolving again changes nothing


def test_only_the_ratio_is_positional():
    # tomesd's apply_patch(model, ratio, max_downsample, sx, sy, ...) order must not shift silently into ToMe's fields
    for method in (ToMe, ImportanceMerge, ReToM, SiTo, ToFu):
        assert method(0.25).ratio == 0.25
        with pytest.raises(TypeError, match="positional"):
            method(0.25, 1)


@pytest.mark.parametrize("family", sorted(presets.PRESETS))
@pytest.mark.parametrize("method", [ToMe, ImportanceMerge, ReToM, SiTo, ToFu])
def test_not_given_survives_dataclasses_replace(family, method):
    config = method(seed=3)
    copied = dataclasses.replace(config, ratio=0.25)  # as eval seeds configs and auto_ratio sets ratios
    assert copied.explicit_fields() == {"seed", "ratio"}
    assert presets.resolve(copied, family) == dataclasses.replace(presets.resolve(config, family), ratio=0.25)
    # A preset's values stay not given: re-resolving for another family gives that family's resolution.
    for other in presets.PRESETS:
        assert presets.resolve(presets.resolve(config, family), other) == presets.resolve(config, other)


def test_a_field_given_at_the_default_value_is_kept_against_the_preset():
    assert presets.resolve(ToMe(max_downsample=1), "zero123pp").max_downsample == 1
    assert presets.resolve(ToMe(), "zero123pp").max_downsample == 2
    replaced = dataclasses.replace(ToMe(), max_downsample=4)
    assert presets.resolve(replaced, "zero123pp").max_downsample == 4


def test_placement_applies_to_every_method_and_method_entries_only_to_theirs():
    assert presets.resolve(ReToM(), "pixart").layers == (0.25, 0.75)
    assert presets.resolve(ReToM(), "zero123pp").max_downsample == 2
    assert presets.resolve(ToMe(), "pixart").match == "grid"
    assert not hasattr(presets.resolve(ReToM(), "pixart"), "match")
    assert presets.resolve(ToMe(), "dit").match == "features"
    assert presets.resolve(ImportanceMerge(), "lcm").importance == "crossattn"
    config = ImportanceMerge()
    assert presets.resolve(config, "sd") is config


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'kandinsky'.*pixart"):
        presets.preset("kandinsky", ToMe)


def test_the_new_transformer_families_merge_every_block_with_one_key_per_slot():
    """SD3, FLUX and Wan: every block's attention (the measured placement, docs/models.md), no size bias (their
    processors take no usable mask); FLUX's ImportanceMerge reads the joint map (no CFG batch); Wan's takes the
    paper's video settings, per frame."""
    for family in ("sd3", "flux", "wan"):
        config = presets.resolve(ToMe(ratio=0.5), family)
        assert (config.layers, config.proportional_attention, config.merge_mlp) == ((0.0, 1.0), False, False)
    assert presets.resolve(ImportanceMerge(ratio=0.5), "flux").importance == "crossattn"
    assert presets.resolve(ImportanceMerge(ratio=0.5), "sd3").importance == "cfg"
    wan = presets.resolve(ImportanceMerge(ratio=0.5), "wan")
    assert (wan.importance, wan.pool, wan.prune_steps, wan.frames_per_cell) == ("cfg", 0.8, 4 / 30, 1)
