"""VolumeGeometry and slices against Slicer's own matrices (slicer-core): oblique,
anisotropic volumes under nested linear transforms; the service's slice frame on all
three axes; the LPS upload geometry against Slicer's NRRD writer; non-linear parents refused."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from desam_server.io import read_volume
from SlicerDeSAMLib import nodes, slices
from SlicerDeSAMLib.VolumeGeometry import VolumeGeometry

from slicer_helpers import add_linear_transform, add_volume, core_scene, oblique_ijk_to_ras, rigid

SHAPE = (7, 11, 13)                                    # K, J, I
IJK_TO_RAS = oblique_ijk_to_ras((0.7, 1.3, 2.9), (12.0, -25.0, 40.0), (-31.0, 17.5, 4.25))


@pytest.fixture()
def scene():
    with core_scene() as s:
        yield s


def oblique_volume(scene, parent=None):
    array = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    return add_volume(scene.scene, array, IJK_TO_RAS, parent=parent)


def nested_transforms(scene):
    outer = add_linear_transform(scene.scene, rigid((5.0, 30.0, -10.0), (12.0, -4.0, 9.0), scale=1.2), "outer")
    return add_linear_transform(scene.scene, rigid((-20.0, 0.0, 15.0), (-3.0, 8.0, 1.0)), "inner", parent=outer)


def slicer_world_to_ijk(volume_node) -> np.ndarray:
    """World -> IJK from Slicer: GetRASToIJKMatrix @ (world -> the volume's parent)."""
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    world_to_parent = vtk.vtkMatrix4x4()
    assert slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, volume_node.GetParentTransformNode(),
                                                                      world_to_parent)
    return nodes.matrix_to_array(ras_to_ijk) @ nodes.matrix_to_array(world_to_parent)


def random_world_points(geometry: VolumeGeometry, n: int = 50, seed: int = 0) -> np.ndarray:
    ijk = np.random.default_rng(seed).uniform(-0.5, 1.0, (n, 3)) * np.array(SHAPE[::-1])
    return geometry.ijk_to_world(ijk)


@pytest.mark.parametrize("with_parent", [False, True])
def test_world_to_ijk_is_slicers_ras_to_ijk_with_parent_transforms(scene, with_parent):
    parent = nested_transforms(scene) if with_parent else None
    volume = oblique_volume(scene, parent)
    geometry = nodes.volume_geometry(volume)
    assert geometry.shape == SHAPE
    np.testing.assert_allclose(geometry.local_ijk_to_ras, IJK_TO_RAS, atol=1e-12)
    expected = slicer_world_to_ijk(volume)
    points = random_world_points(geometry)
    homogeneous = np.c_[points, np.ones(len(points))]
    np.testing.assert_allclose(geometry.world_to_ijk(points), (homogeneous @ expected.T)[:, :3], atol=1e-9)
    np.testing.assert_allclose(geometry.ijk_to_world(geometry.world_to_ijk(points)), points, atol=1e-9)
    if with_parent:   # the parent moves the volume: world differs from local RAS
        assert not np.allclose(geometry.ijk_to_world_matrix, IJK_TO_RAS, atol=1e-3)


def test_markups_world_position_maps_to_the_voxel_it_was_put_on(scene):
    from slicer_helpers import add_markups_points

    volume = oblique_volume(scene, nested_transforms(scene))
    geometry = nodes.volume_geometry(volume)
    target = np.array([4.0, 6.0, 3.0])                          # i, j, k
    markups = add_markups_points(scene.scene, [geometry.ijk_to_world(target)])
    world = np.zeros(3)
    markups.GetNthControlPointPositionWorld(0, world)
    assert geometry.slice_index(world, "k") == 3
    assert geometry.slice_point(world, "k", 3) == pytest.approx((4.5, 6.5))
    assert geometry.slice_point(world, "j") == pytest.approx((4.5, 3.5))
    assert geometry.slice_point(world, "i") == pytest.approx((6.5, 3.5))


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_slice_frame_on_every_axis_matches_the_array_slice(axis):
    geometry = VolumeGeometry.from_matrices(SHAPE, IJK_TO_RAS, rigid((10.0, 20.0, 30.0), (1.0, 2.0, 3.0)))
    array = np.random.default_rng(1).integers(0, 1000, SHAPE)
    index = {"k": 5, "j": 2, "i": 9}[axis]
    plane = slices.take_slice(array, axis, index)
    assert plane.shape == geometry.slice_shape(axis)
    for row, col in [(0, 0), (plane.shape[0] - 1, plane.shape[1] - 1), (1, 3)]:
        ijk = {"k": (col, row, index), "j": (col, index, row), "i": (index, col, row)}[axis]
        world = geometry.ijk_to_world(np.array(ijk, float))
        assert geometry.slice_index(world, axis) == index
        x, y = geometry.slice_point(world, axis, index)
        assert (x, y) == pytest.approx((col + 0.5, row + 0.5))
        assert plane[int(y), int(x)] == array[ijk[2], ijk[1], ijk[0]]
        np.testing.assert_allclose(geometry.slice_pixel_to_world(x, y, axis, index), world, atol=1e-9)


def test_slice_index_rounds_and_refuses_points_outside():
    geometry = VolumeGeometry.from_matrices(SHAPE, IJK_TO_RAS)
    assert geometry.slice_index(geometry.ijk_to_world([1.0, 1.0, 2.49]), "k") == 2
    assert geometry.slice_index(geometry.ijk_to_world([1.0, 1.0, 2.51]), "k") == 3
    assert geometry.slice_index(geometry.ijk_to_world([1.0, 1.0, -0.49]), "k") == 0
    with pytest.raises(ValueError, match="outside the volume along axis k"):
        geometry.slice_index(geometry.ijk_to_world([1.0, 1.0, 6.6]), "k")
    with pytest.raises(ValueError, match="outside the slice"):
        geometry.slice_point(geometry.ijk_to_world([-0.7, 1.0, 2.0]), "k", 2)
    with pytest.raises(ValueError, match="axis must be one of"):
        geometry.slice_index(geometry.ijk_to_world([1.0, 1.0, 2.0]), "z")


def test_slice_box_is_the_projected_corners_clipped_to_the_slice():
    geometry = VolumeGeometry.from_matrices(SHAPE, IJK_TO_RAS, rigid((0.0, 0.0, 90.0)))
    a = geometry.ijk_to_world([9.0, 2.0, 3.0])
    b = geometry.ijk_to_world([3.0, 7.0, 4.2])          # the other corner on another slice: projected
    assert geometry.slice_box(a, b, "k", 3) == pytest.approx((3.5, 2.5, 9.5, 7.5))
    c = geometry.ijk_to_world([-5.0, -5.0, 3.0])
    assert geometry.slice_box(c, a, "k", 3) == pytest.approx((0.0, 0.0, 9.5, 2.5))
    assert geometry.slice_box(a, b, "j") == pytest.approx((3.5, 3.5, 9.5, 4.7))
    with pytest.raises(ValueError, match="no area"):
        geometry.slice_box(a, geometry.ijk_to_world([9.0, 5.0, 3.0]), "k", 3)


def test_axis_for_normal_picks_the_index_axis_most_parallel():
    geometry = VolumeGeometry.from_matrices(SHAPE, IJK_TO_RAS, rigid((30.0, -10.0, 5.0)))
    columns = geometry.ijk_to_world_matrix[:3, :3]
    for c, axis in enumerate("ijk"):
        normal = columns[:, c] / np.linalg.norm(columns[:, c])
        assert geometry.axis_for_normal(normal) == axis
        assert geometry.axis_for_normal(-normal + 0.2 * columns[:, (c + 1) % 3] / 3) == axis
    with pytest.raises(ValueError, match="non-zero"):
        geometry.axis_for_normal([0, 0, 0])


def test_lps_geometry_is_what_slicers_nrrd_writer_writes(scene, tmp_path):
    """The upload geometry (local, without the parent) equals the geometry Slicer's own
    storage node writes to NRRD (LPS), read back by the service's reader."""
    volume = oblique_volume(scene, nested_transforms(scene))
    geometry = nodes.volume_geometry(volume).lps_geometry()
    storage = scene.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(tmp_path / "oblique.nrrd"))
    assert storage.WriteData(volume)
    written = read_volume(tmp_path / "oblique.nrrd")
    np.testing.assert_array_equal(written.array, slicer.util.arrayFromVolume(volume))
    np.testing.assert_allclose(geometry["spacing"], written.geometry.spacing, rtol=1e-6)
    np.testing.assert_allclose(geometry["origin"], written.geometry.origin, atol=1e-5)
    np.testing.assert_allclose(geometry["direction"], written.geometry.direction, atol=1e-6)


def test_lps_geometry_places_voxels_where_the_local_ijk_to_ras_does():
    geometry = VolumeGeometry.from_matrices(SHAPE, IJK_TO_RAS, rigid((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)))
    lps = geometry.lps_geometry()
    ijk = np.array([3.0, 5.0, 2.0])
    p_lps = np.asarray(lps["origin"]) + lps["direction"] @ (np.asarray(lps["spacing"]) * ijk)
    np.testing.assert_allclose(np.diag([-1.0, -1.0, 1.0]) @ p_lps, (IJK_TO_RAS @ np.r_[ijk, 1.0])[:3], atol=1e-9)


def test_a_non_linear_parent_transform_is_refused_with_advice(scene):
    warp = scene.scene.AddNewNodeByClass("vtkMRMLTransformNode", "Warp")
    tps = vtk.vtkThinPlateSplineTransform()
    source, target = vtk.vtkPoints(), vtk.vtkPoints()
    for p, q in [((0, 0, 0), (0, 0, 1)), ((50, 0, 0), (50, 3, 0)), ((0, 50, 0), (2, 50, 0)), ((0, 0, 50), (0, 0, 50))]:
        source.InsertNextPoint(*p)
        target.InsertNextPoint(*q)
    tps.SetSourceLandmarks(source)
    tps.SetTargetLandmarks(target)
    tps.SetBasisToR()
    warp.SetAndObserveTransformToParent(tps)
    linear_child = add_linear_transform(scene.scene, rigid((0, 0, 10)), "Child", parent=warp)
    volume = oblique_volume(scene, linear_child)
    with pytest.raises(ValueError, match=r"non-linear transform 'Warp': harden the transform .* or remove it"):
        nodes.volume_geometry(volume)


def test_slices_put_take_and_extents_per_axis():
    array = np.zeros(SHAPE, np.uint8)
    for axis, index, hw in (("k", 3, (11, 13)), ("j", 10, (7, 13)), ("i", 0, (7, 11))):
        mask = np.random.default_rng(index).random(hw) > 0.5
        slices.put_slice(array, axis, index, mask)
        np.testing.assert_array_equal(slices.take_slice(array, axis, index), mask)
    assert slices.slice_extent(SHAPE, "k", 3) == [0, 12, 0, 10, 3, 3]
    assert slices.slice_extent(SHAPE, "j", 10) == [0, 12, 10, 10, 0, 6]
    assert slices.slice_extent(SHAPE, "i", 0) == [0, 0, 0, 10, 0, 6]
    assert slices.slab_extent(SHAPE, "j", 2, 4) == [0, 12, 2, 5, 0, 6]
    with pytest.raises(ValueError, match="outside"):
        slices.slice_extent(SHAPE, "k", 7)
    with pytest.raises(ValueError, match="outside"):
        slices.slab_extent(SHAPE, "i", 10, 4)
    with pytest.raises(ValueError, match=r"is \(7, 11\), got \(11, 13\)"):
        slices.put_slice(array, "i", 1, np.zeros((11, 13)))


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_slab_round_trip_and_vtk_order(axis):
    array = np.random.default_rng(3).integers(0, 9, SHAPE)
    slab = slices.take_slab(array, axis, 1, 3)
    assert slab.shape[0] == 3
    for n in range(3):
        np.testing.assert_array_equal(slab[n], slices.take_slice(array, axis, 1 + n))
    out = np.zeros_like(array)
    slices.put_slab(out, axis, 1, slab)
    extent = slices.slab_extent(SHAPE, axis, 1, 3)
    block = out[extent[4]:extent[5] + 1, extent[2]:extent[3] + 1, extent[0]:extent[1] + 1]
    np.testing.assert_array_equal(block, slices.slab_to_block(slab, axis))
    np.testing.assert_array_equal(slices.block_to_slab(block, axis), slab)


def test_slicer_free_files_import_only_stdlib_numpy_and_each_other():
    import ast
    import sys
    from pathlib import Path

    lib = Path(__file__).resolve().parents[2] / "SlicerDeSAM" / "SlicerDeSAMLib"
    allowed = {"numpy", "__future__"} | set(sys.stdlib_module_names)
    for name in ("VolumeGeometry.py", "slices.py", "requests.py"):
        for node in ast.walk(ast.parse((lib / name).read_text())):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                roots = set() if node.level else {(node.module or "").split(".")[0]}
                if node.level:
                    assert node.module in ("wire", "VolumeGeometry"), (name, node.module)
            else:
                continue
            assert roots <= allowed, (name, roots)


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_slice_center_is_on_that_slice_in_the_middle_of_it(axis):
    geometry = VolumeGeometry.from_matrices(SHAPE, IJK_TO_RAS, rigid((7.0, 8.0, 9.0), (1.0, 1.0, 1.0)))
    centre = geometry.slice_center(axis, 4)
    assert geometry.slice_index(centre, axis) == 4
    h, w = geometry.slice_shape(axis)
    assert geometry.slice_point(centre, axis, 4) == pytest.approx((w / 2, h / 2))
    with pytest.raises(ValueError, match="outside"):
        geometry.slice_center(axis, 99)


def test_a_markups_roi_becomes_the_roi_modes_box_and_slice_range(scene):
    """A markups ROI placed around voxels (i 3..8, j 2..6, k 1..4) of an oblique volume under
    nested transforms: its corners in world (Slicer's ObjectToWorld, the ROI under the same
    transforms) give the slice-frame box and the slices it covers, on every axis."""
    parent = nested_transforms(scene)
    volume = oblique_volume(scene, parent)
    geometry = nodes.volume_geometry(volume)
    roi = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetAndObserveTransformNodeID(parent.GetID())
    # The ROI in the volume's own frame: an oriented box along its index axes (in local RAS).
    lo, hi = np.array([3.0, 2.0, 1.0]), np.array([8.0, 6.0, 4.0])
    axes = IJK_TO_RAS[:3, :3]
    object_to_node = np.eye(4)
    object_to_node[:3, :3] = axes / np.linalg.norm(axes, axis=0)
    object_to_node[:3, 3] = (IJK_TO_RAS @ np.r_[(lo + hi) / 2, 1.0])[:3]
    roi.SetAndObserveObjectToNodeMatrix(nodes.array_to_matrix(object_to_node))
    roi.SetSize(*((hi - lo) * np.linalg.norm(axes, axis=0)))
    corners = nodes.roi_corners_world(roi)
    np.testing.assert_allclose(np.sort(geometry.world_to_ijk(corners), axis=0)[[0, -1]], [lo, hi], atol=1e-5)
    assert geometry.region_box(corners, "k") == (pytest.approx((3.5, 2.5, 8.5, 6.5), abs=1e-5), 1, 5)
    assert geometry.region_box(corners, "j") == (pytest.approx((3.5, 1.5, 8.5, 4.5), abs=1e-5), 2, 7)
    assert geometry.region_box(corners, "i") == (pytest.approx((2.5, 1.5, 6.5, 4.5), abs=1e-5), 3, 9)
    from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic

    assert SegmentationLogic.prepare_roi(volume, roi, "k") == geometry.region_box(corners, "k")
    far = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    far.SetXYZ(1e4, 1e4, 1e4)
    far.SetSize(5.0, 5.0, 5.0)
    with pytest.raises(ValueError, match="misses the volume"):
        SegmentationLogic.prepare_roi(volume, far, "k")
    flat = scene.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    flat.SetSize(5.0, 0.0, 5.0)
    with pytest.raises(ValueError, match="has no volume"):
        nodes.roi_corners_world(flat)
