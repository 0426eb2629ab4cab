"""Tiny text encoders and tokenizers built offline, as diffusers' fast tests build theirs (which download
``hf-internal-testing``'s): shared by the pipeline tests."""

from __future__ import annotations

import torch

#: The words of the test prompts (others map to ``<unk>``).
WORDS = ("a", "painting", "of", "squirrel", "red", "circle", "cat")


def clip_text_encoder(with_projection: bool = False):
    """diffusers' fast-test CLIP text encoder (5 layers, width 32, vocabulary 1000)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
                            num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000,
                            projection_dim=32, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def t5_parts(width: int = 32) -> dict:
    """A 2-layer T5 encoder of ``width`` and a word-level tokenizer (``hf-internal-testing/tiny-random-t5``'s part)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    words = ["<pad>", "</s>", "<unk>", *WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    torch.manual_seed(0)
    encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=width, d_ff=37, d_kv=8, num_layers=2, num_heads=4))
    return dict(text_encoder=encoder.eval(), tokenizer=PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"))
