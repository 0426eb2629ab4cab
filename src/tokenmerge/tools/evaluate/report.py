"""``eval``'s results: the rows, results.json/.csv/.md, the quality-against-speed plot and the image grid."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ...testbed.data import ATTRIBUTES
from ..reports import markdown_table
from .variants import REFERENCE, Variant

GRID_CELL = 96  # grid images are scaled up by a whole factor to about this many pixels (testbed images are 32)

RESULT_FILES = ("results.json", "results.csv", "results.md", "quality_vs_speedup.png", "grid.png")

ROW_FIELDS = ("method", "ratio", "seconds_per_image", "speedup", "psnr", "psnr_object", "psnr_background", "ssim",
              "lpips", "accuracy",
              *(f"accuracy_{name}" for name in ATTRIBUTES), "fd", "clip_score", "fid", "n")


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: one row per variant (the reference first), notes, files written."""

    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def row(self, method: str, ratio: float | None = None) -> dict[str, Any]:
        for row in self.rows:
            if row["method"] == method and (ratio is None or row["ratio"] == ratio):
                return row
        raise KeyError(f"no row for {method} {ratio}")


def _rows(variants: list[Variant], computed: dict[str, dict[str, float | None]]) -> list[dict[str, Any]]:
    reference = computed[REFERENCE.label]
    reference_time = reference["seconds"] / reference["images"]
    rows = []
    for variant in variants:
        values = computed[variant.label]
        seconds = values["seconds"] / values["images"]
        row = {name: values.get(name) for name in ROW_FIELDS}
        row.update(method=variant.name, ratio=variant.ratio, seconds_per_image=seconds,
                   speedup=reference_time / seconds, n=int(values["images"]))
        rows.append(row)
    return rows


def write_results(result: EvalResult, out: Path, variants: list[Variant], grid_cells, grid_prompts: int,
                  log: Callable[[str], None] = print) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {name: out / name for name in RESULT_FILES}
    payload = {"settings": result.settings, "notes": result.notes, "rows": [_json_row(r) for r in result.rows]}
    files["results.json"].write_text(json.dumps(payload, indent=2) + "\n")
    with files["results.csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=ROW_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow({key: _csv_value(row[key]) for key in ROW_FIELDS})
    table = results_table(result.rows)
    log(table)
    files["results.md"].write_text(_markdown_report(result, table))
    plot_quality(result.rows, files["quality_vs_speedup.png"])
    cells = {(label, index): image for label, index, image in grid_cells}
    columns = sorted({index for _, index in cells})[:grid_prompts]
    image_grid([[cells[(v.label, i)] for i in columns] for v in variants], [v.label for v in variants],
               [f"prompt {i}" for i in columns]).save(files["grid.png"])
    log("wrote " + ", ".join(str(path) for path in files.values()))
    return files


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """Strict JSON: an infinite PSNR (identical images) is written as the string "inf"."""
    return {key: ("inf" if isinstance(value, float) and math.isinf(value) else value) for key, value in row.items()}


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return value


COLUMNS = {  # row key -> (markdown header, format)
    "method": ("method", "{}"), "ratio": ("ratio", "{:g}"), "seconds_per_image": ("s / image", "{:.4g}"),
    "speedup": ("speed-up", "{:.2f}x"), "psnr": ("PSNR dB", "{:.2f}"), "psnr_object": ("PSNR object", "{:.2f}"),
    "psnr_background": ("PSNR background", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"),
    "lpips": ("LPIPS", "{:.4f}"), "accuracy": ("accuracy", "{:.3f}"),
    **{f"accuracy_{name}": (name, "{:.3f}") for name in ATTRIBUTES},
    "fd": ("FD", "{:.3f}"), "clip_score": ("CLIP", "{:.2f}"), "fid": ("FID", "{:.2f}"), "n": ("n", "{}"),
}

ALWAYS_SHOWN = ("method", "ratio", "seconds_per_image", "speedup", "n")


def results_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table; a metric column nobody has a value for is left out."""
    keys = [key for key in COLUMNS if key in ALWAYS_SHOWN or any(row[key] is not None for row in rows)]
    return markdown_table([COLUMNS[key][0] for key in keys], ([_cell(row[key], COLUMNS[key][1]) for key in keys]
                                                        for row in rows))


def _cell(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return spec.format(value)


def _markdown_report(result: EvalResult, table: str) -> str:
    s = result.settings
    lines = [
        "# tokenmerge eval", "",
        f"Model: {s['model']}; prompts: {s['count']} from {s['prompts']}; seeds {s['seeds']}; {s['steps']} steps; "
        f"guidance {s['guidance'] if s['guidance'] is not None else 'pipeline default'}; batch {s['batch']}; "
        f"{s['device']} {s['dtype']}; {s['processes']} process(es).", "",
        table, "",
        "Fidelity (PSNR, SSIM, LPIPS) is against the unpatched images from the same seeds; the unpatched row "
        "compares them with themselves. Speed-up: unpatched seconds per image / the method's, in the same run.",
    ]
    if result.notes:
        lines += ["", *(f"- {note}" for note in result.notes)]
    lines += ["", "![quality against speed-up](quality_vs_speedup.png)", "", "![grid](grid.png)", "",
              "Grid columns:", *(f"{i}. {prompt}" for i, prompt in enumerate(s["grid_prompts"])), ""]
    return "\n".join(lines)


PLOTTED = (("accuracy", "condition accuracy"), ("fd", "FD (judge features)"), ("psnr", "PSNR dB"),
           ("ssim", "SSIM"), ("lpips", "LPIPS"), ("clip_score", "CLIP score"), ("fid", "FID"))


def plot_quality(rows: list[dict[str, Any]], path: Path) -> Path:
    """One panel per available quality metric against the measured speed-up; a line per method (its ratios)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def finite(value: Any) -> bool:
        return isinstance(value, (int, float)) and math.isfinite(value)

    panels = [(key, title) for key, title in PLOTTED if any(finite(row[key]) for row in rows)][:4]
    figure = Figure(figsize=(4.2 * max(1, len(panels)), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(1, len(panels)), squeeze=False)[0]
    methods = list(dict.fromkeys(row["method"] for row in rows if row["ratio"] is not None))
    for axis, (key, title) in zip(axes, panels):
        reference = [row for row in rows if row["ratio"] is None and finite(row[key])]
        if reference:
            axis.scatter([reference[0]["speedup"]], [reference[0][key]], marker="*", s=140, color="black",
                         label="unpatched", zorder=3)
        for method in methods:
            points = sorted((row["speedup"], row[key], row["ratio"]) for row in rows
                            if row["method"] == method and row["ratio"] is not None and finite(row[key]))
            if not points:
                continue
            xs, ys, ratios = zip(*points)
            axis.plot(xs, ys, marker="o", label=method)
            for x, y, ratio in points:
                axis.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xlabel("measured speed-up (x)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    if not panels:
        axes[0].text(0.5, 0.5, "no quality metric available", ha="center", va="center")
    figure.savefig(path, dpi=110)
    return path


def image_grid(rows: list[list[np.ndarray]], row_labels: Sequence[str], column_labels: Sequence[str]) -> Image.Image:
    """Images in a table: a labelled row per variant, a labelled column per prompt; small images scaled up."""
    font = ImageFont.load_default()
    cells = [[Image.fromarray(image) for image in row] for row in rows]
    first = next((image for row in cells for image in row), Image.new("RGB", (GRID_CELL, GRID_CELL)))
    factor = max(1, GRID_CELL // max(first.size))
    cell_w, cell_h = first.width * factor, first.height * factor
    pad = 6
    label_w = max(int(font.getlength(label)) for label in row_labels) + 2 * pad
    text_h = font.getbbox("Ag")[3] + pad
    width = label_w + len(column_labels) * (cell_w + pad) + pad
    height = text_h + len(rows) * (cell_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(column_labels):
        draw.text((label_w + j * (cell_w + pad), pad // 2), label, fill=(0, 0, 0), font=font)
    for i, (label, row) in enumerate(zip(row_labels, cells)):
        top = text_h + i * (cell_h + pad)
        draw.text((pad, top + cell_h // 2 - text_h // 2), label, fill=(0, 0, 0), font=font)
        for j, image in enumerate(row):
            scaled = image.resize((cell_w, cell_h), Image.Resampling.NEAREST)
            canvas.paste(scaled, (label_w + j * (cell_w + pad), top))
    return canvas
