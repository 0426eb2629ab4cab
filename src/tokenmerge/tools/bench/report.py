"""``bench``'s files: the markdown table, the CSV, the speed-up plot and the command that reproduces them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..options import UNPATCHED
from ..reports import markdown_table
from .variants import METHODS
from .zoo import MODELS, size_label

CSV_FIELDS = ("model", "size", "method", "ratio", "status", "median_s", "min_s", "max_s", "runs", "speedup",
              "gflops", "flop_bound", "achieved", "plan_s", "plan_share", "peak_mem_mib", "note")


def fmt(value, spec: str = ".3f", suffix: str = "") -> str:
    if value is None or value == "":
        return "-"
    return f"{value:{spec}}{suffix}" if isinstance(value, float) else f"{value}{suffix}"


TABLE_HEADER = ("model", "px", "method", "ratio", "median s", "min s", "max s", "speed-up", "GFLOPs", "FLOP bound",
                "achieved", "plan s", "plan %", "peak MiB", "note")


def bench_table(rows: list[dict]) -> str:
    def cells(r: dict) -> tuple:
        note = r["note"] if r["status"] == "ok" else f"{r['status']}: {r['note']}"
        return (r["model"], r["size"], r["method"], fmt(r["ratio"], "g"), fmt(r["median_s"], ".4f"),
                fmt(r["min_s"], ".4f"), fmt(r["max_s"], ".4f"), fmt(r["speedup"], ".2f", "x"), fmt(r["gflops"], ".4g"),
                fmt(r["flop_bound"], ".2f", "x"), fmt(r["achieved"], ".0%"), fmt(r["plan_s"], ".4f"),
                fmt(r["plan_share"], ".1%"), fmt(r["peak_mem_mib"], ".0f"), note)

    return markdown_table(TABLE_HEADER, map(cells, rows)) + "\n"


def write_plot(rows: list[dict], path: Path) -> Path:
    """Speed-up vs ratio, one panel per model and resolution, one colour per method; dashed: the FLOP bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    merged = [r for r in rows if r["status"] == "ok" and r["method"] != UNPATCHED]
    panels = list(dict.fromkeys((r["model"], r["size"]) for r in merged))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.8), squeeze=False)
    names = list(dict.fromkeys([*METHODS, *(r["method"] for r in merged)]))  # METHOD+level variants too
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(names)}
    for ax, (model, size) in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in merged):
            points = sorted((r["ratio"], r["speedup"], r["flop_bound"]) for r in merged
                            if (r["model"], r["size"], r["method"]) == (model, size, method))
            if points:
                ratios, speedups, bounds = zip(*points)
                ax.plot(ratios, speedups, "o-", color=colors[method], label=method)
                ax.plot(ratios, bounds, "x--", color=colors[method], alpha=0.7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set(title=f"{MODELS[model].title}, {size} px", xlabel="merge ratio", ylabel="speed-up (step)")
        ax.legend(title="x, dashed: FLOP bound", fontsize=8, title_fontsize=8)
    if not panels:
        axes[0][0].text(0.5, 0.5, "no merged variant ran", ha="center", va="center")
        axes[0][0].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, every default spelled out."""
    def join(values) -> str:
        return ",".join(f"{v:g}" if isinstance(v, float) else size_label(v) if isinstance(v, tuple) else str(v)
                        for v in values)

    sizes = f" --sizes {join(args.sizes)}" if args.sizes else ""
    return (f"tokenmerge bench --models {join(args.models)}{sizes} --ratios {join(args.ratios)} "
            f"--methods {join(args.methods)} --share-plan {join(args.share_plan)} "
            f"{f'--attention {join(args.attention)} ' if args.attention != ('default',) else ''}--repeats {args.repeats} "
            f"--warmup {args.warmup} --images {args.images} "
            f"{f'--max-downsample {args.max_downsample} ' if args.max_downsample else ''}"
            f"{f'--min-tokens {args.min_tokens} ' if args.min_tokens is not None else ''}"
            f"{f'--match-window {args.match_window} ' if args.match_window is not None else ''}"
            f"{f'--plan-every {args.plan_every} ' if args.plan_every is not None else ''}"
            f"{'--merge-mlp ' if args.merge_mlp else ''}"
            f"{f'--steps {args.steps} ' if args.steps != 1 else ''}"
            f"{f'--compile {args.compile} --compile-backend {args.compile_backend} ' if args.compile else ''}"
            f"--{'' if args.use_rand else 'no-'}use-rand --device {args.device} --dtype {args.dtype_name} "
            f"--seed {args.seed}{' --tiny' if args.tiny else ''} --out {args.out}")
