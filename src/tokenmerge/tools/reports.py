"""What the commands write: markdown tables, CSV files, progress lines."""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table of already formatted cells (a ``|`` inside a cell is written as ``/``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(rows: Iterable[Mapping[str, object]], path: Path, fields: Sequence[str]) -> Path:
    """``rows`` as CSV with the columns ``fields``; None is written as an empty cell."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: "" if row.get(key) is None else row[key] for key in fields} for row in rows)
    return path


def log(message: str) -> None:
    """A progress line on stderr (stdout holds the tables)."""
    print(message, file=sys.stderr, flush=True)
