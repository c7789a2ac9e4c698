"""Geometry of MRML nodes as numpy matrices (needs Slicer's core: slicer, vtk).

Functions, no state. Parent transforms must be linear: a node under a non-linear
(grid, B-spline, thin-plate) transform is refused with a message that says to harden or
remove the transform, because a voxel grid under a warp is no longer a grid of slices.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from .VolumeGeometry import VolumeGeometry

__all__ = ["matrix_to_array", "array_to_matrix", "parent_to_world", "volume_geometry", "volume_ijk_to_segmentation",
           "roi_corners_world", "NON_LINEAR_MESSAGE"]

NON_LINEAR_MESSAGE = ("'{node}' is under the non-linear transform '{transform}': harden the transform on it "
                      "(Data module: right-click it > Harden transform) or remove it, then try again")


def matrix_to_array(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """A vtkMatrix4x4 as a 4 x 4 float64 array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def array_to_matrix(array) -> vtk.vtkMatrix4x4:
    """A 4 x 4 array as a new vtkMatrix4x4."""
    a = np.asarray(array, dtype=np.float64)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(a[r, c]))
    return matrix


def _check_linear(node) -> None:
    transform = node.GetParentTransformNode()
    if transform is not None and not transform.IsTransformToWorldLinear():
        raise ValueError(NON_LINEAR_MESSAGE.format(node=node.GetName(), transform=_linear_culprit(transform)))


def _linear_culprit(transform) -> str:
    """The name of the first non-linear transform on the way to world."""
    while transform is not None:
        if not transform.IsLinear():
            return transform.GetName()
        transform = transform.GetParentTransformNode()
    return "?"


def parent_to_world(node) -> np.ndarray | None:
    """The matrix from ``node``'s local frame to world (its parent transforms, linear),
    None when it has no parent transform; ValueError for a non-linear one."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return None
    _check_linear(node)
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return matrix_to_array(matrix)


def volume_geometry(volume_node) -> VolumeGeometry:
    """The ``VolumeGeometry`` of a scalar volume node: its array shape (K, J, I), its
    IJKToRAS and its parent transforms to world."""
    image = volume_node.GetImageData()
    if image is None:
        raise ValueError(f"the volume '{volume_node.GetName()}' has no image data")
    i, j, k = image.GetDimensions()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return VolumeGeometry.from_matrices((k, j, i), matrix_to_array(ijk_to_ras), parent_to_world(volume_node))


def roi_corners_world(roi_node) -> np.ndarray:
    """The 8 corners (8 x 3, world RAS) of a markups ROI node (``vtkMRMLMarkupsROINode``):
    its box of edge lengths ``GetSize()`` around its centre, through
    ``GetObjectToWorldMatrix()`` (orientation, centre and parent transforms; a non-linear
    parent is refused)."""
    _check_linear(roi_node)
    half = np.asarray(roi_node.GetSize(), dtype=np.float64) / 2.0
    if not (np.isfinite(half).all() and (half > 0).all()):
        raise ValueError(f"the ROI '{roi_node.GetName()}' has no volume: give it a size along every axis")
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    corners = np.c_[signs * half, np.ones(8)]
    return (corners @ matrix_to_array(roi_node.GetObjectToWorldMatrix()).T)[:, :3]


def volume_ijk_to_segmentation(volume_node, segmentation_node) -> np.ndarray:
    """4 x 4 from the volume's IJK to the segmentation node's local RAS (the frame of its
    labelmaps): (segmentation's parents)^-1 @ (volume's parents) @ IJKToRAS."""
    _check_linear(volume_node)
    _check_linear(segmentation_node)
    between = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
            volume_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), between):
        raise ValueError(f"the transform between '{volume_node.GetName()}' and '{segmentation_node.GetName()}' is "
                         "not linear: harden or remove their non-linear transforms, then try again")
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return matrix_to_array(between) @ matrix_to_array(ijk_to_ras)
