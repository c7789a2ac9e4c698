"""Shared helpers of the Slicer module's static checks (test_module_static.py,
test_module_ui_files.py): the module's files, AST helpers, the .ui reader, the logic
classes' members."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "SlicerDeSAM"
LIB = MODULE / "SlicerDeSAMLib"
UI_DIR = MODULE / "Resources" / "UI"
PY_FILES = sorted(MODULE.rglob("*.py"))


def parse(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), filename=str(path))


def name_chain(node: ast.AST) -> list[str] | None:
    """``a.b.c`` -> ["a", "b", "c"]; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return [node.id, *reversed(parts)]
    return None


def attribute_chains(path: Path, root: str) -> set[tuple[str, ...]]:
    """Every maximal attribute chain ``root.x.y`` in the file (as tuples)."""
    chains = set()
    tree = parse(path)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner:
            chain = name_chain(node)
            if chain and chain[0] == root:
                chains.add(tuple(chain))
    return chains


def read_ui(path: Path):
    root = ET.parse(path).getroot()
    custom = {c.findtext("class"): c.findtext("extends") for c in root.iter("customwidget")}
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    return root, custom, widgets


def qt_base(cls: str, custom: dict[str, str]) -> str:
    seen = set()
    while cls in custom and cls not in seen:
        seen.add(cls)
        cls = custom[cls]
    return cls


def panel_files() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(LIB.glob("*.py")):
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "UI_FILE"
                                                    for t in node.targets):
                out.append((path, node.value.value))
    return out


def parameter_fields() -> set[str]:
    for node in ast.walk(parse(LIB / "Parameters.py")):
        if isinstance(node, ast.ClassDef) and node.name == "SlicerDeSAMParameters":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("SlicerDeSAMParameters not found")


# The logic objects a Session holds: attribute -> (file, class).
COLLABORATORS = {
    "segmentation": ("SegmentationLogic.py", "SegmentationLogic"),
    "server": ("ServerLogic.py", "ServerLogic"),
    "training": ("TrainingLogic.py", "TrainingLogic"),
    "worker": ("BackgroundWorker.py", "BackgroundWorker"),
    "client": ("ServerClient.py", "ServerClient"),
    "editor": ("EditorLogic.py", "EditorLogic"),
}


def class_members(file: str, cls: str) -> set[str] | None:
    path = LIB / file
    if not path.exists():
        return None
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            members = set()
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    members.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    members.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    members.update(t.id for t in item.targets if isinstance(t, ast.Name))
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":  # instance attributes
                    for sub in ast.walk(item):
                        targets = sub.targets if isinstance(sub, ast.Assign) else (
                            [sub.target] if isinstance(sub, ast.AnnAssign) else [])
                        members.update(t.attr for t in targets if isinstance(t, ast.Attribute)
                                       and isinstance(t.value, ast.Name) and t.value.id == "self")
            return members
    raise AssertionError(f"{file} has no class {cls}")


def string_constants(paths) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append(node.value)
    return out


def absent_lib_modules() -> list[str]:
    """SlicerDeSAMLib modules the module imports that are not on disk (another helper's branch)."""
    absent = set()
    for path in PY_FILES:
        for node in ast.walk(parse(path)):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SlicerDeSAMLib."):
                names = [node.module.split(".", 1)[1]]
            elif isinstance(node, ast.ImportFrom) and node.module == "SlicerDeSAMLib":
                names = [a.name for a in node.names]
            absent.update(n for n in names if not (LIB / f"{n}.py").exists())
    return sorted(absent)
