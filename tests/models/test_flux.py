"""FLUX.1 (``FluxTransformer2DModel``): image tokens merged in both streams, the text never; every kept token
rotated by its own rotary row; importance from the joint attention's text share; the refusals."""

from __future__ import annotations


import diffusers
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

import tokenmerge
from tokenmerge import ImportanceMerge, ToMe
from tokenmerge.plan import MergePlan
from tokenmerge.rotary import Rotation
from tokenmerge.signals import joint_text_map
from tokenmerge.tools.tiny import tiny_denoiser

from .helpers import Shuffle
from .kit import FamilyConformance

HAS_FLUX = tuple(int(part) for part in diffusers.__version__.split(".")[:2]) >= (0, 35)
pytestmark = pytest.mark.skipif(not HAS_FLUX, reason=f"FLUX merging needs diffusers >= 0.35 ({diffusers.__version__})")

ROWS, COLS = 8, 10  # a non-square token grid: 80 image tokens (above the CPU floor of 64)
TEXT = 7


def ids(rows: int = ROWS, cols: int = COLS) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros(rows * cols, 1), grid.float()], dim=1)


def call(model, t=500, seed=0, batch=2):
    """A call as FluxPipeline makes it: no CFG batch (two different images), packed latents, position ids, the
    distilled guidance, a timestep in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, ROWS * COLS, 4, generator=gen)
    text = torch.randn(batch, TEXT, 32, generator=gen)
    pooled = torch.randn(batch, 32, generator=gen)
    with torch.no_grad():
        return model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.full((batch,), t / 1000),
                     img_ids=ids(), txt_ids=torch.zeros(TEXT, 3), guidance=torch.full((batch,), 3.5)).sample


def flux():
    return tiny_denoiser("flux").eval()


class TestFlux(FamilyConformance):
    build = staticmethod(flux)
    call = staticmethod(call)
    takes_attention_modes = False  # the joint attention takes no mask and computes its image keys itself
    example_size = (128, 160)


class Recorder:
    """Wraps an attention processor: records the query and text lengths of each call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.calls.append((hidden_states.shape[1], None if encoder_hidden_states is None else
                           encoder_hidden_states.shape[1]))
        return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


def test_only_image_tokens_merge_in_the_placed_blocks_and_the_text_passes_whole():
    model = flux()
    recorders = {}
    for name, module in model.named_modules():
        if name.endswith(".attn"):
            recorders[name] = module.processor = Recorder(module.processor)
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0, seed=0, layers=(0.25, 0.75))):  # blocks 1-2 of 4
        call(model)
    image = ROWS * COLS
    merged = image // 2
    assert recorders["transformer_blocks.0.attn"].calls == [(image, TEXT)]
    assert recorders["transformer_blocks.1.attn"].calls == [(merged, TEXT)]
    assert recorders["single_transformer_blocks.0.attn"].calls == [(TEXT + merged, None)]
    assert recorders["single_transformer_blocks.1.attn"].calls == [(TEXT + image, None)]


def test_the_text_stream_is_never_merged():
    """The double-stream blocks return the text stream: merged or not, it keeps every token, and where no image
    token merges before it (the first block) it is bit for bit the unpatched one."""
    model = flux()
    block = model.transformer_blocks[0]
    seen = []
    handle = block.register_forward_hook(lambda module, args, output: seen.append(output[0]))
    call(model)
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0, seed=0, layers=(0.0, 1.0))):
        call(model)
    handle.remove()
    assert seen[1].shape == seen[0].shape == (2, TEXT, 32)
    assert not torch.equal(seen[1], seen[0])  # the joint attention saw merged image tokens


def test_kept_tokens_are_rotated_by_their_own_rows():
    """The rows of a merged call are the unmerged call's rows of the same tokens: rotating the kept tokens equals
    rotating everything as diffusers does and keeping the kept tokens' results."""
    torch.manual_seed(0)
    batch, tokens, heads, dim = 2, 12, 2, 8
    cos, sin = torch.rand(TEXT + tokens, dim), torch.rand(TEXT + tokens, dim)
    kept = torch.stack([torch.randperm(tokens)[:5] for _ in range(batch)])
    assign = torch.zeros(batch, tokens, dtype=torch.long)
    assign.scatter_(1, kept, torch.arange(5).expand(batch, -1))
    plan = MergePlan(kept=kept, assign=assign, num_dst=5, prune=True)
    rotation = Rotation.of_kept((cos, sin), plan, TEXT)
    q = torch.randn(batch, TEXT + tokens, heads, dim)
    full = apply_rotary_emb(q, (cos, sin), sequence_dim=1)
    rows = torch.cat([torch.arange(TEXT).expand(batch, -1), kept + TEXT], dim=1)
    picked = torch.stack([q[b, rows[b]] for b in range(batch)])
    expected = torch.stack([full[b, rows[b]] for b in range(batch)])
    assert torch.equal(rotation.apply(picked), expected)  # single stream: [text; kept image]
    assert torch.equal(rotation.apply(picked[:, TEXT:]), expected[:, TEXT:])  # double stream: the image part
    assert torch.equal(rotation.apply(picked[:, :TEXT], text_only=True), expected[:, :TEXT])


def test_tokens_in_another_order_keep_their_positions_through_the_whole_model():
    model = flux()
    unpatched = call(model)
    with tokenmerge.patched(model, Shuffle(ratio=0.5, min_tokens=0, layers=(0.0, 1.0))):
        shuffled = call(model)
    torch.testing.assert_close(shuffled, unpatched, atol=1e-5, rtol=1e-5)
    # Without the kept tokens' rows, the same shuffle moves the output: the test can fail.
    with tokenmerge.patched(model, Shuffle(ratio=0.5, min_tokens=0, layers=(0.0, 1.0))):
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            block.attn.norm_q._forward_hooks.clear()
            block.attn.norm_k._forward_hooks.clear()
        assert not torch.allclose(call(model), unpatched, atol=1e-3)


def test_importance_is_the_joint_attention_share_of_the_text():
    """Checked against the full joint softmax, computed here from the processor's own pieces."""
    model = flux()
    attn = model.transformer_blocks[-1].attn
    torch.manual_seed(0)
    image, context = torch.randn(2, ROWS * COLS, 32), torch.randn(2, TEXT, 32)
    rotary = model.pos_embed(torch.cat([torch.zeros(TEXT, 3), ids()]))
    with torch.no_grad():
        got = joint_text_map(attn, image, context, rotary)
        q = attn.norm_q(attn.to_q(image).unflatten(-1, (attn.heads, -1)))
        k = torch.cat([attn.norm_added_k(attn.add_k_proj(context).unflatten(-1, (attn.heads, -1))),
                       attn.norm_k(attn.to_k(image).unflatten(-1, (attn.heads, -1)))], dim=1)
        q_all = torch.cat([torch.zeros(2, TEXT, *q.shape[2:]), q], dim=1)
        q = apply_rotary_emb(q_all, rotary, sequence_dim=1)[:, TEXT:]
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
        probs = (torch.einsum("bnhd,bmhd->bhnm", q, k) / q.shape[-1] ** 0.5).softmax(-1)
    torch.testing.assert_close(got, probs[..., :TEXT].sum(-1).mean(1), atol=1e-5, rtol=1e-5)


def test_importance_merge_reads_the_joint_map_of_the_previous_step():
    model = flux()
    events = []
    config = ImportanceMerge(ratio=0.5, min_tokens=0, seed=0, prune_steps=0.0)
    assert tokenmerge.presets.resolve(config, "flux").importance == "crossattn"
    with tokenmerge.patched(model, config, on_plan=events.append):
        call(model, t=900)
        call(model, t=800)
    first, later = [e for e in events if e.step == 0], [e for e in events if e.step == 1]
    assert all(e.importance is None for e in first)
    assert later and all(e.importance is not None and e.importance.shape == (2, ROWS * COLS) for e in later)


def test_cfg_importance_size_aware_keys_and_ip_adapter_are_refused_with_the_fix():
    model = flux()
    with pytest.raises(ValueError, match="classifier-free guidance"):
        with tokenmerge.patched(model, ImportanceMerge(ratio=0.5, importance="cfg", min_tokens=0)):
            call(model)
    with pytest.raises(ValueError, match="FluxAttnProcessor"):
        tokenmerge.apply(model, ToMe(ratio=0.5, proportional_attention=True))
    with pytest.raises(ValueError, match="merge_queries=True"):
        tokenmerge.apply(model, ToMe(ratio=0.5, merge_queries=False))
    assert tokenmerge.current_config(model) is None
    # An IP-Adapter's image states reach every attention (as FluxPipeline passes them); merged attention refuses.
    ip = {"ip_hidden_states": [torch.zeros(2, 4, 32)]}
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0)), pytest.raises(ValueError, match="IP-Adapter"):
        with torch.no_grad():
            model(torch.randn(2, ROWS * COLS, 4), encoder_hidden_states=torch.randn(2, TEXT, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.full((2,), 0.5), img_ids=ids(),
                  txt_ids=torch.zeros(TEXT, 3), guidance=torch.full((2,), 3.5), joint_attention_kwargs=ip)
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0, merge_attn=False, merge_mlp=True)):
        with torch.no_grad():  # MLP merging leaves the attention whole: it runs
            model(torch.randn(2, ROWS * COLS, 4), encoder_hidden_states=torch.randn(2, TEXT, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.full((2,), 0.5), img_ids=ids(),
                  txt_ids=torch.zeros(TEXT, 3), guidance=torch.full((2,), 3.5), joint_attention_kwargs=dict(ip))


def test_a_grid_the_ids_do_not_span_is_refused():
    """FLUX Kontext appends a reference image's tokens to the latent's: more tokens than the ids' grid holds."""
    model = flux()
    gen = torch.Generator().manual_seed(0)
    ids2 = torch.cat([ids(), ids() + torch.tensor([1.0, 0, 0])])
    with tokenmerge.patched(model, ToMe(ratio=0.5, min_tokens=0)), pytest.raises(ValueError, match="Kontext"):
        with torch.no_grad():
            model(torch.randn(1, 2 * ROWS * COLS, 4, generator=gen), encoder_hidden_states=torch.randn(1, TEXT, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=ids2,
                  txt_ids=torch.zeros(TEXT, 3), guidance=torch.tensor([3.5]))


def true_cfg_pipeline():
    from tests.test_pipeline_conformance import FLUX_CALL, flux

    pipe, _ = flux()
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(FLUX_CALL, true_cfg_scale=2.0, negative_prompt="a red circle", num_inference_steps=3,
                      output_type="latent")


def test_true_cfg_runs_two_calls_per_step_that_share_plans_and_give_cfg_importance():
    """FluxPipeline's true CFG: the conditional call, then the unconditional one, per step. Both are one step of
    the clock, the second reuses the first's plans, and importance="cfg" is |cond - uncond| of the step before."""
    pipe, call_kwargs = true_cfg_pipeline()
    outputs = []
    handle = pipe.transformer.register_forward_hook(lambda module, args, kwargs, output: outputs.append(output[0]),
                                                    with_kwargs=True)
    events = []
    config = ImportanceMerge(ratio=0.5, importance="cfg", min_tokens=0, seed=0, prune_steps=0.0, layers=(0.0, 1.0))
    with tokenmerge.patched(pipe, config, on_plan=events.append):
        pipe(**call_kwargs, generator=torch.Generator().manual_seed(0))
    handle.remove()
    blocks = len(pipe.transformer.transformer_blocks) + len(pipe.transformer.single_transformer_blocks)
    assert [e.step for e in events] == [step for step in range(3) for _ in range(2 * blocks)]
    for step in range(3):
        cond, uncond = events[2 * blocks * step: 2 * blocks * (step + 1)][:blocks], events[
            2 * blocks * step + blocks: 2 * blocks * (step + 1)]
        assert all(a.plan is b.plan for a, b in zip(cond, uncond))
    assert all(e.importance is None for e in events[: 2 * blocks])
    expected = (outputs[0] - outputs[1]).abs().mean(-1)  # step 0: cond then uncond, packed (B, N, C)
    torch.testing.assert_close(events[2 * blocks].importance, expected)


def test_cfg_importance_without_true_cfg_is_refused_naming_it():
    pipe, call_kwargs = true_cfg_pipeline()
    call_kwargs.pop("negative_prompt")
    with pytest.raises(ValueError, match="true_cfg_scale"):
        with tokenmerge.patched(pipe, ImportanceMerge(ratio=0.5, importance="cfg", min_tokens=0)):
            pipe(**call_kwargs)
