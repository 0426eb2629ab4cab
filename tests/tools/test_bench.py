"""``tokenmerge bench`` on tiny configs (end to end, FLOPs, tomesd side by side, PixArt) and the shipped
full-size configs (built on the meta device: no memory). No timing assertions: speed lives in benchmarks."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokenmerge
from tokenmerge.models import example_inputs
from tokenmerge.tools import bench, cli
from tokenmerge.tools.options import one_size, parse_names, size_list
from tokenmerge.tools.tiny import build_denoiser, tiny_unet


def run_bench(out: Path, *options: str) -> list[dict]:
    bench.main(["--tiny", "--sizes", "128", "--ratios", "0.5", "--repeats", "1", "--warmup", "0",
              "--out", str(out), *options])
    with (out / "bench.csv").open() as handle:
        return list(csv.DictReader(handle))


def by_method(rows: list[dict], model: str) -> dict[str, dict]:
    return {row["method"]: row for row in rows if row["model"] == model}


def test_end_to_end_writes_table_csv_and_plot_and_merging_cuts_flops(tmp_path, capsys):
    rows = run_bench(tmp_path, "--models", "sd15", "--methods", "tome,importance")
    out = capsys.readouterr().out
    assert "| model | px | method |" in out and "FLOP bound" in out
    methods = by_method(rows, "sd15")
    assert list(methods) == ["unpatched", "tome", "importance"]  # unpatched always runs, as the baseline
    for row in methods.values():
        assert row["status"] == "ok" and row["runs"] == "1" and float(row["median_s"]) > 0
        # CPU: the live tensors' peak plus the weights (the tiny U-Net's are ~5 MiB in float32)
        assert float(row["peak_mem_mib"]) > bench.weight_bytes(build_denoiser(
            bench.model_config("sd15", tiny=True), "meta", torch.float32)) / 2**20
    unpatched = float(methods["unpatched"]["gflops"])
    for method in ("tome", "importance"):
        assert unpatched > float(methods[method]["gflops"]) > 0
        assert float(methods[method]["flop_bound"]) > 1
        assert float(methods[method]["achieved"]) == pytest.approx(
            float(methods[method]["speedup"]) / float(methods[method]["flop_bound"]))
    table = (tmp_path / "bench.md").read_text()
    assert "tokenmerge bench --models sd15 --sizes 128 --ratios 0.5 --methods tome,importance" in table
    assert table.count("| sd15 | 128 |") == 3
    assert Image.open(tmp_path / "bench.png").size[0] > 100


def test_live_bytes_counts_the_tensors_alive_at_once():
    weight = torch.ones(1024)  # made before: not counted, nor are its views or in-place results
    with bench.LiveBytes() as live:
        a = torch.empty(256)  # 1 KiB
        b = a * 2  # 2 KiB alive
        weight.t().add_(0)
        a.add_(1)
        del a  # 1 KiB alive
        c = torch.empty(512)  # 3 KiB alive: the peak
        del b, c
    assert (live.peak, live.bytes) == (3 * 1024, 0)


def test_tomesd_runs_beside_tokenmerge_on_unets_and_transformers_merge_with_their_presets(tmp_path):
    rows = run_bench(tmp_path, "--models", "sd15,sdxl,pixart,dit", "--methods", "unpatched,tomesd,tome,importance")
    sd15, sdxl, pixart, dit = (by_method(rows, model) for model in ("sd15", "sdxl", "pixart", "dit"))
    assert sd15["tomesd"]["status"] == "ok" and float(sd15["tomesd"]["flop_bound"]) > 1
    # On SDXL tomesd's max_downsample=1 patches the top level, which has no attention: nothing merged.
    assert sdxl["tomesd"]["status"] == "ok" and "merges nothing" in sdxl["tomesd"]["note"]
    assert float(sdxl["tome"]["flop_bound"]) > 1
    assert pixart["unpatched"]["status"] == "ok" and float(pixart["unpatched"]["gflops"]) > 0
    for transformer in (pixart, dit):
        assert transformer["unpatched"]["status"] == "ok" and float(transformer["unpatched"]["gflops"]) > 0
        assert transformer["tomesd"]["status"] == "skipped" and "U-Nets only" in transformer["tomesd"]["note"]
        for method in ("tome", "importance"):  # the middle half of the blocks merged: fewer FLOPs
            assert transformer[method]["status"] == "ok" and float(transformer[method]["flop_bound"]) > 1


def test_lcm_and_animatediff_run_with_their_own_inputs_and_merging_cuts_flops(tmp_path):
    rows = run_bench(tmp_path, "--models", "lcm,animatediff", "--methods", "unpatched,tomesd,tome,importance")
    lcm, video = by_method(rows, "lcm"), by_method(rows, "animatediff")
    assert lcm["tomesd"]["status"] == "ok" and float(lcm["tomesd"]["flop_bound"]) > 1  # an SD 1.5 U-Net to tomesd
    assert video["tomesd"]["status"] == "skipped" and "image U-Nets only" in video["tomesd"]["note"]
    for model in (lcm, video):
        assert model["unpatched"]["status"] == "ok"
        for method in ("tome", "importance"):
            assert model[method]["status"] == "ok"
            assert float(model["unpatched"]["gflops"]) > float(model[method]["gflops"]) > 0
    assert "lcm: 1 (no CFG)" in (tmp_path / "bench.md").read_text()


def test_zero123pp_runs_its_reference_pass_and_merges_the_tiled_views(tmp_path):
    rows = run_bench(tmp_path, "--models", "zero123pp", "--sizes", "192x128", "--methods", "tomesd,tome,importance")
    views = by_method(rows, "zero123pp")
    assert {row["size"] for row in views.values()} == {"192x128"}  # 3 x 2 tiles of 64 px
    assert views["tomesd"]["status"] == "skipped"  # tomesd cannot patch the wrapper
    for method in ("tome", "importance"):
        assert views[method]["status"] == "ok" and float(views[method]["flop_bound"]) > 1
    assert "--sizes 192x128" in (tmp_path / "bench.md").read_text()
    assert size_list("512, 960x640") == (512, (960, 640))
    with pytest.raises(argparse.ArgumentTypeError, match="height x width"):
        size_list("960x")
    assert one_size("480x832") == (480, 832) and one_size("1024") == 1024
    with pytest.raises(argparse.ArgumentTypeError, match="one image size"):
        one_size("512,768")


def test_the_lcm_keeps_its_importance_preset_and_video_gets_a_map_per_frame_grid():
    lcm = build_denoiser(bench.model_config("lcm", tiny=True), "cpu", torch.float32)
    cpu = torch.device("cpu")
    # LCM keeps its preset's signal (no CFG to take |eps_cond - eps_uncond| from); the others get a random map.
    config = bench.method_config("importance", 0.5, (16, 16), cpu, True, 0, family="lcm")
    with tokenmerge.patched(lcm, config):
        assert tokenmerge.current_config(lcm).importance == "crossattn"
    video_config = bench.method_config("importance", 0.5, (16, 16), cpu, True, 0, family="animatediff")
    assert video_config.importance.shape == (16, 16)


def test_a_ratio_out_of_a_methods_range_is_reported_as_invalid(tmp_path):
    rows = run_bench(tmp_path, "--models", "sd15", "--methods", "tome", "--ratios", "0.8")
    assert by_method(rows, "sd15")["tome"]["status"] == "invalid"
    assert "ratio" in by_method(rows, "sd15")["tome"]["note"]


@pytest.mark.parametrize("model, expected", [
    ("sd15", dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  use_linear_projection=False, sample_size=64, params=859_520_964)),
    ("sd21", dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, sample_size=96,
                  params=865_910_724)),
    ("sdxl", dict(block_out_channels=(320, 640, 1280), cross_attention_dim=2048, addition_embed_type="text_time",
                  transformer_layers_per_block=(1, 2, 10), projection_class_embeddings_input_dim=2816,
                  sample_size=128, params=2_567_463_684)),
    ("pixart", dict(num_layers=28, patch_size=2, sample_size=128, caption_channels=4096, norm_type="ada_norm_single",
                    num_attention_heads=16, attention_head_dim=72, params=611_349_152)),
    # DiT-XL/2 has 675 M parameters; diffusers' DiT keeps a timestep/class embedder in every block's adaLN-Zero.
    ("dit", dict(num_layers=28, patch_size=2, sample_size=32, norm_type="ada_norm_zero", num_attention_heads=16,
                 attention_head_dim=72, out_channels=8, params=749_826_464)),
    # SD 1.5 plus the guidance embedding, a 256 -> 320 linear without bias.
    ("lcm", dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, time_cond_proj_dim=256,
                 sample_size=64, params=859_520_964 + 256 * 320)),
    # UNetMotionModel.from_unet2d(SD 1.5, animatediff-motion-adapter-v1-5-2): the U-Net's and the adapter's
    # 453,209,280 parameters.
    ("animatediff", dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, layers_per_block=2,
                         motion_max_seq_length=32, motion_num_attention_heads=8, use_motion_mid_block=True,
                         sample_size=64, params=859_520_964 + 453_209_280)),
    # Zero123++ v1.2: an SD 2 U-Net (865.9 M parameters) in the reference-attention wrapper.
    ("zero123pp", dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                       attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, params=865_910_724)),
])
def test_shipped_full_size_configs_build_their_diffusers_classes(model, expected):
    denoiser = build_denoiser(bench.model_config(model), "meta", torch.float16)
    config = getattr(denoiser, "unet", denoiser).config
    for key, value in expected.items():
        if key != "params":
            assert (tuple(config[key]) if isinstance(config[key], list) else config[key]) == value, key
    assert sum(p.numel() for p in denoiser.parameters()) == expected["params"]  # the released models' counts
    assert next(denoiser.parameters()).dtype == torch.float16
    if model == "sd21":  # 64-dim heads: 320 channels / 5 heads
        attn = denoiser.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        assert attn.inner_dim // attn.heads == 64
    classes = {"pixart": "PixArtTransformer2DModel", "dit": "DiTTransformer2DModel", "animatediff": "UNetMotionModel",
               "zero123pp": "ReferenceUNet"}
    assert type(denoiser).__name__ == classes.get(model, "UNet2DConditionModel")


def test_bad_names_list_the_known_ones(capsys):
    with pytest.raises(ValueError, match="unknown model 'sd3'.*sd15, sd21, sdxl, pixart, dit"):
        parse_names("sd15,sd3", bench.MODELS, "model")
    for option, named in (("--models", "known models: sd15"), ("--methods", "known methods: unpatched, tomesd")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(["--tiny", option, "nope"])
        assert exit_info.value.code == 2
        err = " ".join(capsys.readouterr().err.split())  # argparse wraps long messages
        assert "'nope'" in err and named in err
    with pytest.raises(SystemExit):
        bench.main(["--sizes", "500"])  # not a multiple of 8
    assert "multiples of 8" in capsys.readouterr().err
    for options, named in ((["--compile", "default", "--compile-backend", "nope"], "'nope' is not a torch.compile "
                            "backend; use one of"), (["--compile-backend", "aot_eager"], "only used with --compile")):
        with pytest.raises(SystemExit):
            bench.main(["--tiny", *options])
        assert named in " ".join(capsys.readouterr().err.split())


def test_the_cli_has_the_bench_command():
    args = cli.build_parser().parse_args(["bench", "--models", "sdxl", "--tiny"])
    assert args.handler is bench.run_command and args.models == "sdxl" and args.tiny


def test_defaults_follow_the_device():
    parser = argparse.ArgumentParser()
    bench.register(parser.add_subparsers())
    args = bench.complete_args(parser.parse_args(["bench"]), pytest.fail)
    assert (args.device.type, args.dtype, args.models, args.ratios, args.repeats) == (
        "cpu", torch.float32, ("sd15",), (0.5,), 3)
    assert bench.sizes_for("sd15", args) == (512,) and bench.sizes_for("sdxl", args) == (1024,)
    assert bench.GPU_DEFAULTS["ratios"] == (0.3, 0.5, 0.7, 0.75)


def test_share_plan_modes_are_variants_with_their_plan_time(tmp_path):
    rows = run_bench(tmp_path, "--models", "sd15", "--methods", "tomesd,tome,retom", "--share-plan", "block,level")
    methods = by_method(rows, "sd15")
    assert list(methods) == ["unpatched", "tomesd", "tome", "tome+level", "retom", "retom+level"]
    # One matching per level instead of one per block: fewer similarity FLOPs, same attention FLOPs.
    assert float(methods["tome+level"]["gflops"]) < float(methods["tome"]["gflops"])
    for name in ("tome", "tome+level"):
        assert 0 < float(methods[name]["plan_s"]) and 0 < float(methods[name]["plan_share"])
    assert methods["unpatched"]["plan_s"] == methods["tomesd"]["plan_s"] == ""  # not tokenmerge: no plan timer
    assert methods["retom+level"]["status"] == "ok"  # ReToM shares its window plans per level like the others
    assert "--share-plan block,level" in (tmp_path / "bench.md").read_text()


def test_attention_modes_are_variants_that_reach_the_configs(tmp_path):
    rows = run_bench(tmp_path, "--models", "sd15", "--methods", "tomesd,tome,sito",
                     "--attention", "default,sized,kv,kv+sized-channel")
    methods = by_method(rows, "sd15")
    assert list(methods) == ["unpatched", "tomesd", "tome", "tome/sized", "tome/kv", "tome/kv+sized-channel",
                             "sito", "sito/sized", "sito/kv", "sito/kv+sized-channel"]
    assert all(row["status"] == "ok" for row in methods.values())
    # K/V-only keeps every query: its attention does N x M work where merged queries do M x M.
    assert float(methods["tome"]["gflops"]) == pytest.approx(float(methods["tome/sized"]["gflops"]), rel=1e-3)
    assert float(methods["tome"]["gflops"]) < float(methods["tome/kv"]["gflops"]) < float(
        methods["unpatched"]["gflops"])
    assert "--attention default,sized,kv,kv+sized-channel" in (tmp_path / "bench.md").read_text()
    # ImportanceMerge's default is size-aware: "plain" is the paper's one key per slot.
    configs = {v.method: v.config for v in (
        bench.make_variant("importance", 0.5, tiny_unet("sd1"), (16, 16), torch.device("cpu"), True, 0,
                           attention=mode) for mode in ("default", "plain"))}
    assert configs["importance"].proportional_attention and not configs["importance/plain"].proportional_attention
    with pytest.raises(SystemExit):
        run_bench(tmp_path / "bad", "--models", "sd15", "--attention", "flash")


def test_blocks_below_min_tokens_are_reported(tmp_path, caplog):
    """64 px: SDXL's first attention level is 4x4 = 16 tokens, below the default floor of 64. The note says it, once
    per row; the per-patch warning (every round re-patches) stays quiet."""
    with caplog.at_level(logging.WARNING, logger="tokenmerge"):
        rows = run_bench(tmp_path, "--models", "sd15,sdxl", "--sizes", "64", "--methods", "tome")
    assert "below the automatic floor" not in caplog.text
    sd15, sdxl = by_method(rows, "sd15"), by_method(rows, "sdxl")
    assert "min_tokens" not in sd15["tome"]["note"] and float(sd15["tome"]["flop_bound"]) > 1  # 8x8 = 64 tokens
    assert "block(s) below the automatic floor (cpu: 64 tokens) not merged (16 tokens)" in sdxl["tome"]["note"]
    assert "merges nothing" in sdxl["tome"]["note"]


def test_placement_and_matching_options_reach_the_configs(tmp_path):
    """--max-downsample, --min-tokens, --match-window and --merge-mlp set those fields of every tokenmerge method."""
    rows = run_bench(tmp_path, "--models", "sd15", "--methods", "tome,importance", "--match-window", "1")
    methods = by_method(rows, "sd15")
    assert float(methods["tome"]["gflops"]) < float(methods["unpatched"]["gflops"])
    assert methods["importance"]["status"] == "invalid" and "match_window" in methods["importance"]["note"]
    base = by_method(run_bench(tmp_path / "base", "--models", "sdxl", "--methods", "tome"), "sdxl")
    deeper = by_method(run_bench(tmp_path / "deep", "--models", "sdxl", "--methods", "tome",
                                 "--max-downsample", "2", "--min-tokens", "0"), "sdxl")
    assert float(deeper["tome"]["gflops"]) < float(base["tome"]["gflops"])  # a second level merged
    assert "--max-downsample 2 --min-tokens 0" in (tmp_path / "deep" / "bench.md").read_text()
    mlp = by_method(run_bench(tmp_path / "mlp", "--models", "sd15", "--methods", "tome", "--merge-mlp"), "sd15")
    # The feed-forward on the kept tokens too: the step's peak (there, not in the attention) drops.
    assert float(mlp["tome"]["gflops"]) < float(mlp["unpatched"]["gflops"])
    peak = float(mlp["unpatched"]["peak_mem_mib"])
    assert float(mlp["tome"]["peak_mem_mib"]) < peak <= float(methods["tome"]["peak_mem_mib"])
    assert "--merge-mlp" in (tmp_path / "mlp" / "bench.md").read_text()


def test_compiled_variants_are_patched_copies_compiled_in_the_warm_up(tmp_path):
    """--compile times each variant as its own patched copy, compiled (graphs captured) in two warm-up rounds."""
    import torch._dynamo

    torch._dynamo.utils.counters.clear()
    rows = run_bench(tmp_path, "--models", "sd15", "--methods", "tomesd,tome,importance", "--compile", "default",
                     "--compile-backend", "aot_eager", "--repeats", "2")
    methods = by_method(rows, "sd15")
    assert list(methods) == ["unpatched", "tomesd", "tome", "importance"]
    for row in methods.values():
        assert row["status"] == "ok" and row["runs"] == "2" and float(row["median_s"]) > 0
    assert float(methods["tome"]["gflops"]) < float(methods["unpatched"]["gflops"])
    table = (tmp_path / "bench.md").read_text()
    assert "--warmup 2" in table and "--compile default --compile-backend aot_eager" in table
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0


def test_plan_every_over_several_steps_counts_fewer_plans(tmp_path):
    """--steps 2 runs two denoiser calls per sample; with --plan-every 2 the second reuses the first's plans."""
    options = ("--models", "sd15", "--methods", "tome", "--steps", "2")
    fresh = by_method(run_bench(tmp_path / "fresh", *options), "sd15")
    reused = by_method(run_bench(tmp_path / "reused", *options, "--plan-every", "2"), "sd15")
    assert fresh["unpatched"]["gflops"] == reused["unpatched"]["gflops"]  # per call, whatever --steps
    assert float(reused["tome"]["gflops"]) < float(fresh["tome"]["gflops"])  # half the similarity matmuls
    assert "--plan-every 2 --steps 2" in (tmp_path / "reused" / "bench.md").read_text()


def test_flops_are_counted_on_the_meta_device_for_a_method_that_follows_the_run():
    """DiT's timestep is a device tensor: on 'meta' it has no value, and the step clock counts calls instead."""
    meta = torch.device("meta")
    dit = build_denoiser(bench.model_config("dit", tiny=True), meta, torch.float32)
    inputs, kwargs = example_inputs(dit, 128, 1, meta, torch.float32)

    def step():
        with torch.no_grad():
            dit(*inputs, **kwargs)

    base = bench.count_flops(step)
    with tokenmerge.patched(dit, bench.method_config("importance", 0.5, (16, 16), meta, False, 0, family="dit")):
        assert 0 < bench.count_flops(step) < base
