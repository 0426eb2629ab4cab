"""Importance from cross-attention: ``ImportanceMerge(importance="crossattn")``, for models without CFG.

Consistency models (LCM) distill classifier-free guidance away, so ``|eps_cond - eps_uncond|`` does not exist;
the paper then uses "the averaged attention map from the final model block" (Appendix A, Table 11; App. B).
One forward pre-hook on the ``attn2`` of the denoiser's final transformer block with cross-attention recomputes
``softmax(q k^T / sqrt(d))`` for that block only, over the text tokens (``N x T``, with ``T`` 77 for CLIP: small),
averaged over heads; no other layer's attention is touched and no processor is replaced.

A token's importance is the attention mass it puts on the text tokens after the first. The paper does not say
how the map is reduced over the text tokens; their plain mean is the constant ``1/T`` (each row of the map sums
to 1), so we leave out the first token, CLIP's start-of-text token, the attention sink that carries no prompt
content: a token that attends to the prompt's words scores high. The map of step ``t`` steers step ``t + 1``,
as the CFG map does; with CFG, the conditional half's map is used.
"""

from __future__ import annotations

import torch

import torch.nn.functional as F

from .arguments import Signature
from .rotary import rotate

#: Query rows per chunk of the ``N x T`` score matrix (bounds memory at high resolution).
CHUNK_ELEMENTS = 1 << 24


def crossattn_map(attn, hidden_states: torch.Tensor, context: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, N)``: per query token, the head-averaged attention mass on the text tokens after the first.

    ``attn`` is a diffusers ``Attention`` (its ``to_q``, ``to_k``, ``heads``, ``scale`` and optional q/k norms);
    ``hidden_states (B, N, C)`` the queries' input, ``context (B, T, C')`` the text; ``mask`` an additive bias
    ``(B, 1, T)`` or ``(B, T)`` (PixArt's padding mask) or a boolean keep-mask.
    """
    if getattr(attn, "norm_cross", None) is not None:
        context = attn.norm_encoder_hidden_states(context)
    batch, num_tokens, _ = hidden_states.shape
    heads = attn.heads
    key = attn.to_k(context)
    text = key.shape[1]
    key = key.view(batch, text, heads, -1).transpose(1, 2)  # (B, h, T, d)
    if getattr(attn, "norm_k", None) is not None:
        key = attn.norm_k(key)
    bias = None
    if mask is not None:
        mask = mask.reshape(batch, -1)[:, -text:]
        bias = mask.float() if mask.is_floating_point() else torch.zeros_like(mask, dtype=torch.float32).masked_fill(
            ~mask.bool(), float("-inf"))
        bias = bias[:, None, None, :]
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * text))
    out = []
    for start in range(0, num_tokens, rows):
        query = attn.to_q(hidden_states[:, start : start + rows])
        query = query.view(batch, query.shape[1], heads, -1).transpose(1, 2)  # (B, h, n, d)
        if getattr(attn, "norm_q", None) is not None:
            query = attn.norm_q(query)
        scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        out.append(probs[..., 1:].sum(dim=-1).mean(dim=1))
    return torch.cat(out, dim=1)


def joint_text_map(attn, hidden_states: torch.Tensor, context: torch.Tensor, rotary: object) -> torch.Tensor:
    """``(B, N)``: per image token, the head-averaged attention mass on the text keys in a joint attention's one
    softmax over ``[text; image]`` (FLUX's double-stream ``FluxAttention``, SD3's joint ``Attention``), with the
    call's rotary rows (FLUX) or none (SD3).

    The joint softmax's share of the text plays the part of the U-Net's cross-attention map: it needs no start
    token to leave out (T5 has none), and one SDPA call over values that mark the text keys gives it without an
    ``N x (T + N)`` score matrix.
    """
    def heads(y):
        return y.unflatten(-1, (attn.heads, -1))

    def norm(name, y):
        module = getattr(attn, name, None)
        return y if module is None else module(y)

    text = context.shape[1]
    query = norm("norm_q", heads(attn.to_q(hidden_states)))
    text_key = norm("norm_added_k", heads(attn.add_k_proj(context)))
    key = torch.cat([text_key, norm("norm_k", heads(attn.to_k(hidden_states)))], dim=1)
    if rotary is not None:
        cos, sin = (part.to(query.device)[None, :, None] for part in rotary)
        key = rotate(key, cos, sin)
        query = rotate(query, cos[:, text:], sin[:, text:])
    # Values of the queries' head dim keep SDPA on its fused kernel (narrower values fall back to the math path).
    marks = query.new_zeros(query.shape[0], attn.heads, key.shape[1], query.shape[-1])
    marks[:, :, :text, 0] = 1
    mass = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), marks)[..., 0]
    return mass.float().mean(dim=1)


def wan_text_map(attn, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``(B, N)``: per query token, the head-averaged attention mass of Wan's text cross-attention (``WanAttention``,
    q/k RMS norms across heads) on the prompt's words.

    UMT5 has no start token to leave out; ``WanPipeline`` pads the prompt to 512 tokens with zeros, which the text
    projection turns into one repeated row, so the padding is the keys whose rows equal the last one (only the last
    key, for a prompt of the full length). The image tokens of the image-to-video models (the context's rows before
    the last 512) are not text and are left out, as the processor attends them apart.
    """
    if getattr(attn, "add_k_proj", None) is not None:
        context = context[:, context.shape[1] - 512:]
    query = attn.norm_q(attn.to_q(hidden_states)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    key = attn.norm_k(attn.to_k(context)).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    words = (context != context[:, -1:]).any(dim=-1)  # (B, T): not padding
    marks = query.new_zeros(*key.shape)
    marks[..., 0] = words[:, None].to(query.dtype)
    mass = F.scaled_dot_product_attention(query, key, marks)[..., 0]
    return mass.float().mean(dim=1)


def is_wan_attention(module: torch.nn.Module) -> bool:
    try:
        from diffusers.models.transformers.transformer_wan import WanAttention
    except ImportError:
        return False
    return isinstance(module, WanAttention)


def install_crossattn_importance(state, adapter) -> None:
    """Hook the final cross-attention block (a joint attention's, where the family has no cross-attention; each
    expert's, on Wan 2.2) so that each call leaves its map in ``state.importance``."""
    for target in adapter.importance_targets():
        _install_map(state, adapter, target)


def _install_map(state, adapter, target) -> None:
    joint = target.kind.cross_attention is None
    attn = target.part(target.kind.self_attention if joint else target.kind.cross_attention)
    signature = Signature.of(attn)
    wan = not joint and is_wan_attention(attn)  # told once here: the hook is traced under torch.compile

    def before_attn2(module, args, kwargs):
        if state.skipping or state.repeat:  # the map is the conditional call's (the first of a two-call CFG step)
            return
        hidden = signature.read(args, kwargs, "hidden_states")
        context = signature.read(args, kwargs, "encoder_hidden_states")
        if context is None:
            return
        grid = adapter.grid(state.latent_hw, target, hidden.shape[1])
        with torch.no_grad():
            if joint:
                rotary = signature.read(args, kwargs, target.kind.rotary) if target.kind.rotary else None
                scores = joint_text_map(module, hidden, context, rotary)
            elif wan:
                scores = wan_text_map(module, hidden, context)
            else:
                scores = crossattn_map(module, hidden, context, signature.read(args, kwargs, "attention_mask"))
        if state.guided is not None:
            scores = state.guided.part(scores, state.guided.cond)
        state.importance = scores.view(-1, *grid)

    # Prepended: it sees the attention's input before a merge hook on the same module shortens it.
    state.handles.append(attn.register_forward_pre_hook(before_attn2, with_kwargs=True, prepend=True))
