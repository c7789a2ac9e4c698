"""The repository's own rules: no symbolic links, one wire codec in two places kept
identical, and no import cycle between the service's packages."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "ModelServer" / "desam_server"


def _tracked() -> list[tuple[str, str]]:
    """(mode, path) of every file git tracks, or skip outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [(line.split()[0], line.split("\t", 1)[1]) for line in out.splitlines()]


def test_no_symbolic_links_are_tracked():
    """Extensions are checked out on Windows, where symbolic links break."""
    links = [path for mode, path in _tracked() if mode == "120000"]
    assert links == [], f"symbolic links in the repository: {links}"


def test_the_client_carries_the_services_wire_module_unchanged():
    """The Slicer side cannot import the service package, so it carries a copy of
    ``desam_server/wire.py``; the service's file is the source of truth."""
    source = PACKAGE / "wire.py"
    copy = ROOT / "SlicerDeSAM" / "SlicerDeSAMLib" / "wire.py"
    assert copy.is_file() and not copy.is_symlink()
    assert copy.read_bytes() == source.read_bytes(), (
        "SlicerDeSAM/SlicerDeSAMLib/wire.py differs from ModelServer/desam_server/wire.py: edit the service's "
        "file and copy it over (cp ModelServer/desam_server/wire.py SlicerDeSAM/SlicerDeSAMLib/wire.py)")


def _node(module: Path) -> str:
    """The part of the package a module belongs to: its sub-package (``engine``, ``io``,
    ...) or, for a top-level module, the module itself."""
    rel = module.relative_to(PACKAGE).with_suffix("")
    return rel.parts[0] if len(rel.parts) > 1 else rel.name


def _imports(module: Path) -> set[str]:
    """The package parts a module imports (relative and absolute ``desam_server`` imports,
    at any depth of the module, lazy imports included)."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    package_parts = module.relative_to(PACKAGE).parent.parts
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package_parts[: len(package_parts) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [base + [alias.name] for alias in node.names]
            elif node.module and node.module.split(".")[0] == "desam_server":
                names = [node.module.split(".")[1:]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "desam_server"]
        else:
            continue
        for parts in names:
            if parts and parts[0] != "__init__":
                found.add(parts[0])
    return found


def test_the_packages_import_each_other_without_cycles():
    """modeling, engine, io, api and the top-level modules form a layered graph: no two of
    them import each other, directly or through others."""
    graph: dict[str, set[str]] = {}
    for module in PACKAGE.rglob("*.py"):
        node = _node(module)
        if node == "__init__":
            continue
        graph.setdefault(node, set()).update(n for n in _imports(module) if n != node)
    known = set(graph)
    for node in graph:
        graph[node] &= known
    assert {"modeling", "engine", "io", "api", "wire"} <= known

    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
