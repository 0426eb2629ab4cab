"""importance="crossattn": the final block's cross-attention map, for models without CFG (LCM)."""

from __future__ import annotations

import pytest
import torch

import tokenmerge
from tokenmerge import ImportanceMerge, signals
from tokenmerge.tools.tiny import tiny_lcm_unet, tiny_unet

from .conftest import run, unet_inputs


def test_map_is_the_head_averaged_attention_mass_off_the_first_text_token(monkeypatch):
    attn = tiny_unet("sd1").up_blocks[-1].attentions[-1].transformer_blocks[-1].attn2
    gen = torch.Generator().manual_seed(0)
    hidden, context = torch.randn(2, 256, 32, generator=gen), torch.randn(2, 7, 32, generator=gen)
    heads = attn.heads
    query = attn.head_to_batch_dim(attn.to_q(hidden))
    key = attn.head_to_batch_dim(attn.to_k(context))
    probs = attn.get_attention_scores(query, key).view(2, heads, 256, 7)  # what AttnProcessor computes
    expected = probs[..., 1:].sum(-1).mean(1)
    with torch.no_grad():
        torch.testing.assert_close(signals.crossattn_map(attn, hidden, context), expected.detach())
        monkeypatch.setattr(signals, "CHUNK_ELEMENTS", 2 * heads * 7 * 10)  # 10 query rows per chunk
        torch.testing.assert_close(signals.crossattn_map(attn, hidden, context), expected.detach())


def test_lcm_preset_uses_crossattn_and_runs_without_cfg():
    unet = tiny_lcm_unet()
    args, kwargs = unet_inputs(unet, 1)  # one image: no CFG batch
    kwargs["timestep_cond"] = torch.randn(1, 16)
    events = []
    tokenmerge.apply(unet, ImportanceMerge(ratio=0.7, seed=0, prune_steps=0.0), on_plan=events.append)
    assert tokenmerge.current_config(unet).importance == "crossattn"
    run(unet, args, kwargs, timestep=900)
    importance = unet._tokenmerge.importance
    assert importance.shape == (1, 16, 16)  # the final block's grid: the full latent
    assert not torch.allclose(importance, importance.mean())  # not a constant map
    events.clear()
    run(unet, args, kwargs, timestep=600)
    tokenmerge.remove(unet)
    top = events[0]
    torch.testing.assert_close(top.importance, importance.reshape(1, -1))
    pool = importance.reshape(-1).topk(ImportanceMerge(ratio=0.7).pool_size(256)).indices.tolist()
    assert set(top.plan.kept[0].tolist()) <= set(pool)


def test_the_map_sees_the_unmerged_tokens_when_cross_attention_is_merged(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 3)
    with tokenmerge.patched(sd1_unet, ImportanceMerge(ratio=0.5, importance="crossattn", merge_crossattn=True)):
        run(sd1_unet, args, kwargs)
        assert sd1_unet._tokenmerge.importance.shape == (3, 16, 16)


def test_with_cfg_the_conditional_half_gives_the_map(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 2)
    with tokenmerge.patched(sd1_unet, ImportanceMerge(importance="crossattn")):
        run(sd1_unet, args, kwargs)
        assert sd1_unet._tokenmerge.importance.shape == (1, 16, 16)


def test_cfg_importance_without_guidance_names_crossattn(sd1_unet):
    args, kwargs = unet_inputs(sd1_unet, 1)
    with tokenmerge.patched(sd1_unet, ImportanceMerge()):
        with pytest.raises(ValueError, match="needs classifier-free guidance.*importance='crossattn'"):
            run(sd1_unet, args, kwargs)


def test_only_the_final_blocks_cross_attention_is_hooked(sd1_unet):
    tokenmerge.apply(sd1_unet, ImportanceMerge(importance="crossattn"))  # merge_crossattn=False: no merge hook
    hooked = [name for name, m in sd1_unet.named_modules() if name.endswith("attn2") and m._forward_pre_hooks]
    tokenmerge.remove(sd1_unet)
    assert hooked == ["up_blocks.2.attentions.1.transformer_blocks.0.attn2"]
