"""auto_ratio: the selection rule, with a fake timer (no timed assertions), and what it leaves behind."""

from __future__ import annotations

import dataclasses
import logging

import pytest

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe, presets
from tokenmerge.calibrate import choose_ratio
from tokenmerge.models import adapter_for, tiny_configs
from tokenmerge.tools.tiny import tiny_denoiser

from .conftest import unet_inputs


class FakeTimer:
    """Seconds of a denoiser call from the ratio it is patched with (1 s unpatched); records what ran."""

    def __init__(self, unet, seconds_by_ratio: dict[float, float]) -> None:
        self.unet, self.seconds, self.calls = unet, seconds_by_ratio, []

    def __call__(self, call) -> float:
        call()  # the real call runs: hooks, plans and all
        config = tokenmerge.current_config(self.unet)
        ratio = None if config is None else config.ratio
        self.calls.append(ratio)
        return 1.0 if ratio is None else self.seconds[ratio]


def calibrate(unet, seconds, target, **kwargs):
    timer = FakeTimer(unet, seconds)
    result = tokenmerge.auto_ratio(unet, ToMe(seed=0), target, inputs=unet_inputs(unet, 2), timer=timer,
                                   repeats=2, warmup=0, **kwargs)
    return result, timer


def test_smallest_ratio_reaching_the_target_and_no_larger_one_is_timed(sd1_unet, caplog):
    seconds = {0.1: 0.95, 0.2: 0.8, 0.3: 0.6, 0.4: 0.55, 0.5: 0.5}
    with caplog.at_level(logging.INFO, logger="tokenmerge"):
        result, timer = calibrate(sd1_unet, seconds, 1.6, ratios=(0.1, 0.2, 0.3, 0.4, 0.5))
    assert result.ratio == 0.3 and result.reached and result.config == ToMe(seed=0, ratio=0.3)
    assert result.speedups == pytest.approx({0.1: 1 / 0.95, 0.2: 1.25, 0.3: 1 / 0.6})
    assert timer.calls == [None, None, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3]  # baseline, then ratios until reached
    assert result.baseline_s == 1.0
    assert "ratio 0.3 reaches the target 1.6x" in caplog.text


def test_unreachable_target_takes_the_fastest_ratio_and_says_so(sd1_unet, caplog):
    seconds = {0.25: 0.9, 0.5: 0.7, 0.75: 0.8}
    with caplog.at_level(logging.WARNING, logger="tokenmerge"):
        result, _ = calibrate(sd1_unet, seconds, 2.0, ratios=(0.25, 0.5, 0.75))
    assert result.ratio == 0.5 and not result.reached and set(result.speedups) == {0.25, 0.5, 0.75}
    assert "no ratio reaches 2x; the fastest, 0.5, is chosen" in caplog.text


def test_where_merging_cannot_pay_the_ratio_is_zero(sd1_unet, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenmerge"):
        result, _ = calibrate(sd1_unet, {0.5: 1.02, 0.75: 1.1}, 1.2, ratios=(0.5, 0.75))
    assert result.ratio == 0.0 and result.config.ratio == 0.0 and not result.reached
    assert "merging cannot pay here" in caplog.text


def test_a_block_below_the_floor_is_said_once_not_per_ratio(sd1_unet, caplog):
    with caplog.at_level(logging.WARNING, logger="tokenmerge"):
        tokenmerge.auto_ratio(sd1_unet, ToMe(seed=0), 1.2, inputs=unet_inputs(sd1_unet, 2, 6, 6),  # 36 tokens
                              timer=FakeTimer(sd1_unet, {0.25: 1.0, 0.5: 1.0}), ratios=(0.25, 0.5), repeats=1,
                              warmup=0)
    assert caplog.text.count("is below the automatic floor (cpu: 64 tokens)") == 1


def test_default_ratios_stop_at_the_methods_maximum(sd1_unet):
    result, timer = calibrate(sd1_unet, dict.fromkeys((0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75), 0.9), 5.0)
    assert list(result.speedups) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75]  # 0.75 = ToMe's 2x2 maximum
    assert result.ratio == 0.1  # all equally fast: the smallest ratio costs least quality


def test_an_earlier_patch_is_restored_and_an_unpatched_model_stays_unpatched(sd1_unet):
    calibrate(sd1_unet, {0.5: 0.5}, 1.5, ratios=(0.5,))
    assert tokenmerge.current_config(sd1_unet) is None
    tokenmerge.apply(sd1_unet, ImportanceMerge(ratio=0.6))
    calibrate(sd1_unet, {0.5: 0.5}, 1.5, ratios=(0.5,))
    assert tokenmerge.current_config(sd1_unet) == ImportanceMerge(ratio=0.6)
    tokenmerge.remove(sd1_unet)


def test_real_timer_on_a_sized_cfg_batch(sd1_unet):
    result = tokenmerge.auto_ratio(sd1_unet, ToMe(), 1.01, size=128, ratios=(0.5, 0.75), repeats=1, warmup=0)
    assert set(result.speedups) <= {0.5, 0.75} and result.baseline_s > 0
    assert result.config.ratio == result.ratio and str(result).startswith("tokenmerge.auto_ratio(ToMe)")


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_speedup=1.0, size=128), "target_speedup must be a number > 1"),
    (dict(target_speedup=2, size=128, inputs=((), {})), "either size= .* or inputs="),
    (dict(target_speedup=2), "either size= .* or inputs="),
    (dict(target_speedup=2, size=128, ratios=(0.5, 0.3)), "ratios must be increasing"),
    (dict(target_speedup=2, size=128, ratios=(0.8,)), r"in \(0, 0.75\]"),
    (dict(target_speedup=2, size=128, repeats=0), "repeats must be an int >= 1"),
])
def test_bad_arguments_name_the_fix(sd1_unet, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tokenmerge.auto_ratio(sd1_unet, ToMe(), **kwargs)


def test_choose_ratio_rule():
    assert choose_ratio({0.3: 1.2, 0.5: 1.5, 0.7: 1.8}, 1.5) == (0.5, True)
    assert choose_ratio({0.5: 1.5, 0.3: 1.6}, 1.5) == (0.3, True)  # smallest reaching, whatever the order
    assert choose_ratio({0.3: 1.1, 0.5: 1.3, 0.7: 1.3}, 2.0) == (0.5, False)  # tie: the smaller ratio
    assert choose_ratio({0.3: 0.9, 0.5: 1.0}, 1.2) == (0.0, False)
    assert choose_ratio({}, 1.2) == (0.0, False)


FAMILY_MODELS = sorted(tiny_configs())


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_every_family_keeps_its_preset_through_the_ratios_auto_ratio_tries(name):
    """auto_ratio replaces the ratio of the caller's config; the fields the caller left out still take the
    family's preset (PixArt's layers, LCM's cross-attention importance, AnimateDiff's pool, Zero123++'s placement)."""
    model = tiny_denoiser(name)
    family = adapter_for(model).family
    # A bare Wan call has no CFG (its pipeline runs CFG as two calls): importance from the cross-attention map.
    given = {"importance": "crossattn"} if family == "wan" else {}
    config = ImportanceMerge(seed=0, **given)
    seen = []

    def timer(call):
        call()
        current = tokenmerge.current_config(model)
        seen.append(current)
        return 1.0 if current is None else 1.0 - current.ratio  # faster with the ratio: 0.3 -> 1.43x

    size = (192, 128) if family == "zero123pp" else 64
    result = tokenmerge.auto_ratio(model, config, 1.4, size=size, ratios=(0.2, 0.3), repeats=1, warmup=0,
                                   timer=timer)
    patched = [c for c in seen if c is not None]
    assert [c.ratio for c in patched] == [0.2, 0.3] and result.ratio == 0.3
    for current in patched:
        assert current == presets.resolve(dataclasses.replace(config, ratio=current.ratio), family)
        for field, value in presets.preset(family, config).items():
            assert field in given or getattr(current, field) == value, f"{family}: {field} lost its preset"
    tokenmerge.apply(model, result.config)
    assert tokenmerge.current_config(model) == patched[-1]
    tokenmerge.remove(model)
