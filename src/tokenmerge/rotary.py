"""Rotary positions of merged tokens (FLUX, Wan): every kept token is rotated by its own row, never by an average.

FLUX's attention processor rotates the queries and keys of ``[text; image]`` by ``image_rotary_emb = (cos, sin)``,
one ``(D,)`` row per token, shared by the batch (``(T + N, D)``). A plan keeps other tokens in each sample, so the
rows of a merged call are per sample, ``(B, T + M, D)``, which diffusers' ``apply_rotary_emb`` does not broadcast.
A merged call therefore gets no rotary argument, and forward hooks on the attention's q/k norms (the processor's
last step before it rotates) rotate their outputs by the kept tokens' rows, with ``apply_rotary_emb``'s arithmetic:
a slot stands at its kept token's position (a merged slot at its destination's; averaging cos and sin would not be
a rotation). Rotating text and image apart before the processor joins them equals rotating the joined sequence.

Wan's processor broadcasts its rows ``(1, N, 1, D)`` against the queries ``(B, N, heads, D)``, so per-sample rows
``(B, M, 1, D)`` pass through it as they are: a merged call is given the kept tokens' rows (:func:`kept_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import MergePlan, arange_of


@dataclass
class Rotation:
    """The rotary rows of one merged attention call: ``cos`` and ``sin`` ``(B, T + M, D)``, text first."""

    cos: torch.Tensor
    sin: torch.Tensor
    text: int

    @classmethod
    def of_kept(cls, freqs: object, plan: MergePlan, text: int) -> Rotation:
        """The rows of the ``text`` text tokens and of the plan's kept image tokens, from the unmerged call's
        ``(cos, sin)`` over ``[text; image]``."""
        if not (isinstance(freqs, (tuple, list)) and len(freqs) == 2
                and freqs[0].shape[0] == text + plan.num_tokens and freqs[0].ndim == 2):
            shape = tuple(freqs[0].shape) if isinstance(freqs, (tuple, list)) else type(freqs).__name__
            raise ValueError(
                f"tokenmerge: merging FLUX needs the rotary embedding as (cos, sin) rows of shape ({text} text + "
                f"{plan.num_tokens} image tokens, D), as diffusers >= 0.35 passes it; got {shape}"
            )
        index = torch.cat([arange_of(text, plan.kept.device).expand(plan.batch_size, -1), plan.kept + text], dim=1)
        cos, sin = freqs
        return cls(cos[index], sin[index], text)

    def apply(self, x: torch.Tensor, text_only: bool = False) -> torch.Tensor:
        """``x (B, S, heads, D)`` rotated: the text's rows (``text_only``), the image's (``S = M``) or all
        (``S = T + M``)."""
        cos, sin = self.cos, self.sin
        if text_only:
            cos, sin = cos[:, : self.text], sin[:, : self.text]
        elif x.shape[1] != cos.shape[1]:
            cos, sin = cos[:, self.text:], sin[:, self.text:]
        if x.shape[1] != cos.shape[1]:
            raise RuntimeError(
                f"tokenmerge: rotary rows for {cos.shape[1]} tokens met queries of shape {tuple(x.shape)}; the "
                "attention processor lays out its queries otherwise than diffusers' FluxAttnProcessor"
            )
        return rotate(x, cos[:, :, None].to(x.device), sin[:, :, None].to(x.device))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_emb(x, (cos, sin), sequence_dim=1)`` with rows that broadcast against ``x`` (pairs of
    adjacent channels rotated, as FLUX does), in the same arithmetic, so equal rows give equal bits."""
    real, imag = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    turned = torch.stack([-imag, real], dim=-1).flatten(3)
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def kept_rows(freqs: object, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's ``(cos, sin)``, each ``(1, N, 1, D)``, at the plan's kept tokens: ``(B, M, 1, D)`` each."""
    if not (isinstance(freqs, (tuple, list)) and len(freqs) == 2 and freqs[0].ndim == 4
            and freqs[0].shape[:3] == (1, plan.num_tokens, 1)):
        shape = tuple(freqs[0].shape) if isinstance(freqs, (tuple, list)) else type(freqs).__name__
        raise ValueError(
            f"tokenmerge: merging Wan needs its rotary embedding as (cos, sin) rows of shape (1, {plan.num_tokens}, 1, "
            f"D), as diffusers >= 0.35 passes it; got {shape}"
        )
    return tuple(part[0, :, 0][plan.kept][:, :, None] for part in freqs)
