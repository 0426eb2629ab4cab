"""The package's shape: the library never imports the tools, ``import tokenmerge`` loads no tool library, and no
module-level import cycle exists anywhere in ``src/``."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import tokenmerge

PACKAGE = Path(tokenmerge.__file__).parent
TOOL_LIBRARIES = ("matplotlib", "rich", "torchmetrics", "accelerate", "tokenmerge.tools")  # tqdm: diffusers loads it


def module_name(path: Path) -> str:
    parts = ["tokenmerge", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The tokenmerge modules ``path`` imports (module level only, or anywhere)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if target.startswith("tokenmerge"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tokenmerge"))
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {target for target in found if target in modules and target != name}


def test_the_library_never_imports_the_tools():
    for path in PACKAGE.rglob("*.py"):
        if "tools" in path.relative_to(PACKAGE).parts:
            continue
        assert not any(t.startswith("tokenmerge.tools") for t in imports(path, top_level_only=False)), path


def test_import_tokenmerge_loads_no_tool_library():
    code = ("import sys, tokenmerge; print(','.join(m for m in " + repr(TOOL_LIBRARIES)
            + " if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"import tokenmerge loaded {loaded}"


def test_no_module_level_import_cycles():
    graph = {module_name(p): imports(p, top_level_only=True) for p in PACKAGE.rglob("*.py")}
    # A package imports its modules in __init__; a module importing its own package is not a cycle through it.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not module.startswith(t + ".")}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, "import cycle: " + " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
