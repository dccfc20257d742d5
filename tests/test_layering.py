"""The floors of the house (docs/architecture.md): an import only ever points down, and the CLI room is on top.

    surd (the ground floor: contracts, stage logic, sources, demo)
    pipelines (executors, recipes, export)
    annotations | adapter (side by side: neither imports the other)
    surd.cli, surd.__main__ (the CLI room: the only code that imports every package)

Read from the source with `ast`, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("surd", "pipelines", "annotations", "adapter")

# What each floor may import from our packages (its own package included).
ALLOWED = {
    "surd": {"surd"},
    "pipelines": {"surd", "pipelines"},
    "annotations": {"surd", "pipelines", "annotations"},
    "adapter": {"surd", "pipelines", "adapter"},
    "surd.cli": {"surd", "surd.cli", "pipelines", "annotations", "adapter"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def floor(module: str) -> str:
    # The CLI room: the `surd` command and its `python -m surd` entry point.
    if module in ("surd.cli", "surd.__main__") or module.startswith("surd.cli."):
        return "surd.cli"
    return module.split(".")[0]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import of our packages in one file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from surd import cli` imports the module surd.cli
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def is_module(name: str) -> bool:
    parts = name.split(".")
    return (ROOT.joinpath(*parts).with_suffix(".py")).is_file() or (ROOT.joinpath(*parts) / "__init__.py").is_file()


def test_every_import_points_down() -> None:
    wrong = []
    for path in sources():
        here = floor(module_name(path))
        for line, name in imports(path):
            if not is_module(name):  # `from x import some_function`: the module is x, counted on its own
                continue
            if floor(name) not in ALLOWED[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} imports {name} ({floor(name)})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path: Path) -> None:
    # The test above must be able to fail: an upward import written the ways code writes imports.
    for text in ("from pipelines.executor import run_job\n", "import adapter.train\n",
                 "def f():\n    from annotations import reviews\n"):
        probe = ROOT / "surd" / "_layering_probe.py"
        probe.write_text(text)
        try:
            with pytest.raises(AssertionError, match="_layering_probe"):
                test_every_import_points_down()
        finally:
            probe.unlink()


def test_cli_package_has_no_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for path in (ROOT / "surd" / "cli").glob("*.py"):
        graph[module_name(path)] = {n for _, n in imports(path) if floor(n) == "surd.cli" and is_module(n)}
    for module in graph:
        graph[module].discard(module)
    # __init__ (the app) may import its command modules; none of them may import it back, directly or not.
    seen: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        if seen.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*stack, node]))
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, [*stack, node])
        seen[node] = 2

    for module in sorted(graph):
        visit(module, [])
