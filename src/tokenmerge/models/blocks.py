"""The block registry: which transformer block classes tokenmerge patches, and what it needs to know of each.

Adapters find blocks by what they are (``isinstance`` of a registered class, so subclasses count), never by a
class-name string, and the hooks read a block's parts and arguments by the names its :class:`BlockKind` gives,
as diffusers' own block metadata (``diffusers.hooks._helpers.TransformerBlockRegistry``) does for its caches.
A new block class (a new family's, or a user's own block) is one :func:`register_block` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class BlockKind:
    """What the hooks need of one transformer block class.

    Attributes:
        tokens: the ``forward`` argument that carries the block's image tokens ``(B, N, C)``, which the plan is
            built from.
        self_attention: the attribute of the attention over the block's own tokens (merged around, with the size
            bias and K/V-only merging).
        cross_attention: the attribute of the attention from the tokens to the text (queries merged;
            ``importance="crossattn"`` reads its map), or None.
        mlp: the attribute of the feed-forward (merged with ``merge_mlp``), or None.
        dual_attention: a second attention over the block's own tokens only (SD3.5's ``attn2``), merged with
            ``merge_attn``, or None.
        text_first: the block argument whose tokens the block puts before its image tokens in the one sequence its
            parts see (FLUX's single-stream blocks: ``[text; image]``); those rows pass every part whole. None: the
            parts see the image tokens alone.
        fused_out: a projection over the attention's and the MLP's outputs side by side (FLUX's single-stream
            ``proj_out``): when both are merged, their outputs stay merged and this one's output is unmerged.
        rotary: the attention argument with the rotary ``(cos, sin)`` rows of ``[text; image]`` (FLUX's
            ``image_rotary_emb``): a merged call rotates each kept token by its own row (:mod:`tokenmerge.rotary`).
        rotary_per_sample: the processor broadcasts rows per sample (Wan's ``rotary_emb``): a merged call is given
            the kept tokens' rows; False (FLUX): it gets none, and its q/k norms' outputs are rotated.

    A self-attention that is joint (called with the text as ``encoder_hidden_states``, attending ``[image; text]``
    in one softmax and returning ``(image, text)``: SD3's ``attn``) has only its image tokens merged; the text
    passes whole.
    """

    tokens: str = "hidden_states"
    self_attention: str = "attn1"
    cross_attention: str | None = "attn2"
    mlp: str | None = "ff"
    dual_attention: str | None = None
    text_first: str | None = None
    fused_out: str | None = None
    rotary: str | None = None
    rotary_per_sample: bool = False

    def parts(self, merge_attn: bool, merge_crossattn: bool, merge_mlp: bool) -> tuple[str, ...]:
        """The attribute names of the parts to merge around, in call order."""
        wanted = ((self.self_attention, merge_attn), (self.dual_attention, merge_attn),
                  (self.cross_attention, merge_crossattn), (self.mlp, merge_mlp))
        return tuple(name for name, on in wanted if on and name is not None)


_REGISTRY: dict[type, BlockKind] = {}
_BUILTINS_LOADED = False


def register_block(cls: type[nn.Module], kind: BlockKind | None = None) -> None:
    """Make ``cls`` (and its subclasses) a block the adapters patch, described by ``kind``."""
    _REGISTRY[cls] = kind or BlockKind()


def _load_builtins() -> None:
    """diffusers' blocks, registered on first use (importing them at module import would slow ``import tokenmerge``)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock

    # SD / SDXL / LCM / Zero123++ U-Nets, PixArt, DiT, and AnimateDiff's spatial blocks and motion modules.
    _REGISTRY.setdefault(BasicTransformerBlock, BlockKind())
    # SD3 / SD3.5: a joint image-text attention, SD3.5's image-only second attention, the image MLP (the text's own
    # MLP, ff_context, is never merged).
    _REGISTRY.setdefault(JointTransformerBlock, BlockKind(self_attention="attn", cross_attention=None,
                                                          dual_attention="attn2"))
    try:  # Wan 2.1 / 2.2 (diffusers >= 0.35: WanAttention, rotary rows as (cos, sin))
        from diffusers.models.transformers.transformer_wan import WanAttention, WanTransformerBlock
    except ImportError:
        pass
    else:
        del WanAttention
        # Self-attention over every frame's tokens with 3-D rotary rows, cross-attention to the text, the MLP.
        _REGISTRY.setdefault(WanTransformerBlock, BlockKind(mlp="ffn", rotary="rotary_emb", rotary_per_sample=True))
    try:  # FLUX.1 (diffusers >= 0.35: single-stream blocks take the text apart, FluxAttention)
        from diffusers.models.transformers.transformer_flux import (
            FluxAttention, FluxSingleTransformerBlock, FluxTransformerBlock)
    except ImportError:
        return
    del FluxAttention
    # Double stream: a joint attention over [text; image] with rotary rows, the image MLP (ff_context never merged).
    _REGISTRY.setdefault(FluxTransformerBlock, BlockKind(self_attention="attn", cross_attention=None,
                                                         rotary="image_rotary_emb"))
    # Single stream: attention and MLP branch side by side on [text; image], joined by proj_out.
    _REGISTRY.setdefault(FluxSingleTransformerBlock, BlockKind(
        self_attention="attn", cross_attention=None, mlp="proj_mlp", text_first="encoder_hidden_states",
        fused_out="proj_out", rotary="image_rotary_emb"))


def kind_of(module: nn.Module) -> BlockKind | None:
    """The registered kind of ``module``'s class or nearest registered base class; None if it is not a block."""
    _load_builtins()
    for cls in type(module).__mro__:
        kind = _REGISTRY.get(cls)
        if kind is not None:
            return kind
    return None


def find_blocks(root: nn.Module, keep: Callable[[str], bool] = lambda name: True,
                prefix: str = "") -> Iterator[tuple[str, nn.Module, BlockKind]]:
    """``(name, block, kind)`` of every registered block under ``root`` whose module path passes ``keep``.

    ``prefix`` is ``root``'s own path in the model, so names are the model's (``down_blocks.0...``). A block
    inside a block (none of diffusers' do this) is found once, as the outer one.
    """
    def walk(module: nn.Module, path: str) -> Iterator[tuple[str, nn.Module, BlockKind]]:
        for child_name, child in module.named_children():
            name = f"{path}.{child_name}" if path else child_name
            kind = kind_of(child)
            if kind is None:
                yield from walk(child, name)
            elif keep(name):
                yield name, child, kind

    yield from walk(root, prefix)
