"""Which slice of a volume a slice view shows, which view a prompt was placed on, and
moving the views to a slice: MRML only (slice nodes, no Qt), so it runs on slicer-core.

A slice node's SliceToRAS matrix holds the view's plane: column 2 is its normal and column
3 its centre, in world (RAS) coordinates. The volume's index axis most parallel to the
normal is the slicing axis (``VolumeGeometry.axis_for_normal``), the centre gives the index.
"""

from __future__ import annotations

import numpy as np
import slicer

from SlicerDeSAMLib import nodes
from SlicerDeSAMLib.VolumeGeometry import VolumeGeometry


class SliceViews:
    """Static helpers; ``scene``: the MRML scene holding the slice nodes."""

    @staticmethod
    def geometry(volume_node) -> VolumeGeometry:
        """The volume's grid in world coordinates (linear parent transforms included)."""
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("Select a volume with image data first.")
        return nodes.volume_geometry(volume_node)

    @staticmethod
    def plane(slice_node) -> tuple[np.ndarray, np.ndarray]:
        """(normal, centre) of the view's plane in world coordinates."""
        m = slice_node.GetSliceToRAS()
        normal = np.array([m.GetElement(r, 2) for r in range(3)])
        centre = np.array([m.GetElement(r, 3) for r in range(3)])
        return normal, centre

    @classmethod
    def slice_of(cls, volume_node, slice_node) -> tuple[str, int] | None:
        """(axis, index) of the volume's slice the view shows; None when its centre is
        outside the volume."""
        normal, centre = cls.plane(slice_node)
        geometry = cls.geometry(volume_node)
        axis = geometry.axis_for_normal(normal)
        try:
            return axis, geometry.slice_index(centre, axis)
        except ValueError:
            return None

    @classmethod
    def red_slice(cls, scene, volume_node) -> tuple[str, int]:
        """(axis, index) of the volume's slice the Red view shows."""
        where = cls.slice_of(volume_node, scene.GetNodeByID("vtkMRMLSliceNodeRed"))
        if where is None:
            raise ValueError(f"The Red view does not show a slice of {volume_node.GetName()!r}.")
        return where

    @classmethod
    def axis_for_point(cls, scene, volume_node, ras) -> str:
        """The axis of the view a prompt was placed on: among the views shown in the layout,
        the one whose plane is closest to the point (it lies on it), its normal mapped to
        the volume's index axis; "k" when no view is shown."""
        point = np.asarray(ras, dtype=float)
        best, best_distance = None, np.inf
        for slice_node in slicer.util.getNodesByClass("vtkMRMLSliceNode", scene):
            if not slice_node.IsMappedInLayout():
                continue
            normal, centre = cls.plane(slice_node)
            distance = abs(float(np.dot(point - centre, normal))) / max(float(np.linalg.norm(normal)), 1e-12)
            if distance < best_distance:
                best, best_distance = normal, distance
        return "k" if best is None else cls.geometry(volume_node).axis_for_normal(best)

    @classmethod
    def jump_to_slice(cls, scene, volume_node, axis: str, index: int) -> np.ndarray:
        """Centre every slice view on the middle of the volume's slice ``index`` along
        ``axis``; returns that point (world RAS)."""
        ras = np.asarray(cls.geometry(volume_node).slice_center(axis, index), dtype=float)[:3]
        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return ras
