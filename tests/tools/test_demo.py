"""`tokenmerge demo` runs end to end on the shipped testbed and writes its table and figure."""

from __future__ import annotations

import json

import pytest

from tokenmerge.tools import cli


def test_demo_writes_table_and_figure(tmp_path, capsys):
    cli.main(["demo", "--prompts", "2", "--steps", "3", "--out", str(tmp_path), "--device", "cpu"])
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(row["method"], row["ratio"]) for row in rows] == [
        ("unpatched", None), ("tome[min_tokens=0]", 0.75), ("importance[min_tokens=0]", 0.75)]
    assert all(row["n"] == 2 and 0 <= row["accuracy"] <= 1 for row in rows)
    assert (tmp_path / "demo.png").stat().st_size > 0 and (tmp_path / "maps_importance.png").exists()
    assert "| importance[min_tokens=0] | 0.75 |" in capsys.readouterr().out


def test_demo_rejects_a_ratio_no_method_can_take(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["demo", "--ratio", "0.9", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--ratio must be in (0, 0.75]" in capsys.readouterr().err
