"""Self-attention on merged tokens: size-aware keys and K/V-only merging, through the call's arguments.

A merged slot enters self-attention as one key however many tokens it stands for. With
``proportional_attention`` each kept slot's key gets ``log(members)`` added to its logits (ToMe for ViTs'
proportional attention): a slot of ``k`` identical tokens then weighs in every softmax exactly as its ``k`` tokens
did. With ``merge_queries=False`` the queries stay whole and only keys and values are merged (ToDo's idea), so
the output needs no unmerge. Neither needs a copied ``forward`` or processor:

* ``bias_via="mask"``: the bias is an additive ``attention_mask`` ``(B, 1, M)``, which every diffusers processor
  adds to the logits (``prepare_attention_mask``); a user's own mask over the ``N`` tokens is merged into it
  (log-sum-exp over each slot's members, :meth:`MergePlan.merge_logits`), never replaced.
* K/V-only: the merged tokens go in as ``encoder_hidden_states`` (the processor computes keys and values from
  them), the queries from the untouched ``hidden_states``.
* ``bias_via="channel"``: a float mask takes SDPA off its flash kernel on a GPU. Instead, forward hooks on
  ``to_q``/``to_k``/``to_v`` append one channel per head (``1`` on the queries, ``log(members)`` on the keys,
  scaled so the dot product adds exactly the bias; the head dim padded with zeros to a multiple of 8, the
  original channels rescaled where the processor's scale follows the head dim), and a pre-hook on ``to_out[0]``
  drops the padding again. No float mask reaches the kernel.

Which processors do what with the mask and ``encoder_hidden_states`` is read from :data:`PROCESSORS`; a processor
that cannot take what a config asks for raises, naming it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .arguments import Signature
from .plan import MergePlan


@dataclass(frozen=True)
class ProcessorTraits:
    """How a diffusers attention processor treats the arguments tokenmerge passes.

    Attributes:
        mask_keys: the mask is prepared for the key length (False: for the query length, so a mask over merged
            keys needs merged queries).
        scale: ``"attn"``: the logits are scaled by ``attn.scale``; ``"head_dim"``: by ``1/sqrt(head dim)`` of the
            tensors it is given (SDPA's default).
        channel: queries, keys and values come from ``attn.to_q/to_k/to_v`` and the output goes through
            ``attn.to_out[0]``, with the head dim read from the keys (``bias_via="channel"`` works).
        own_keys: keys and values come from ``hidden_states`` even when ``encoder_hidden_states`` is given (so
            ``merge_queries=False`` cannot pass merged keys).
        masked_part: ``(n, d)``: only the first ``n/d`` of the batch goes through attention with the mask (PAG
            splits off its perturbed part, whose identity attention has no keys), so the mask has those rows.
    """

    mask_keys: bool = True
    scale: str = "head_dim"
    channel: bool = True
    own_keys: bool = False
    masked_part: tuple[int, int] = (1, 1)


#: The processors diffusers ships for the attention of the blocks tokenmerge patches, by class name (a subclass
#: takes its base's traits). PEFT LoRA wraps the projections, not the processor, so it needs no entry.
PROCESSORS: dict[str, ProcessorTraits] = {
    "AttnProcessor2_0": ProcessorTraits(),
    "AttnProcessor": ProcessorTraits(scale="attn"),
    "SlicedAttnProcessor": ProcessorTraits(scale="attn"),
    "XFormersAttnProcessor": ProcessorTraits(scale="attn"),
    "FusedAttnProcessor2_0": ProcessorTraits(channel=False),  # one to_qkv projection
    "AttnProcessorNPU": ProcessorTraits(channel=False),
    "IPAdapterAttnProcessor2_0": ProcessorTraits(channel=False),
    "IPAdapterAttnProcessor": ProcessorTraits(scale="attn", channel=False),
    "IPAdapterXFormersAttnProcessor": ProcessorTraits(scale="attn", channel=False),
    "CustomDiffusionAttnProcessor2_0": ProcessorTraits(mask_keys=False, channel=False),
    "CustomDiffusionAttnProcessor": ProcessorTraits(mask_keys=False, scale="attn", channel=False),
    "CustomDiffusionXFormersAttnProcessor": ProcessorTraits(scale="attn", channel=False),
    # Perturbed-attention guidance: [cond; perturbed] and [uncond; cond; perturbed], split by the processor.
    "PAGIdentitySelfAttnProcessor2_0": ProcessorTraits(channel=False, own_keys=True, masked_part=(1, 2)),
    "PAGCFGIdentitySelfAttnProcessor2_0": ProcessorTraits(channel=False, own_keys=True, masked_part=(2, 3)),
}


def known_traits(module: torch.nn.Module) -> ProcessorTraits | None:
    """The traits of ``module``'s processor (or of its nearest known base class), or None when it is unknown."""
    for cls in type(getattr(module, "processor", None)).__mro__:
        if cls.__name__ in PROCESSORS:
            return PROCESSORS[cls.__name__]
    return None


def processor_traits(module: torch.nn.Module, needs: str) -> ProcessorTraits:
    """The traits of ``module``'s processor; raises ``ValueError`` naming it when it is unknown.

    ``needs`` says what the config asked for, for the message.
    """
    traits = known_traits(module)
    if traits is not None:
        return traits
    raise ValueError(
        f"tokenmerge: {needs} needs to know how the attention processor treats attention_mask and "
        f"encoder_hidden_states, and {type(module.processor).__name__} is not one tokenmerge knows (known: "
        f"{', '.join(PROCESSORS)}). Set a diffusers processor (e.g. pipe.unet.set_attn_processor(AttnProcessor2_0())), "
        "or leave proportional_attention=False and merge_queries=True."
    )


def key_logits(mask: torch.Tensor, batch: int, num_tokens: int) -> torch.Tensor:
    """A user's self-attention mask as ``(B, N)`` additive float logits (a boolean mask: True keeps the key)."""
    if mask.shape[-1] != num_tokens or mask.numel() != batch * num_tokens or mask.shape[0] != batch:
        raise ValueError(
            f"tokenmerge: the self-attention mask has shape {tuple(mask.shape)}; merging supports one bias per key "
            f"({batch}, {num_tokens}) or ({batch}, 1, {num_tokens}); leave self-attention unmerged "
            "(merge_attn=False) for a mask with a query dimension."
        )
    mask = mask.reshape(batch, num_tokens)
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, -math.inf)
    return mask.float()


@dataclass
class ChannelBias:
    """What the projection hooks of ``bias_via="channel"`` add during one attention call."""

    log_sizes: torch.Tensor  # (B, M)
    scale: str  # ProcessorTraits.scale


def self_attention_arguments(module: torch.nn.Module, signature: Signature, args: tuple, kwargs: dict,
                             plan: MergePlan, config) -> tuple[tuple, dict, ChannelBias | None]:
    """The self-attention call on merged tokens: ``(args, kwargs)`` to call ``module`` with, and the channel bias.

    Merged queries (default): ``hidden_states`` replaced by the merged tokens. K/V-only: the merged tokens passed
    as ``encoder_hidden_states``. The size bias (and a user's mask, merged) as ``attention_mask``, or for
    ``bias_via="channel"`` returned for the projection hooks.
    """
    x = signature.read(args, kwargs, "hidden_states")
    merged = plan.merge(x)
    user_mask = signature.read(args, kwargs, "attention_mask")
    sized = config.proportional_attention and (config.count_pruned or not plan.prune)
    channel = sized and config.bias_via == "channel"
    traits = None
    if not config.merge_queries or sized:
        wanted = [name for name, on in ((f"proportional_attention (bias_via={config.bias_via!r})", sized),
                                        ("merge_queries=False", not config.merge_queries)) if on]
        traits = processor_traits(module, " with ".join(wanted))
        if channel and not traits.channel:
            raise ValueError(
                f"tokenmerge: bias_via='channel' adds a channel to the outputs of to_q/to_k/to_v, which "
                f"{type(module.processor).__name__} does not use separately; use bias_via='mask'"
            )
        if channel and (getattr(module, "norm_q", None) is not None or getattr(module, "norm_k", None) is not None):
            raise ValueError(
                "tokenmerge: bias_via='channel' cannot pass through the q/k normalisation of this attention "
                f"({type(module).__name__} with qk_norm); use bias_via='mask'"
            )
        if not config.merge_queries and traits.own_keys:
            raise ValueError(
                f"tokenmerge: merge_queries=False passes the merged tokens as encoder_hidden_states, but "
                f"{type(module.processor).__name__} computes keys and values from its own input (perturbed-attention "
                "guidance); leave merge_queries=True"
            )
        if user_mask is not None and not config.merge_queries and not traits.mask_keys:
            raise ValueError(
                f"tokenmerge: {type(module.processor).__name__} pads the attention mask to the query length, so a "
                "mask over merged keys cannot pass with merge_queries=False; leave merge_queries=True"
            )
    bias = None
    if user_mask is not None:
        bias = plan.merge_logits(key_logits(user_mask, *x.shape[:2]), config.count_pruned)
        if not sized or channel:  # the slot's members count once: their mean weight
            bias = bias - plan.log_sizes(torch.float32, config.count_pruned)
    elif sized and not channel:
        bias = plan.log_sizes(x.dtype, config.count_pruned)
    if bias is not None:
        part, whole = (traits or known_traits(module) or ProcessorTraits()).masked_part
        bias = bias[: bias.shape[0] * part // whole]  # the rows the processor attends with the mask
        args, kwargs = signature.replace(args, kwargs, "attention_mask", bias.to(x.dtype)[:, None, :])
    if config.merge_queries:
        args, kwargs = signature.replace(args, kwargs, "hidden_states", merged)
    else:
        args, kwargs = signature.replace(args, kwargs, "encoder_hidden_states", merged)
    channel_bias = ChannelBias(plan.log_sizes(torch.float32, config.count_pruned), traits.scale) if channel else None
    return args, kwargs, channel_bias


def padded_head_dim(head_dim: int) -> int:
    """The head dim with room for the bias channel, rounded up to a multiple of 8 (what fused kernels take)."""
    return (head_dim + 1 + 7) // 8 * 8


def _split_heads(y: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = y.shape
    return y.view(batch, tokens, heads, inner // heads)


def _pad(y4: torch.Tensor, width: int, extra: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, L, h, d) -> (B, L, h * width)``: the ``d`` channels, ``extra`` (``(B, L, h, 1)``) if given, zeros."""
    parts = [y4] if extra is None else [y4, extra]
    used = sum(part.shape[-1] for part in parts)
    parts.append(y4.new_zeros(*y4.shape[:3], width - used))
    return torch.cat(parts, dim=-1).flatten(2)


def pad_query(attn, q: torch.Tensor, bias: ChannelBias) -> torch.Tensor:
    q4 = _split_heads(q, attn.heads)
    dim = q4.shape[-1]
    width = padded_head_dim(dim)
    if bias.scale == "head_dim":  # the kernel scales by 1/sqrt(width): keep q.k's scale 1/sqrt(dim)
        q4 = q4 * math.sqrt(width / dim)
    return _pad(q4, width, q4.new_ones(*q4.shape[:3], 1))


def pad_key(attn, k: torch.Tensor, bias: ChannelBias) -> torch.Tensor:
    k4 = _split_heads(k, attn.heads)
    batch, tokens, heads, dim = k4.shape
    width = padded_head_dim(dim)
    log_sizes = bias.log_sizes
    if log_sizes.shape != (batch, tokens):
        raise RuntimeError(
            f"tokenmerge: bias_via='channel' expected keys for {tuple(log_sizes.shape)} merged tokens, got "
            f"{(batch, tokens)}: the attention processor changed the keys' layout; use bias_via='mask'"
        )
    per_logit = math.sqrt(width) if bias.scale == "head_dim" else 1.0 / attn.scale
    extra = (log_sizes * per_logit).to(k.dtype)[:, :, None, None].expand(batch, tokens, heads, 1)
    return _pad(k4, width, extra)


def pad_value(attn, v: torch.Tensor, bias: ChannelBias) -> torch.Tensor:
    v4 = _split_heads(v, attn.heads)
    return _pad(v4, padded_head_dim(v4.shape[-1]))


def unpad_output(attn, y: torch.Tensor, head_dim: int) -> torch.Tensor:
    batch, tokens, _ = y.shape
    return _split_heads(y, attn.heads)[..., :head_dim].reshape(batch, tokens, attn.heads * head_dim)
