"""Inputs and probes shared by the model-family tests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

import tokenmerge
from tokenmerge.methods import METHODS
from tokenmerge.plan import MergePlan

#: One config of every registered method, seeded, at a ratio each accepts.
EVERY_METHOD = [method(ratio=0.5, seed=0) for method in METHODS.values()]
METHOD_IDS = list(METHODS)
#: The self-attention modes every family runs (docs/methods.md, "Size-aware keys and K/V-only merging").
ATTENTION_MODES = [dict(proportional_attention=True), dict(merge_queries=False, proportional_attention=True),
                   dict(proportional_attention=True, bias_via="channel")]
ATTENTION_IDS = ["size-aware", "kv-only-size-aware", "channel"]


@dataclasses.dataclass(frozen=True)
class Shuffle(tokenmerge.ToMe):
    """Keeps every token of what it plans, in a random order per row: attention is permutation-equivariant when
    each token carries its own position, so the output must not move (up to float summation order)."""

    def make_plan(self, x, ctx):
        batch, tokens, _ = x.shape
        kept = torch.stack([torch.randperm(tokens, generator=torch.Generator().manual_seed(b)) for b in range(batch)])
        assign = torch.empty_like(kept).scatter_(1, kept, torch.arange(tokens).expand(batch, -1))
        return MergePlan(kept=kept, assign=assign, num_dst=tokens)


class CountingProcessor(AttnProcessor2_0):
    """Records the query and key/value token counts of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        self.calls.append((hidden_states.shape[1], context.shape[1]))
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def no_hooks_left(model: torch.nn.Module) -> bool:
    return not hasattr(model, "_tokenmerge") and all(
        not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def check_ratio_zero_is_identical(model: torch.nn.Module, call: Callable, config, timesteps=(950, 500)) -> None:
    """Patched at ratio 0, every call (``call(model, t=t)``) equals the unpatched model's bit for bit."""
    expected = [call(model, t=t) for t in timesteps]
    with tokenmerge.patched(model, config):
        assert all(torch.equal(call(model, t=t), e) for t, e in zip(timesteps, expected))


def check_merges_and_restores(model: torch.nn.Module, call: Callable, config, timesteps=(950, 500)
                              ) -> list[torch.Tensor]:
    """Every patched call is finite and differs from the unpatched output; ``remove`` restores it bit for bit and
    leaves no hook. Returns the patched outputs."""
    unpatched = call(model)
    tokenmerge.apply(model, config)
    merged = [call(model, t=t) for t in timesteps]
    tokenmerge.remove(model)
    assert all(torch.isfinite(m).all() and not torch.allclose(m, unpatched, atol=1e-5) for m in merged)
    assert torch.equal(call(model), unpatched) and no_hooks_left(model)
    return merged


def check_compiles_whole(model: torch.nn.Module, call: Callable, config, timesteps=(950, 700, 400),
                         site: str | None = None) -> None:
    """``torch.compile(model, fullgraph=True)`` (``aot_eager``: eager kernels, the same random draws) runs a patched
    run of ``call(model, t=t)`` without a graph break and gives the eager outputs. ``site``: compile the model's
    submodule of that name in its place instead (a wrapper's inner model)."""
    torch.manual_seed(0)
    with tokenmerge.patched(model, config):
        eager = [call(model, t=t) for t in timesteps]
    torch.manual_seed(0)
    with tokenmerge.patched(model, config):
        torch._dynamo.reset()
        if site is None:
            got = [call(torch.compile(model, fullgraph=True, backend="aot_eager"), t=t) for t in timesteps]
        else:
            inner = getattr(model, site)
            setattr(model, site, torch.compile(inner, fullgraph=True, backend="aot_eager"))
            try:
                got = [call(model, t=t) for t in timesteps]
            finally:
                setattr(model, site, inner)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert not torch.allclose(eager[0], call(model, t=timesteps[0]), atol=1e-4), "must merge"
