"""Helpers for tests of the Slicer module on slicer-core (Slicer's real MRML classes, headless).

Stable names (other test files import them):

- ``core_scene()``: context manager yielding a ``CoreScene`` (a fresh ``vtkMRMLScene`` with
  an application logic, the segmentation converter rules registered, and the volumes,
  segmentations and colors module logics); while it is open ``slicer.mrmlScene`` is that
  scene and ``slicer.modules`` gives those logics (``slicer.modules.volumes.logic()``...), as
  ``slicer.util`` expects inside Slicer; both are restored on exit. A test file makes its
  fixture from it: ``@pytest.fixture() def scene(): with core_scene() as s: yield s``.
- ``oblique_ijk_to_ras(spacing, angles_deg, origin)``: a 4 x 4 IJKToRAS with rotated axes.
- ``add_volume``, ``add_linear_transform``, ``add_segmentation``, ``add_markups_points``:
  nodes in the scene.
- ``load_cranium(scene)``: the sample head CT (``samples.fetch_cranium``; cached under
  ~/.cache/slicer-desam/data) read by Slicer's own storage node into a scalar volume node
  whose display window/level is the sample's; ``cranium_head_mask()``: its reference head
  mask, K x J x I bool.
- ``tiny_service(tmp_path)``: the tiny random-weights service on loopback (its test decoder
  'phantom' loaded) -> URL; ``mobile_sam_service(tmp_path, decoders=("head",))``: the
  pretrained MobileSAM service on the CPU, with copies of the named structures' decoders
  from the user's decoder registry (``HEAD_DECODER``; those missing are left out) -> URL.
"""

from __future__ import annotations

import contextlib
import shutil
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from desam_server.decoder_registry import default_registry_dir

from service_helpers import live_server, tiny_settings

_MISSING = object()

#: Where the user's trained 'head' decoder lives (``make decoders``), if it exists.
HEAD_DECODER = default_registry_dir() / "head"


@dataclass
class CoreScene:
    """A scene with the module logics Slicer's ``slicer.util`` reaches for."""

    scene: slicer.vtkMRMLScene
    app_logic: slicer.vtkMRMLApplicationLogic
    volumes: slicer.vtkSlicerVolumesLogic
    segmentations: slicer.vtkSlicerSegmentationsModuleLogic
    colors: slicer.vtkSlicerColorLogic


class _Module:
    """Stands where Slicer's ``slicer.modules.<name>`` stands: ``logic()`` returns the real logic."""

    def __init__(self, logic) -> None:
        self._logic = logic

    def logic(self):
        return self._logic


def register_converter_rules() -> None:
    """Register the binary labelmap <-> closed surface conversion rules once per process
    (Slicer's application does this at start-up)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    have = {rule.GetClassName() for rule in factory.GetConverterRules()}
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        if rule.__name__ not in have:
            factory.RegisterConverterRule(rule())


@contextlib.contextmanager
def core_scene() -> Iterator[CoreScene]:
    register_converter_rules()
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkMRMLApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    for name, cls in (("colors", slicer.vtkSlicerColorLogic), ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        logics[name] = logic
    previous = {name: getattr(slicer, name, _MISSING) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{name: _Module(logic) for name, logic in logics.items()})
    try:
        yield CoreScene(scene=scene, app_logic=app, **logics)
    finally:
        for name, value in previous.items():
            if value is _MISSING:
                delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        for logic in logics.values():
            logic.SetMRMLScene(None)
        app.SetMRMLScene(None)
        scene.Clear(True)


# ---- matrices and nodes ------------------------------------------------------------------------------
def _rotation(angles_deg) -> np.ndarray:
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_ijk_to_ras(spacing=(1.0, 1.0, 1.0), angles_deg=(0.0, 0.0, 0.0), origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4 x 4: IJK -> RAS with the index axes rotated by ``angles_deg`` (about x, then y,
    then z) and scaled by ``spacing`` (i, j, k), voxel (0, 0, 0) at ``origin``."""
    m = np.eye(4)
    m[:3, :3] = _rotation(angles_deg) @ np.diag(spacing)
    m[:3, 3] = origin
    return m


def rigid(angles_deg=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.0), scale=1.0) -> np.ndarray:
    """4 x 4 rotation (and optional uniform scale) + translation, for a linear transform node."""
    return oblique_ijk_to_ras((scale, scale, scale), angles_deg, translation)


def _vtk(matrix) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r][c]))
    return out


def add_linear_transform(scene, matrix, name: str = "Transform", parent=None):
    """A vtkMRMLLinearTransformNode whose matrix to its parent is ``matrix`` (4 x 4)."""
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(_vtk(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_volume(scene, array: np.ndarray, ijk_to_ras=None, name: str = "Volume", parent=None, window=None):
    """A scalar volume node holding ``array`` (K x J x I) with IJKToRAS ``ijk_to_ras``
    (default identity), under the transform node ``parent``; a display node with
    ``window`` = (center, width) when given."""
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk(np.eye(4) if ijk_to_ras is None else ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    if window is not None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.AutoWindowLevelOff()
        display.SetWindowLevel(float(window[1]), float(window[0]))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def add_segmentation(scene, volume_node, segment_name: str = "Segment", parent=None, name: str = "Segmentation"):
    """A segmentation node with the volume's grid as reference geometry and one empty
    segment, under ``parent``; returns (segmentation node, segment id)."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segment_id = node.GetSegmentation().AddEmptySegment("", segment_name)
    return node, segment_id


def add_markups_points(scene, points_world, name: str = "Points", parent=None):
    """A vtkMRMLMarkupsFiducialNode with control points at the world positions ``points_world``."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    for point in points_world:
        index = node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0))
        node.SetNthControlPointPositionWorld(index, *(float(v) for v in point))
    return node


# ---- the sample CT -------------------------------------------------------------------------------
def load_cranium(scene):
    """The sample head CT as a scalar volume node read by Slicer's
    vtkMRMLVolumeArchetypeStorageNode, display window/level = the sample's; returns
    (volume node, the sample's ``CraniumSample``)."""
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Cranium")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(sample.volume))
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read {sample.volume}")
    node.SetAndObserveStorageNodeID(storage.GetID())
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    center, width = sample.window
    display.SetWindowLevel(float(width), float(center))
    return node, sample


def cranium_head_mask() -> np.ndarray:
    """The sample's reference head mask (cranium_head_mask.nrrd), K x J x I bool."""
    from desam_server.io import read_volume
    from desam_server.samples import fetch_cranium

    return read_volume(fetch_cranium().head_mask).array > 0


# ---- services -----------------------------------------------------------------------------------
@contextlib.contextmanager
def tiny_service(tmp_path: Path) -> Iterator[str]:
    """The tiny-encoder service (random weights, CPU, test decoder 'phantom') on 127.0.0.1; yields its URL."""
    with live_server(tiny_settings(tmp_path)) as (url, _):
        yield url


@contextlib.contextmanager
def mobile_sam_service(tmp_path: Path, decoders: tuple[str, ...] = ("head",)) -> Iterator[str]:
    """Pretrained MobileSAM on the CPU (fp32) on 127.0.0.1, its registry under ``tmp_path``
    holding copies of the user's registered decoders named in ``decoders`` (those that exist);
    yields its URL."""
    from desam_server.api import build_service

    registry = tmp_path / "registry"
    registry.mkdir(parents=True, exist_ok=True)
    for structure in decoders:
        source = default_registry_dir() / structure
        if (source / "versions.json").is_file():
            shutil.copytree(source, registry / structure)
    settings = tiny_settings(tmp_path, decoder=False, encoder="mobile_sam", registry_dir=registry)
    with live_server(settings, factory=build_service) as (url, _):
        yield url
