"""The testbed pipeline's mechanics (the shipped weights come with the training issue): build, save, load,
tokenize, generate deterministically, and patch with every method."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenmerge
from tokenmerge.testbed.pipeline import TestbedPipeline, build_models, build_tokenizer, load_testbed


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    unet, text_encoder, tokenizer, scheduler = build_models(width=16)
    path = tmp_path_factory.mktemp("testbed") / "pipe"
    TestbedPipeline(unet, text_encoder, tokenizer, scheduler).save_pretrained(path, safe_serialization=True)
    return path


def generate(pipe, seed=0, **kwargs):
    return pipe(["a small red dotted square at the top left on a white background"] * 2, num_inference_steps=4,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_tokenizer_knows_every_caption_word():
    tokenizer = build_tokenizer()
    ids = tokenizer("a large blue striped triangle in the center on a gray background").input_ids
    assert tokenizer.unk_token_id not in ids and ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id in tokenizer("a unicorn").input_ids


def test_saved_pipeline_loads_and_generates_deterministically(saved):
    pipe = load_testbed(saved)
    first, second = generate(pipe), generate(pipe)
    assert first.shape == (2, 32, 32, 3) and np.array_equal(first, second)
    assert not np.array_equal(first, generate(pipe, seed=1))


@pytest.mark.parametrize("folder", ["saved", "shipped"])
def test_the_testbed_is_saved_in_the_form_transformers_4_and_5_load(saved, folder):
    """transformers 5 writes the tokenizer class as ``TokenizersBackend``, which transformers 4 (the oldest the
    project declares) lacks, and drops the text encoder's ``text_model.`` weight prefix, without which transformers
    4 initialises every weight at random (and says so only in a log line)."""
    import json

    from safetensors import safe_open

    from tokenmerge.testbed.pipeline import WEIGHTS_DIR

    path = saved if folder == "saved" else WEIGHTS_DIR
    index = json.loads((path / "model_index.json").read_text())
    config = json.loads((path / "tokenizer" / "tokenizer_config.json").read_text())
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    with safe_open(path / "text_encoder" / "model.safetensors", "pt") as weights:
        assert all(key.startswith("text_model.") for key in weights.keys())


@pytest.mark.parametrize("config", [tokenmerge.ToMe(ratio=0.5, seed=0), tokenmerge.ImportanceMerge(seed=0),
                                    tokenmerge.ReToM(seed=0), tokenmerge.SiTo(seed=0), tokenmerge.ToFu(seed=0)],
                         ids=lambda c: type(c).__name__)
def test_every_method_patches_the_testbed(saved, config):
    pipe = load_testbed(saved)
    unpatched = generate(pipe)
    with tokenmerge.patched(pipe, config):
        merged = generate(pipe)
    assert np.isfinite(merged).all() and not np.array_equal(merged, unpatched)
    assert np.array_equal(generate(pipe), unpatched)


def test_missing_folder_says_how_to_train(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenmerge.testbed.train"):
        load_testbed(tmp_path / "nothing")
