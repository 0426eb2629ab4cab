"""``tokenmerge generate`` end to end on a tiny saved pipeline, and its error messages."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tokenmerge.tools import cli, viz
from tokenmerge.tools.tiny import save_tiny_pipeline

SMALL_RUN = ["--prompt", "a red circle", "--steps", "4", "--seed", "0", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_pipeline(tmp_path_factory.mktemp("models") / "m", "sd1")


def generate(model: Path | str, out: Path, *options: str) -> dict:
    cli.main(["generate", "--model", str(model), *SMALL_RUN, "--out", str(out), *options])
    return json.loads((out / "summary.json").read_text())


def test_compare_writes_both_images_the_comparison_the_maps_and_the_summary(tiny_model, tmp_path, capsys):
    summary = generate(tiny_model, tmp_path, "--method", "importance", "--ratio", "0.7", "--compare",
                       "--map-steps", "0,3")
    assert [(run["method"], run["ratio"]) for run in summary["runs"]] == [("unpatched", None), ("importance", 0.7)]
    assert all(run["seconds"] > 0 for run in summary["runs"]) and "ImportanceMerge(ratio=0.7" in summary["config"]
    for run in summary["runs"]:
        assert Image.open(tmp_path / run["image"]).size == (64, 64)
    assert Image.open(tmp_path / "compare.png").width > 2 * 64
    assert summary["map_steps"] == [0, 3] and summary["map_block"].startswith("down_blocks.0.")
    assert "speed-up" in capsys.readouterr().out

    # The bottom row of the figure holds the computation maps: only role colours (and the white background).
    maps = Image.open(tmp_path / "maps_importance.png").convert("RGB")
    row = np.asarray(maps.crop((0, maps.height - viz.PADDING - viz.MAP_SIZE, maps.width, maps.height - viz.PADDING)))
    colors = {tuple(c) for c in row.reshape(-1, 3)}
    assert colors <= set(viz.ROLE_COLORS.values()) and viz.ROLE_COLORS[viz.MERGED] in colors


def test_method_none_writes_one_image_and_no_maps(tiny_model, tmp_path):
    summary = generate(tiny_model, tmp_path, "--method", "none", "--compare")
    assert summary["runs"] == [{"method": "unpatched", "ratio": None, "seconds": summary["runs"][0]["seconds"],
                                "image": "unpatched.png"}]
    assert summary["config"] == "None"
    assert Image.open(tmp_path / "unpatched.png").size == (64, 64)
    assert not (tmp_path / "compare.png").exists() and not list(tmp_path.glob("maps_*.png"))


@pytest.mark.parametrize("options, named", [
    (["--method", "tome", "--ratio", "0.9"], "ratio"),
    (["--method", "importance", "--map-steps", "2,9"], "--map-steps 9"),
    (["--method", "importance", "--guidance", "1"], "guidance"),
    (["--method", "tome", "--ratio", "auto"], "--target-speedup"),
    (["--method", "tome", "--target-speedup", "1.5"], "--ratio auto"),
    (["--method", "none", "--ratio", "auto", "--target-speedup", "1.5"], "merging --method"),
    (["--method", "tome", "--ratio", "fast"], "'auto'"),
])
def test_bad_settings_are_usage_errors(tmp_path, capsys, options, named):
    with pytest.raises(SystemExit) as exit_info:
        generate("unused", tmp_path, *options)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_auto_ratio_is_calibrated_applied_and_reported(tiny_model, tmp_path, capsys):
    summary = generate(tiny_model, tmp_path, "--method", "tome", "--ratio", "auto", "--target-speedup", "1.01")
    chosen = summary["auto_ratio"]
    assert chosen["target_speedup"] == 1.01 and chosen["speedups"]  # timings vary: no assertion on them
    assert summary["runs"][-1]["ratio"] == chosen["ratio"] and f"ToMe(ratio={chosen['ratio']}" in summary["config"]
    assert "tokenmerge.auto_ratio(ToMe)" in capsys.readouterr().out


def test_unreachable_hub_id_says_how_to_pass_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import, so set its constant as well.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as exit_info:
        generate("nobody/not-a-model", tmp_path, "--method", "tome")
    message = exit_info.value.code
    assert isinstance(message, str) and "nobody/not-a-model" in message and "local" in message


@pytest.mark.parametrize("missing", ["/no/such/dir", "./no-such-dir", "models/sd/unet-missing", "~/no-such-dir",
                                     "no-such-dir/"])
def test_a_path_that_does_not_exist_is_called_a_missing_folder_not_a_hub_failure(tmp_path, missing):
    with pytest.raises(SystemExit) as exit_info:
        generate(missing, tmp_path, "--method", "tome")
    message = exit_info.value.code
    assert f"the pipeline folder {missing} does not exist" in message
    assert "Hub" in message and "hf download" not in message  # no download advice for a local path


def test_a_file_is_not_taken_for_a_pipeline_folder(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        generate(weights, tmp_path / "out", "--method", "tome")
    assert "is a file" in exit_info.value.code and "model_index.json" in exit_info.value.code


def test_folder_without_safetensors_weights_is_refused(tmp_path):
    folder = tmp_path / "pickled"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        generate(folder, tmp_path / "out", "--method", "tome")
    assert "no .safetensors weights" in exit_info.value.code and str(folder) in exit_info.value.code


def test_console_script_shows_help():
    script = Path(sys.executable).parent / "tokenmerge"
    result = subprocess.run([script, "generate", "--help"], capture_output=True, text=True, check=True)
    assert "--map-steps" in result.stdout and "--compare" in result.stdout


@pytest.mark.parametrize("method,name", [("retom", "ReToM"), ("sito", "SiTo"), ("tofu", "ToFu")])
def test_every_method_runs_from_the_cli(tiny_model, tmp_path, method, name):
    summary = generate(tiny_model, tmp_path, "--method", method, "--ratio", "0.5")
    assert summary["config"].startswith(f"{name}(ratio=0.5") and (tmp_path / f"{method}.png").exists()


def test_attention_mode_sets_the_configs_fields(tiny_model, tmp_path):
    summary = generate(tiny_model, tmp_path, "--method", "tome", "--ratio", "0.5", "--attention", "kv+sized")
    assert "proportional_attention=True" in summary["config"] and "merge_queries=False" in summary["config"]
    plain = generate(tiny_model, tmp_path / "plain", "--method", "tome", "--ratio", "0.5", "--attention", "plain")
    assert "proportional_attention" not in plain["config"] and "merge_queries" not in plain["config"]
