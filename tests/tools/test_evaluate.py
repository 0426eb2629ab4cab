"""``tokenmerge eval`` end to end on a tiny untrained testbed and a tiny SD pipeline, its metrics, its errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import tokenmerge
from tokenmerge import ImportanceMerge, presets
from tokenmerge.models import adapter_for, tiny_configs
from tokenmerge.tools import cli, evaluate
from tokenmerge.tools.evaluate.run import _patched
from tokenmerge.testbed.data import ATTRIBUTES, make_batch, sample_scenes
from tokenmerge.testbed.judge import load_judge, to_tensor
from tokenmerge.testbed import pipeline as testbed_pipeline
from tokenmerge.tools.tiny import save_tiny_pipeline, tiny_denoiser

SMALL = ["--count", "4", "--seeds", "0", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def testbed_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("testbed") / "pipe"
    pipe = testbed_pipeline.TestbedPipeline(*testbed_pipeline.build_models(width=16))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd") / "pipe", "sd1")


@pytest.fixture(scope="module")
def api_run(testbed_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    messages: list[str] = []
    result = evaluate.evaluate(testbed_dir, methods="tome,importance", ratios=[0.5], split="heldout", count=4,
                               seeds=[0], steps=2, batch=3, out=out, progress=False, log=messages.append)
    return result, out, messages


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------- end to end, testbed

def test_api_writes_every_file_with_one_row_per_method_ratio_plus_unpatched(api_run):
    result, out, messages = api_run
    for name in evaluate.RESULT_FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0
        assert result.files[name] == out / name
    labels = [(row["method"], row["ratio"]) for row in result.rows]
    assert labels == [("unpatched", None), ("tome", 0.5), ("importance", 0.5)]
    assert [(row["method"], row["ratio"]) for row in read_csv(out / "results.csv")] == [
        ("unpatched", ""), ("tome", "0.5"), ("importance", "0.5")]
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == 3 and payload["settings"]["count"] == 4
    table = (out / "results.md").read_text()
    assert "| method | ratio |" in table and table.count("\n| importance | 0.5 |") == 1
    assert any(message.startswith("| method |") for message in messages)  # the table is printed
    grid = Image.open(out / "grid.png")
    assert grid.height > 3 * evaluate.GRID_CELL and grid.width > 4 * evaluate.GRID_CELL  # 3 rows, 4 prompts


def test_unpatched_is_compared_with_itself_and_methods_with_it(api_run):
    result, out, _ = api_run
    reference = result.row("unpatched")
    assert reference["psnr"] is None or reference["psnr"] == math.inf
    assert reference["ssim"] == pytest.approx(1.0, abs=1e-5) and reference["speedup"] == 1.0
    assert json.loads((out / "results.json").read_text())["rows"][0]["psnr"] in (None, "inf")  # strict JSON
    for method in ("tome", "importance"):
        row = result.row(method, 0.5)
        assert 0 < row["psnr"] < math.inf and row["ssim"] <= 1.0 + 1e-6
        assert row["seconds_per_image"] > 0 and row["speedup"] > 0 and row["n"] == 4


def test_judge_metrics_are_in_range(api_run):
    result, _, _ = api_run
    for row in result.rows:
        assert 0.0 <= row["accuracy"] <= 1.0
        for name in ATTRIBUTES:
            assert 0.0 <= row[f"accuracy_{name}"] <= 1.0
        assert row["accuracy"] <= min(row[f"accuracy_{name}"] for name in ATTRIBUTES)
        assert row["fd"] >= 0 and math.isfinite(row["fd"])
        assert row["clip_score"] is None and row["fid"] is None


def test_lpips_without_weights_is_skipped_with_one_line_and_null(api_run):
    result, out, messages = api_run
    skipped = [message for message in messages if message.startswith("LPIPS skipped")]
    assert len(skipped) == 1 and "\n" not in skipped[0] and "torchvision" in skipped[0]
    assert all(row["lpips"] is None for row in result.rows)
    assert skipped[0] in json.loads((out / "results.json").read_text())["notes"]


def test_cli_eval_on_the_testbed(testbed_dir, tmp_path, capsys):
    cli.main(["eval", "--model", str(testbed_dir), "--methods", "tome,sito", "--ratios", "0.5", "--split", "heldout",
              *SMALL, "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "results.csv")
    assert [(row["method"], row["ratio"]) for row in rows] == [("unpatched", ""), ("tome", "0.5"), ("sito", "0.5")]
    assert all(0 <= float(row["accuracy"]) <= 1 and float(row["fd"]) >= 0 and row["n"] == "4" for row in rows)
    printed = capsys.readouterr().out
    assert "| sito | 0.5 |" in printed and "results.csv" in printed


# ------------------------------------------------------------------------------- end to end, a tiny SD model

def test_sd_pipeline_with_a_prompts_file_has_no_judge_metrics(sd_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\n  a cute owl  \nan old tree\n")
    cli.main(["eval", "--model", str(sd_dir), "--methods", "tome:0.5,importance:0.7", "--prompts", str(prompts),
              "--steps", "2", "--height", "64", "--width", "64", "--batch", "2", "--no-progress",
              "--out", str(tmp_path / "out")])
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["settings"]["count"] == 3 and payload["settings"]["image_size"] == [64, 64]
    assert [(row["method"], row["ratio"]) for row in payload["rows"]] == [("unpatched", None), ("tome", 0.5),
                                                                          ("importance", 0.7)]
    for row in payload["rows"]:
        assert row["accuracy"] is None and row["fd"] is None and row["n"] == 3
        assert row["ssim"] <= 1 + 1e-6
    assert all((tmp_path / "out" / name).is_file() for name in evaluate.RESULT_FILES)


class TinyInception(nn.Module):
    """Stands in for the FID Inception network (its weights cannot be downloaded here): uint8 images -> 8-d."""

    num_features = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images.float() / 255).mean((2, 3))


def tiny_clip(path: Path) -> Path:
    """A random-weight CLIP model and processor saved like a downloaded one (byte-level tokenizer, 32 px)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tokenmerge.tools.tiny import _char_tokenizer

    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=514,
                max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, image_size=32,
                  patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=_char_tokenizer()).save_pretrained(path)
    return path


def test_clip_fid_and_lpips_code_paths_with_stand_in_networks(sd_dir, tmp_path, monkeypatch):
    """The real-model metrics run end to end on stand-ins (a random tiny CLIP, a tiny "Inception", MAE for LPIPS),
    with a COCO-style captions file as both the prompts and the FID reference."""
    import torchmetrics.utilities.imports
    from torchmetrics.regression import MeanAbsoluteError

    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", True)
    monkeypatch.setattr(evaluate.run, "inception_module", lambda weights: TinyInception())
    monkeypatch.setattr(evaluate.run, "lpips_status", lambda: None)
    monkeypatch.setattr(evaluate.run, "make_lpips", MeanAbsoluteError)
    (tmp_path / "val").mkdir()
    images = [{"id": i, "file_name": f"val/{i}.png"} for i in (7, 3, 5)]
    for image in images:
        pixels = np.random.default_rng(image["id"]).integers(0, 256, (48, 80, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / image["file_name"])
    notes = [{"id": 1, "image_id": 3, "caption": "a red  circle"}, {"id": 2, "image_id": 7, "caption": "a cute owl"},
             {"id": 3, "image_id": 3, "caption": "second caption"}, {"id": 4, "image_id": 5, "caption": "a tree"}]
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"images": images, "annotations": notes}))
    assert [caption for caption, _ in evaluate.read_coco_captions(coco)] == ["a red circle", "a tree", "a cute owl"]
    (tmp_path / "inception.pth").write_bytes(b"stand-in")

    result = evaluate.evaluate(sd_dir, methods="tome:0.5", prompts=coco, steps=2, height=64, width=64, batch=2,
                               clip_model=tiny_clip(tmp_path / "clip"), fid_reference=coco,
                               inception_weights=tmp_path / "inception.pth", save_images=True,
                               out=tmp_path / "out", progress=False, log=lambda message: None)
    reference, merged = result.rows
    assert reference["lpips"] == 0.0 and merged["lpips"] > 0
    for row in result.rows:
        assert row["clip_score"] is not None and row["clip_score"] >= 0
        assert row["fid"] is not None and row["fid"] >= 0 and row["n"] == 3
    assert sorted(p.name for p in (tmp_path / "out" / "images" / "tome-0.5").iterdir()) == [
        "00000_seed0.png", "00001_seed0.png", "00002_seed0.png"]


# ------------------------------------------------------------------------------------------------ errors

def eval_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", *argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_model_folder(tmp_path, capsys):
    err = eval_error(["--model", str(tmp_path / "nothing"), *SMALL, "--out", str(tmp_path)], capsys)
    assert "nothing: no such folder" in err


def test_missing_testbed_weights_say_how_to_train_or_pass_a_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("tokenmerge.testbed.pipeline.WEIGHTS_DIR", tmp_path / "no-weights")
    err = eval_error([*SMALL, "--out", str(tmp_path)], capsys)
    assert "not trained" in err and "python -m tokenmerge.testbed.train" in err and "--model" in err


def test_prompts_file_without_prompts(testbed_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    err = eval_error(["--model", str(testbed_dir), "--prompts", str(empty), "--out", str(tmp_path)], capsys)
    assert "has no prompts" in err
    err = eval_error(["--model", str(testbed_dir), "--prompts", str(tmp_path / "absent.txt"), "--out",
                      str(tmp_path)], capsys)
    assert "does not exist" in err


def test_unknown_method_lists_the_known_ones(testbed_dir, tmp_path, capsys):
    err = eval_error(["--model", str(testbed_dir), "--methods", "tome,magic", *SMALL, "--out", str(tmp_path)], capsys)
    assert "unknown method 'magic'" in err and "tome, importance, retom, sito, tofu" in err


@pytest.mark.parametrize("options", [["--methods", "tome", "--ratios", "0.9"], ["--methods", "tome:0.9"]])
def test_ratio_out_of_range_gives_the_config_message(testbed_dir, tmp_path, capsys, options):
    err = eval_error(["--model", str(testbed_dir), *options, *SMALL, "--out", str(tmp_path)], capsys)
    assert "ToMe.ratio must be in [0, 0.75], got 0.9" in err


@pytest.mark.parametrize("options, named", [
    (["--clip-model", "{tmp}/no-clip"], "--clip-model"),
    (["--fid-reference", "{tmp}/no-images"], "--fid-reference"),
    (["--fid-reference", "{tmp}", "--inception-weights", "{tmp}/no.pth"], "--inception-weights"),
    (["--fid-reference", "{tmp}"], "--inception-weights FILE"),
    (["--methods", "importance", "--guidance", "1"], "guidance"),
], ids=["clip", "fid-reference", "inception-file", "inception-missing", "guidance"])
def test_missing_metric_weights_and_bad_settings(testbed_dir, tmp_path, capsys, options, named):
    Image.new("RGB", (8, 8)).save(tmp_path / "reference.png")
    options = [option.replace("{tmp}", str(tmp_path)) for option in options]
    err = eval_error(["--model", str(testbed_dir), *options, *SMALL, "--out", str(tmp_path)], capsys)
    assert named in err


# ------------------------------------------------------------------------------------------ pure helpers

def test_parse_methods_cross_product_explicit_ratios_and_defaults():
    variants = evaluate.parse_methods("tome,importance", [0.5, 0.7])
    assert [(v.method, v.ratio) for v in variants] == [("tome", 0.5), ("tome", 0.7), ("importance", 0.5),
                                                       ("importance", 0.7)]
    variants = evaluate.parse_methods("none, ToMe:0.3,retom,tome:0.3", None)
    assert [(v.method, v.ratio) for v in variants] == [("tome", 0.3), ("retom", 0.5)]
    assert evaluate.parse_methods("", None) == []
    with pytest.raises(evaluate.EvalError, match="bad ratio"):
        evaluate.parse_methods("tome:half")


def test_prompts_from_captions_keep_their_scenes(tmp_path):
    scenes = sample_scenes("heldout", 3)
    path = tmp_path / "captions.txt"
    path.write_text("\n".join(scene.caption for scene in scenes) + "\n")
    assert evaluate.load_prompts(path).scenes == scenes
    assert evaluate.load_prompts(path, count=2).prompts == [scene.caption for scene in scenes[:2]]
    path.write_text(scenes[0].caption + "\na cute owl\n")
    assert evaluate.load_prompts(path).scenes is None
    split = evaluate.load_prompts(None, "heldout", 5)
    assert split.scenes == sample_scenes("heldout", 5) and split.prompts[0] == split.scenes[0].caption


@given(st.integers(0, 60), st.integers(1, 9))
def test_shard_splits_disjointly_and_covers_everything(count, processes):
    items = list(range(count))
    parts = [evaluate.shard(items, processes, rank) for rank in range(processes)]
    assert [item for part in parts for item in part] == items  # disjoint, complete, in order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    batches = evaluate.batches_of(count, 4)
    sharded = [index for rank in range(processes) for batch in evaluate.shard(batches, processes, rank)
               for index in batch]
    assert sharded == items


def numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Brute force: tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2), a symmetric matrix (eigh), unlike the tested
    code's eigenvalues of the product."""
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(sigma_a)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root @ sigma_b @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


def test_frechet_distance_matches_the_brute_force_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6))
    b = rng.normal(0.5, 1.5, size=(250, 6)) @ rng.normal(size=(6, 6))
    assert evaluate.frechet_distance(a, b) == pytest.approx(numpy_frechet(a, b), rel=1e-8)
    assert evaluate.frechet_distance(torch.from_numpy(a).float(), b) == pytest.approx(numpy_frechet(a, b), rel=1e-5)
    assert evaluate.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="feature sets"):
        evaluate.frechet_distance(a, b[:, :3])


def test_fd_of_real_images_against_themselves_is_zero_and_against_other_images_is_not():
    features = evaluate.JudgeFeatures(load_judge(32))
    real, _ = make_batch("heldout", 64, 32)
    other, _ = make_batch("test", 64, 32)
    with torch.no_grad():
        real_features, other_features = features(to_tensor(real)), features(to_tensor(other))
    scale = evaluate.frechet_distance(real_features, other_features)
    assert scale > 0
    assert evaluate.frechet_distance(real_features, real_features) < 1e-4 * scale


def test_parse_methods_reads_config_options_and_keeps_ablations_apart():
    variants = evaluate.parse_methods(
        "importance:0.7, importance[dst_selection=topk]:0.7, importance[independent_from=all;pool=0.5], tome", [0.6])
    assert [(v.method, v.ratio) for v in variants] == [
        ("importance", 0.7), ("importance[dst_selection=topk]", 0.7),
        ("importance[pool=0.5;independent_from=all]", 0.6), ("tome", 0.6)]
    assert variants[1].config.dst_selection == "topk" and variants[2].config.pool == 0.5
    assert variants[1].folder == "importance_dst_selection=topk-0.7"
    assert evaluate.parse_methods([ImportanceMerge(ratio=0.5, dst_selection="topk")])[0].method == \
        "importance[dst_selection=topk]"
    with pytest.raises(evaluate.EvalError, match="bad option 'destinations=topk'.*dst_selection"):
        evaluate.parse_methods("importance[destinations=topk]")
    with pytest.raises(evaluate.EvalError, match="dst_selection"):
        evaluate.parse_methods("importance[dst_selection=best]")


# ------------------------------------------------------------------------------ regions and the noise floor

def test_the_object_region_holds_the_object_of_every_rendering():
    from tokenmerge.testbed.data import BACKGROUNDS, object_mask, render, sample_scenes

    for index, scene in enumerate(sample_scenes("heldout", 40)):
        inside = object_mask(scene, 32)
        assert 0 < inside.sum() < 32 * 32
        for jitter in range(3):
            pixels = np.asarray(render(scene, 32, jitter_seed=index * 10 + jitter)).astype(int)
            drawn = np.abs(pixels - np.array(BACKGROUNDS[scene.background])).max(axis=-1) > 8
            assert drawn.any() and not (drawn & ~inside).any(), "the object must lie inside its region"


def test_region_psnr_separates_object_and_background():
    from tokenmerge.testbed.data import object_mask, sample_scenes

    scenes = sample_scenes("heldout", 3)
    reference = torch.rand(3, 3, 32, 32)
    inside = torch.from_numpy(np.stack([object_mask(s, 32) for s in scenes]))[:, None]
    in_object = reference + 0.1 * inside
    psnr = evaluate.region_psnr(in_object, reference, scenes)
    assert torch.isinf(psnr["psnr_background"]).all()
    torch.testing.assert_close(psnr["psnr_object"], torch.full((3,), 20.0))  # MSE 0.01 inside
    psnr = evaluate.region_psnr(reference + 0.1 * ~inside, reference, scenes)
    assert torch.isinf(psnr["psnr_object"]).all() and torch.allclose(psnr["psnr_background"], torch.tensor(20.0))


def test_the_noise_floor_row_is_the_unpatched_model_from_other_noise(testbed_dir, tmp_path):
    result = evaluate.evaluate(testbed_dir, methods="tome:0.5", split="heldout", count=2, seeds=[0], steps=2,
                               batch=2, out=tmp_path, progress=False, noise_floor=True, log=lambda message: None)
    assert [row["method"] for row in result.rows] == ["unpatched", "unpatched, other noise", "tome"]
    floor = result.row("unpatched, other noise")
    assert floor["ratio"] is None and 0 < floor["psnr"] < math.inf, "other noise: another image"
    assert 0.0 <= floor["accuracy"] <= 1.0 and floor["fd"] >= 0
    for row in result.rows:
        assert row["psnr_object"] is not None and row["psnr_background"] is not None
    assert result.row("unpatched")["psnr_object"] == math.inf


@pytest.mark.parametrize("name", sorted(tiny_configs()))
def test_eval_seeds_unseeded_variants_without_losing_the_family_preset(name):
    """eval gives an unseeded config the call's noise seed (``dataclasses.replace``); the fields the user left out
    must still take the family's preset (issue 16: PixArt merged every layer, LCM asked for CFG)."""
    model = tiny_denoiser(name)
    family = adapter_for(model).family
    for variant in evaluate.parse_methods("tome,importance[dst_selection=topk]:0.5"):
        with _patched(model, variant, noise_seed=7):
            current = tokenmerge.current_config(model)
        assert current.seed == 7
        if isinstance(current, ImportanceMerge):
            assert current.dst_selection == "topk"  # the variant's own field stays
        assert current == presets.resolve(dataclasses.replace(variant.config, seed=7), family)
        for field, value in presets.preset(family, variant.config).items():
            assert getattr(current, field) == value, f"{family}: {field} lost its preset in eval"
        assert tokenmerge.current_config(model) is None
