"""Family presets: fields left out take the family's value, fields passed are kept."""

from __future__ import annotations

import pytest

from tokenmerge import ImportanceMerge, ReToM, ToMe, presets


def test_unset_fields_take_the_family_preset_and_set_fields_are_kept():
    resolved = presets.resolve(ImportanceMerge(ratio=0.5), "animatediff")
    assert (resolved.ratio, resolved.pool, resolved.prune_steps) == (0.5, 0.8, 4 / 30)
    kept = presets.resolve(ImportanceMerge(ratio=0.5, pool=0.4), "animatediff")
    assert kept.pool == 0.4 and kept.prune_steps == 4 / 30  # explicit 0.4, even though it is the class default
    assert presets.resolve(ImportanceMerge(0.5, 0.4), "animatediff").pool == 0.4  # positional counts as set
    assert presets.resolve(kept, "animatediff") == kept  # resolving again changes nothing


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
    with pytest.raises(ValueError, match="unknown model family 'sd3'.*pixart"):
        presets.preset("sd3", ToMe)
