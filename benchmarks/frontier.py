"""The quality frontier: testbed fidelity (``tokenmerge eval``) against the speed-up ``tokenmerge bench`` measured.

    python benchmarks/frontier.py EVAL/results.json BENCH/bench.csv OUT.png [--metric psnr]

Each eval row (method, its attention fields, ratio) is matched with the bench row of the same method, attention
mode named explicitly (``bench --attention plain,sized,kv+sized``: ``tokenmerge.tools.options.ATTENTION_MODES``) and ratio; rows with
other fields changed have no bench twin and are left out. Plots one curve per method and mode (its ratios), prints the points, and names
the Pareto-optimal configurations (none other is both faster and closer to the unpatched images).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

from tokenmerge.tools.evaluate import parse_methods
from tokenmerge.tools.options import ATTENTION_MODES


def attention_mode(method: str, ratio: float) -> tuple[str, str] | None:
    """``"tome[proportional_attention=True]"`` -> ``("tome", "sized")``: the bench variant timing that config;
    None when fields other than the attention mode's are changed (no bench twin)."""
    config = parse_methods(f"{method}:{ratio:g}")[0].config
    base = method.partition("[")[0]
    for mode, wanted in ATTENTION_MODES.items():
        if mode != "default" and dataclasses.replace(type(config)(ratio=ratio), **wanted) == config:
            return base, mode
    return None


def points(eval_json: Path, bench_csv: Path, metric: str) -> list[dict]:
    speedups = {}
    with bench_csv.open() as handle:
        for row in csv.DictReader(handle):
            if row["status"] == "ok" and row["ratio"] and "/" in row["method"]:  # the modes named explicitly
                base, _, mode = row["method"].partition("/")
                speedups[(base, mode, float(row["ratio"]))] = float(row["speedup"].rstrip("x"))
    found = []
    for row in json.loads(eval_json.read_text())["rows"]:
        named = attention_mode(row["method"], row["ratio"]) if row["ratio"] is not None else None
        key = None if named is None else (*named, float(row["ratio"]))
        if key in speedups and isinstance(row[metric], (int, float)):
            found.append({"method": key[0], "mode": key[1], "ratio": key[2], "speedup": speedups[key],
                          metric: row[metric]})
    return found


def pareto(found: list[dict], metric: str) -> list[dict]:
    return [p for p in found if not any(q["speedup"] >= p["speedup"] and q[metric] >= p[metric]
                                        and (q["speedup"], q[metric]) != (p["speedup"], p[metric]) for q in found)]


def plot(found: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    curves = sorted({(p["method"], p["mode"]) for p in found})
    for method, mode in curves:
        line = sorted((p["speedup"], p[metric], p["ratio"]) for p in found if (p["method"], p["mode"]) == (method, mode))
        xs, ys, ratios = zip(*line)
        ax.plot(xs, ys, marker="o", linestyle="-" if mode == "plain" else "--" if mode == "sized" else ":",
                label=f"{method} / {mode}")
        for x, y, ratio in line:
            ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    best = pareto(found, metric)
    ax.scatter([p["speedup"] for p in best], [p[metric] for p in best], s=120, facecolors="none",
               edgecolors="black", label="Pareto-optimal")
    ax.set(xlabel="speed-up of one denoiser step (tokenmerge bench)", ylabel=f"{metric} to the unpatched images")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("eval_json", type=Path)
    parser.add_argument("bench_csv", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--metric", default="psnr")
    args = parser.parse_args(argv)
    found = points(args.eval_json, args.bench_csv, args.metric)
    if not found:
        sys.exit("no eval row has a bench twin (same method, attention mode and ratio)")
    plot(found, args.metric, args.out)
    print(f"| method | mode | ratio | speed-up | {args.metric} | Pareto-optimal |")
    print("| --- | --- | --- | --- | --- | --- |")
    best = pareto(found, args.metric)
    for p in sorted(found, key=lambda p: (p["method"], p["mode"], p["ratio"])):
        value = "inf" if math.isinf(p[args.metric]) else f"{p[args.metric]:.2f}"
        print(f"| {p['method']} | {p['mode']} | {p['ratio']:g} | {p['speedup']:.2f}x | {value} | "
              f"{'yes' if p in best else ''} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
