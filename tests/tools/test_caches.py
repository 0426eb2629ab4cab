"""``--cache``: the caching accelerators ``bench`` and ``eval`` stack with merging (tokenmerge.tools.caches)."""

from __future__ import annotations

import csv
import math
import re

import pytest

from tokenmerge.testbed import pipeline as testbed_pipeline
from tokenmerge.tools import bench, evaluate
from tokenmerge.tools.caches import CacheSpec, cache_enabled, parse_cache

from .test_evaluate import testbed_dir  # noqa: F401  (the module fixture: a small random testbed, saved)

pytest.importorskip("DeepCache")


def test_specs_read_their_options_and_name_what_is_wrong():
    assert parse_cache("deepcache") == CacheSpec("deepcache", {})
    assert parse_cache(" DeepCache:interval=2,branch=1 ") == CacheSpec("deepcache", {"interval": 2, "branch": 1})
    assert parse_cache("first-block:threshold=0.1").label == "first-block:threshold=0.1"
    with pytest.raises(ValueError, match="unknown cache 'teacache'; known caches: deepcache"):
        parse_cache("teacache")
    with pytest.raises(ValueError, match="bad option 'period=2' for deepcache: .* among interval, branch"):
        parse_cache("deepcache:period=2")
    with pytest.raises(ValueError, match="bad value 'two' for deepcache's interval: a int"):
        parse_cache("deepcache:interval=two")


def test_a_cache_on_a_pipeline_it_cannot_run_on_names_the_one_that_can():
    pipe = testbed_pipeline.TestbedPipeline(*testbed_pipeline.build_models(width=16))
    with pytest.raises(ValueError, match="pab needs a denoiser with enable_cache .*: use deepcache on a U-Net"):
        with cache_enabled(parse_cache("pab"), pipe):
            pass


def test_eval_adds_the_cache_alone_and_stacked_with_each_method(testbed_dir, tmp_path):  # noqa: F811
    result = evaluate.evaluate(testbed_dir, methods="tome:0.5", split="heldout", count=2, seeds=[0], steps=4,
                               batch=2, out=tmp_path, progress=False, cache="deepcache:interval=2",
                               log=lambda message: None)
    names = [row["method"] for row in result.rows]
    assert names == ["unpatched", "tome", "deepcache:interval=2", "tome + deepcache:interval=2"]
    for name in names[1:]:  # each moves the images against the one unpatched reference
        assert 0 < result.row(name)["psnr"] < math.inf
    assert result.row("tome")["psnr"] != result.row("tome + deepcache:interval=2")["psnr"]
    with (tmp_path / "results.csv").open() as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == names


def test_eval_refuses_a_cache_the_model_cannot_take(testbed_dir, tmp_path):  # noqa: F811
    with pytest.raises(evaluate.EvalError, match="first-block needs a denoiser with enable_cache"):
        evaluate.evaluate(testbed_dir, methods="tome:0.5", count=1, steps=2, out=tmp_path, progress=False,
                          cache="first-block", log=lambda message: None)


def test_bench_times_every_variant_again_with_deepcache_over_a_run_of_steps(tmp_path):
    bench.main(["--tiny", "--models", "sd15", "--sizes", "128", "--ratios", "0.5", "--methods", "tome",
                "--repeats", "1", "--warmup", "0", "--steps", "4", "--cache", "deepcache:interval=2",
                "--out", str(tmp_path)])
    with (tmp_path / "bench.csv").open() as handle:
        rows = {row["method"]: row for row in csv.DictReader(handle)}
    assert list(rows) == ["unpatched", "tome", "deepcache:interval=2", "tome+deepcache:interval=2"]
    assert all(row["status"] == "ok" for row in rows.values())
    flops = {name: float(row["gflops"]) for name, row in rows.items()}
    # Caching skips the deep blocks in every second step; merging cuts the blocks that run: each cuts FLOPs alone,
    # and stacked they cut more than either.
    assert flops["unpatched"] > flops["tome"] > flops["tome+deepcache:interval=2"]
    assert flops["unpatched"] > flops["deepcache:interval=2"] > flops["tome+deepcache:interval=2"]


@pytest.mark.parametrize("options, message", [
    (["--cache", "first-block"], "only caches with a fixed schedule .* tokenmerge eval --cache first-block"),
    (["--cache", "deepcache"], "--cache times a run of steps: give --steps 2 or more"),
])
def test_bench_refuses_what_it_cannot_time(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--models", "sd15", "--out", str(tmp_path), *options])
    assert re.search(message, capsys.readouterr().err)
