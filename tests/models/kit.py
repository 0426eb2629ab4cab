"""The conformance kit: what every model family must hold, for every registered method and attention mode.

A family's tests derive a ``Test...`` class from :class:`FamilyConformance` and give it ``build`` (a tiny model of
the family) and ``call`` (``call(model, t=t) -> output``: one denoiser call as the family's pipeline makes it).
The kit runs every method in :data:`tokenmerge.methods.METHODS`, so a new method is checked on every family and a
new family against every method without writing those tests again.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

import tokenmerge
from tokenmerge.methods import METHODS
from tokenmerge.models import adapter_for, example_inputs

from .helpers import (
    ATTENTION_IDS,
    ATTENTION_MODES,
    check_compiles_whole,
    check_merges_and_restores,
    check_ratio_zero_is_identical,
)

METHOD_NAMES = list(METHODS)


class FamilyConformance:
    """Ratio 0 and ``remove()`` are bit-identical, every method merges, every attention mode runs (or the family
    refuses it, naming why), and the patched model compiles whole (``fullgraph=True``) to the eager outputs."""

    build: Callable[[], nn.Module]
    call: Callable[..., torch.Tensor]
    #: Whether the family takes size-aware keys and K/V-only merging (Zero123++'s reference attention does not).
    takes_attention_modes = True
    #: Timesteps of the calls a merged run makes (the pruning phase and the merging phase of ImportanceMerge).
    timesteps = (950, 700, 400)
    #: The submodule compiled in place for the compile test (None: the model itself).
    compile_site: str | None = None
    #: Image size (pixels) of the example-input check: one side, or ``(height, width)``.
    example_size: int | tuple[int, int] = 64
    #: Fields per method for a bare denoiser's calls (Wan: its pipeline's CFG comes as two calls, which a bare
    #: denoiser does not make, so ImportanceMerge reads the cross-attention map).
    bare_fields: dict[str, dict] = {}

    def method(self, name: str, **fields):
        return METHODS[name](**{**self.bare_fields.get(name, {}), **fields})

    @pytest.fixture(scope="class")
    def model(self) -> nn.Module:
        return type(self).build()

    @pytest.mark.parametrize("name", METHOD_NAMES)
    def test_ratio_zero_is_bit_identical(self, model, name):
        check_ratio_zero_is_identical(model, self.call, self.method(name, ratio=0.0, seed=0))

    @pytest.mark.parametrize("name", METHOD_NAMES)
    def test_every_method_merges_and_remove_restores_bit_identical_outputs(self, model, name):
        check_merges_and_restores(model, self.call, self.method(name, ratio=0.5, seed=0), timesteps=self.timesteps)

    @pytest.mark.parametrize("mode", ATTENTION_MODES, ids=ATTENTION_IDS)
    def test_attention_modes(self, model, mode):
        importance = functools.partial(self.method, "importance")
        if not self.takes_attention_modes:
            with pytest.raises(ValueError, match="proportional_attention"):
                tokenmerge.apply(model, importance(ratio=0.5, seed=0, **mode))
            assert tokenmerge.current_config(model) is None
            return
        check_ratio_zero_is_identical(model, self.call, importance(ratio=0.0, **mode))
        plain = check_merges_and_restores(model, self.call, importance(ratio=0.5, seed=0, proportional_attention=False))
        merged = check_merges_and_restores(model, self.call, importance(ratio=0.5, seed=0, **mode))
        assert not torch.allclose(merged[-1], plain[-1], atol=1e-6), "the mode must change what attention computes"

    @pytest.mark.parametrize("name", ["tome", "importance"])
    def test_compiles_whole(self, model, name):
        check_compiles_whole(model, self.call, self.method(name, ratio=0.5, seed=0), timesteps=self.timesteps,
                             site=self.compile_site)

    def test_example_inputs_run_the_denoiser_and_merging_shortens_its_blocks(self, model):
        """The family's example inputs (``bench``, ``auto_ratio``, FLOP counts) are a call its denoiser takes: a
        CFG batch of two images where the family guides, and a prediction of the latent's shape; merged, every
        patched block sees fewer tokens than it would unmerged."""
        adapter = adapter_for(model)
        args, kwargs = example_inputs(model, self.example_size, images=2, seed=3)
        latent = args[0]
        assert latent.shape[0] == (4 if adapter.guided else 2)
        again, _ = example_inputs(model, self.example_size, images=2, seed=3)
        assert torch.equal(again[0], latent), "example inputs are a function of the seed"
        with torch.no_grad():
            prediction = output_tensor(model(*args, **kwargs))
            assert prediction.shape[0] == latent.shape[0] and prediction.shape[2:] == latent.shape[2:]
            plans = []
            config = METHODS["tome"](ratio=0.5, min_tokens=0, seed=0)
            with tokenmerge.patched(model, config, on_plan=plans.append):
                merged = output_tensor(model(*args, **kwargs))
        assert merged.shape == prediction.shape and torch.isfinite(merged).all()
        assert plans and all(p.plan is not None and p.plan.kept.shape[1] < p.plan.assign.shape[1] for p in plans)


def output_tensor(output: object) -> torch.Tensor:
    """A denoiser's raw output tensor (its first element, or ``.sample``), in the family's own layout."""
    return output[0] if isinstance(output, (tuple, list)) else output.sample
