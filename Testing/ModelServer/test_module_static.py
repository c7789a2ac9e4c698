"""Static checks of the Slicer module's Python for what no test machine here can run (no
Slicer application): the Slicer names it uses exist, the logic methods and parameters the
panels call exist, every file compiles and ruff passes. (The .ui files, CMake lists and
index entry: test_module_ui_files.py.)

slicer-core (the PyPI package: MRML core + slicer.util) is the reference for ``slicer.X``
and ``slicer.util.X``; PySide6 for ``qt.X``. Names only the Slicer application has are
listed in GUI_ONLY with the file of Slicer's repository (github.com/Slicer/Slicer, main)
that defines them.
"""

from __future__ import annotations

import ast
import py_compile
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from module_static_helpers import (
    COLLABORATORS,
    LIB,
    PY_FILES,
    ROOT,
    attribute_chains,
    class_members,
    name_chain,
    parse,
)

pytest.importorskip("slicer.util")  # slicer-core (the test extra)
slicer = sys.modules["slicer"]

# Names of the Slicer application (not in slicer-core), each with where Slicer defines it.
GUI_ONLY = {
    "slicer.app": "Base/Python/slicerqt.py (setattr(slicer, 'app', ...)); class Base/QTGUI/qSlicerApplication.h",
    "slicer.ScriptedLoadableModule": "Base/Python/slicer/ScriptedLoadableModule.py",
    "slicer.parameterNodeWrapper": "Base/Python/slicer/parameterNodeWrapper/__init__.py",
    "slicer.i18n": "Base/Python/slicer/i18n.py",
    "slicer.qSlicerMarkupsPlaceWidget": "Modules/Loadable/Markups/Widgets/qSlicerMarkupsPlaceWidget.h",
    "slicer.qSlicerSegmentEditorAbstractEffect":
        "Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorAbstractEffect.h",
}
# Modules the Slicer application provides (besides slicer, vtk, numpy and the standard library).
GUI_MODULES = {
    "qt": "PythonQt's Qt wrapping, set up with Slicer's application (Base/Python/slicerqt.py imports it)",
    "SegmentEditorEffects": "Modules/Loadable/Segmentations/EditorEffects/Python/SegmentEditorEffects/__init__.py",
    "qSlicerSegmentationsEditorEffectsPythonQt":
        "PythonQt wrapping of Modules/Loadable/Segmentations/EditorEffects/qSlicerSegmentEditorScriptedEffect.h",
    "SampleData": "Modules/Scripted/SampleData/SampleData.py",
}
ALLOWED_THIRD_PARTY = {"numpy", "vtk", "slicer", "SlicerDeSAMLib"}


def _slicer_names() -> dict[str, set[str]]:
    """'slicer.X[.Y]' used anywhere in the module -> the files using it."""
    used: dict[str, set[str]] = {}
    for path in PY_FILES:
        names = set()
        for chain in attribute_chains(path, "slicer"):
            names.add(".".join(chain[:3]) if len(chain) >= 3 else ".".join(chain))
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "slicer":
                if node.module == "slicer":
                    names.update(f"slicer.{a.name}" for a in node.names)
                elif node.module == "slicer.util":
                    names.update(f"slicer.util.{a.name}" for a in node.names)
                else:
                    names.add(node.module)
        for name in names:
            used.setdefault(name, set()).add(path.name)
    return used


def _gui_only(name: str) -> bool:
    return any(name == g or name.startswith(g + ".") for g in GUI_ONLY)


def test_slicer_names_exist_in_slicer_core_or_are_listed_gui_names():
    missing = []
    for name, files in sorted(_slicer_names().items()):
        if _gui_only(name):
            continue
        obj, parts = slicer, name.split(".")[1:]
        if parts[0] == "mrmlScene":
            # The application's scene (Base/Python/slicerqt.py sets slicer.mrmlScene); slicer-core
            # leaves setting it to the caller. Its members are vtkMRMLScene's.
            obj, parts = slicer.vtkMRMLScene, parts[1:]
        for part in parts:
            if not hasattr(obj, part):
                missing.append(f"{name} (in {', '.join(sorted(files))})")
                break
            obj = getattr(obj, part)
    assert not missing, "not in slicer-core and not in GUI_ONLY: " + "; ".join(missing)


def test_gui_only_list_is_used_and_short():
    used = _slicer_names()
    unused = [g for g in GUI_ONLY if not any(n == g or n.startswith(g + ".") for n in used)]
    assert len(GUI_ONLY) <= 12
    assert not unused, unused


def test_qt_names_exist_in_qt():
    qtw = pytest.importorskip("PySide6.QtWidgets")
    from PySide6 import QtCore, QtGui

    missing = []
    for path in PY_FILES:
        for chain in attribute_chains(path, "qt"):
            if not any(hasattr(m, chain[1]) for m in (QtCore, QtGui, qtw)):
                missing.append(f"qt.{chain[1]} ({path.name})")
    assert not missing, missing


def test_imports_are_slicers_own_python():
    """Inside Slicer the module may use only what Slicer's Python has: no torch, no pip."""
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in PY_FILES:
        for node in ast.walk(parse(path)):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in stdlib and top not in ALLOWED_THIRD_PARTY and top not in GUI_MODULES:
                    bad.append(f"{path.name}: import {name}")
    assert not bad, bad



def _session_calls() -> dict[str, set[tuple[str, str]]]:
    """collaborator attribute -> {(member, file)} for every ``<...>session.<attr>.<member>``
    and ``<...>session.<member>``."""
    calls: dict[str, set[tuple[str, str]]] = {}
    for path in PY_FILES:
        tree = parse(path)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            chain = name_chain(node)
            if not chain:
                continue
            if path.name == "Session.py" and chain[0] == "self" and len(chain) >= 3 and chain[1] in COLLABORATORS:
                calls.setdefault(chain[1], set()).add((chain[2], path.name))
            for i, part in enumerate(chain[:-1]):
                if part.endswith("session"):
                    rest = chain[i + 1:]
                    if len(rest) >= 2 and rest[0] in COLLABORATORS:
                        calls.setdefault(rest[0], set()).add((rest[1], path.name))
                    elif len(rest) == 1:
                        calls.setdefault("", set()).add((rest[0], path.name))
    return calls


@pytest.mark.parametrize("attribute", sorted(COLLABORATORS))
def test_logic_methods_the_panels_call_exist(attribute):
    file, cls = COLLABORATORS[attribute]
    used = _session_calls().get(attribute, set())
    assert used, f"no call on session.{attribute}"
    members = class_members(file, cls)
    if members is None:
        pytest.skip(f"{file} is not on this branch yet (another helper's branch); its calls: "
                    + ", ".join(sorted({m for m, _ in used})))
    missing = sorted(f"{cls}.{m} ({f})" for m, f in used if m not in members)
    assert not missing, missing


def test_session_members_the_panels_use_exist():
    members = class_members("Session.py", "Session")
    used = _session_calls().get("", set())
    missing = sorted(f"Session.{m} ({f})" for m, f in used if m not in members and m not in COLLABORATORS)
    assert not missing, missing


def test_imported_names_exist_in_the_lib():
    missing, skipped = [], []
    for path in PY_FILES:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("SlicerDeSAMLib."):
                source = LIB / (node.module.split(".", 1)[1] + ".py")
                if not source.exists():
                    skipped.append(node.module)
                    continue
                defined = {n.name for n in parse(source).body if isinstance(n, ast.ClassDef | ast.FunctionDef)}
                defined |= {t.id for n in parse(source).body if isinstance(n, ast.Assign) for t in n.targets
                            if isinstance(t, ast.Name)}
                defined |= {a.asname or a.name for n in parse(source).body if isinstance(n, ast.ImportFrom)
                            for a in n.names}  # re-exported
                missing += [f"{a.name} from {node.module} ({path.name})" for a in node.names if a.name not in defined]
    assert not missing, missing


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: p.name)
def test_python_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "out.pyc"), doraise=True)


def test_module_passes_ruff():
    ruff = Path(sysconfig.get_path("scripts")) / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed in this environment")
    done = subprocess.run([str(ruff), "check", "SlicerDeSAM", "scripts/preview_panels.py", "scripts/draw_icons.py"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_module_widget_members_the_panels_use_exist():
    members = class_members("ModuleWidget.py", "ModuleWidget")
    used = set()
    for path in PY_FILES:
        for chain in attribute_chains(path, "self"):
            if len(chain) >= 3 and chain[1] == "module":
                used.add((chain[2], path.name))
    assert used
    missing = sorted(f"ModuleWidget.{m} ({f})" for m, f in used if m not in members)
    assert not missing, missing


def _lib_classes() -> dict[str, ast.ClassDef]:
    classes = {}
    for path in sorted(LIB.glob("*.py")):
        for node in parse(path).body:
            if isinstance(node, ast.ClassDef):
                classes.setdefault(node.name, node)
    return classes


def _signature(cls: ast.ClassDef, method: str):
    """(positional names, names with defaults or keyword-only, accepts *args, accepts **kwargs)
    of ``cls.method`` (``__init__``: the dataclass fields when there is none); None if unknown."""
    for item in cls.body:
        if isinstance(item, ast.FunctionDef) and item.name == method:
            args = item.args
            positional = [a.arg for a in args.posonlyargs + args.args]
            decorators = {d.id for d in item.decorator_list if isinstance(d, ast.Name)}
            if "staticmethod" not in decorators and positional:
                positional = positional[1:]  # self / cls
            names = set(positional) | {a.arg for a in args.kwonlyargs}
            return positional, names, args.vararg is not None, args.kwarg is not None
    if method == "__init__" and any("dataclass" in ast.unparse(d) for d in cls.decorator_list):
        fields = [s.target.id for s in cls.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]
        return fields, set(fields), False, False
    return None


def _check_call(call: ast.Call, sig, what: str, extra_positional: int = 0) -> list[str]:
    positional, names, varargs, varkw = sig
    problems = []
    count = len(call.args) + extra_positional
    if any(isinstance(a, ast.Starred) for a in call.args):
        return problems
    if count > len(positional) and not varargs:
        problems.append(f"{what}: {count} positional arguments, takes {len(positional)}")
    for keyword in call.keywords:
        if keyword.arg is not None and keyword.arg not in names and not varkw:
            problems.append(f"{what}: no parameter {keyword.arg!r}")
    return problems


def test_calls_match_the_logic_signatures():
    classes = _lib_classes()
    targets = {attr: classes.get(cls) for attr, (_, cls) in COLLABORATORS.items()}
    problems, checked = [], 0
    for path in PY_FILES:
        imported = {a.asname or a.name for n in ast.walk(parse(path)) if isinstance(n, ast.ImportFrom)
                    and n.module and n.module.startswith("SlicerDeSAMLib") for a in n.names}
        for node in ast.walk(parse(path)):
            if not isinstance(node, ast.Call):
                continue
            chain = name_chain(node.func)
            if not chain:
                continue
            where = f"{path.name}:{node.lineno}"
            resolved = None
            if len(chain) >= 3 and chain[-3].endswith("session") and chain[-2] in targets:
                resolved = (targets[chain[-2]], chain[-1])
            elif len(chain) == 1 and chain[0] in imported and chain[0] in classes:
                resolved = (classes[chain[0]], "__init__")
            elif len(chain) == 2 and chain[0] in imported and chain[0] in classes:
                resolved = (classes[chain[0]], chain[1])
            if resolved and resolved[0] is not None:
                sig = _signature(*resolved)
                if sig is not None:
                    checked += 1
                    problems += _check_call(node, sig, f"{where} {resolved[0].name}.{resolved[1]}")
            # worker.submit(fn, *args): the args go to fn
            if chain[-1] == "submit" and node.args:
                fn = name_chain(node.args[0])
                if fn and len(fn) >= 3 and fn[-3].endswith("session") and fn[-2] in targets and targets[fn[-2]]:
                    sig = _signature(targets[fn[-2]], fn[-1])
                    if sig is not None:
                        checked += 1
                        inner = ast.Call(func=node.args[0], args=node.args[1:], keywords=[])
                        problems += _check_call(inner, sig, f"{where} submit({targets[fn[-2]].name}.{fn[-1]})")
    assert checked >= 10, checked
    assert not problems, problems
