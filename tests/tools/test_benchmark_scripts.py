"""The scripts in benchmarks/ import against the library as it is: they are not imported by anything else, so a
moved module would otherwise break them silently (as the tools' restructure once did)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.py")))
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as when run as a script: its siblings import by name
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(script).stem}", BENCHMARKS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # runs the imports and definitions, not main (each has a __main__ guard)
    assert callable(getattr(module, "main", None)), f"{script} has no main()"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.sh")))
def test_benchmark_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(BENCHMARKS / script)], check=True)
