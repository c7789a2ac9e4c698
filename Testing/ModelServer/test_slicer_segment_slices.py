"""SegmentSlices on slicer-core: one slice (or a slab) of a segment written and read on a
volume's grid, along k, j and i, with oblique directions and different linear parent
transforms on the volume and the segmentation; other slices and other segments untouched."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk

from SlicerDeSAMLib import nodes, slices
from SlicerDeSAMLib.SegmentSlices import SegmentSlices

from slicer_helpers import add_linear_transform, add_segmentation, add_volume, core_scene, oblique_ijk_to_ras, rigid

SHAPE = (9, 14, 17)                                   # K, J, I
IJK_TO_RAS = oblique_ijk_to_ras((0.8, 1.1, 2.5), (15.0, -20.0, 35.0), (-20.0, 10.0, 3.0))
PLACEMENTS = {
    "none": (None, None),
    "volume": (rigid((10.0, 0.0, 25.0), (5.0, -7.0, 2.0)), None),
    "segmentation": (None, rigid((-15.0, 20.0, 0.0), (-3.0, 4.0, 11.0))),
    "both": (rigid((10.0, 0.0, 25.0), (5.0, -7.0, 2.0)), rigid((-15.0, 20.0, 0.0), (-3.0, 4.0, 11.0), scale=1.1)),
}


@pytest.fixture()
def scene():
    with core_scene() as s:
        yield s


def placed(scene, placement: str):
    """A volume and a segmentation (with one segment) under the placement's transforms."""
    volume_matrix, segmentation_matrix = PLACEMENTS[placement]
    volume_parent = None if volume_matrix is None else add_linear_transform(scene.scene, volume_matrix, "vt")
    seg_parent = None if segmentation_matrix is None else add_linear_transform(scene.scene, segmentation_matrix, "st")
    volume = add_volume(scene.scene, np.zeros(SHAPE, np.int16), IJK_TO_RAS, parent=volume_parent)
    segmentation, segment_id = add_segmentation(scene.scene, volume, parent=seg_parent)
    return volume, segmentation, segment_id


def mask_for(axis: str, seed: int) -> np.ndarray:
    h, w = {"k": SHAPE[1:], "j": (SHAPE[0], SHAPE[2]), "i": SHAPE[:2]}[axis]
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), bool)
    r0, c0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[r0:r0 + h // 2, c0:c0 + w // 2] = True
    mask[rng.integers(0, h), rng.integers(0, w)] = True      # a lone voxel: no smoothing, no resampling
    return mask


def voxels_in_volume_grid(segmentation, segment_id, volume) -> np.ndarray:
    """The segment as a K x J x I bool array on the volume's grid, computed independently of
    SegmentSlices: each voxel of the segment's own labelmap taken to world through the
    segmentation's parents, then into the volume's IJK with Slicer's RAS-to-IJK and the
    volume's parents, and rounded."""
    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(segment_id, labelmap)
    out = np.zeros(SHAPE, bool)
    extent = labelmap.GetExtent()
    if extent[0] > extent[1]:
        return out
    values = vtk.util.numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars()).reshape(
        extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    k, j, i = np.nonzero(values)
    ijk = np.c_[i + extent[0], j + extent[2], k + extent[4], np.ones(len(i))]
    image_to_local = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_local)
    local_to_world = nodes.parent_to_world(segmentation)
    world = (np.eye(4) if local_to_world is None else local_to_world) @ nodes.matrix_to_array(image_to_local) @ ijk.T
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume.GetRASToIJKMatrix(ras_to_ijk)
    world_to_parent = vtk.vtkMatrix4x4()
    slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(None, volume.GetParentTransformNode(), world_to_parent)
    vijk = (nodes.matrix_to_array(ras_to_ijk) @ nodes.matrix_to_array(world_to_parent) @ world)[:3].T
    rounded = np.rint(vijk).astype(int)
    assert np.abs(vijk - rounded).max() < 1e-4, "the segment's voxels are not on the volume's grid"
    out[rounded[:, 2], rounded[:, 1], rounded[:, 0]] = True
    return out


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_write_one_slice_keeps_the_others_and_lands_on_the_volume_grid(scene, axis, placement):
    volume, segmentation, segment_id = placed(scene, placement)
    io = SegmentSlices()
    expected = np.zeros(SHAPE, bool)
    first, second = 2, 5
    for index, seed in ((first, 1), (second, 2), (first, 3)):   # the third write replaces the first slice
        mask = mask_for(axis, seed)
        io.write_slice(segmentation, segment_id, volume, axis, index, mask)
        slices.put_slice(expected, axis, index, mask)
    np.testing.assert_array_equal(voxels_in_volume_grid(segmentation, segment_id, volume), expected)
    for index in range(SHAPE["kji".index(axis)]):
        np.testing.assert_array_equal(io.read_slice(segmentation, segment_id, volume, axis, index),
                                      slices.take_slice(expected, axis, index))
    io.write_slice(segmentation, segment_id, volume, axis, second, np.zeros_like(mask_for(axis, 0)))
    slices.put_slice(expected, axis, second, np.zeros_like(mask_for(axis, 0)))
    np.testing.assert_array_equal(voxels_in_volume_grid(segmentation, segment_id, volume), expected)


def test_slicer_util_reads_back_the_written_slices_without_transforms(scene):
    volume, segmentation, segment_id = placed(scene, "none")
    io = SegmentSlices()
    mask = mask_for("k", 4)
    io.write_slice(segmentation, segment_id, volume, "k", 3, mask)
    array = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume)
    assert array.shape == SHAPE
    np.testing.assert_array_equal(array[3] > 0, mask)
    assert not array[np.arange(SHAPE[0]) != 3].any()


@pytest.mark.parametrize("axis", ["k", "j", "i"])
def test_slab_write_and_read(scene, axis):
    volume, segmentation, segment_id = placed(scene, "both")
    io = SegmentSlices()
    io.write_slice(segmentation, segment_id, volume, axis, 0, mask_for(axis, 7))
    slab = np.stack([mask_for(axis, s) for s in (8, 9, 10)])
    io.write_slab(segmentation, segment_id, volume, axis, 2, slab)
    np.testing.assert_array_equal(io.read_slab(segmentation, segment_id, volume, axis, 2, 3), slab)
    np.testing.assert_array_equal(io.read_slice(segmentation, segment_id, volume, axis, 0), mask_for(axis, 7))
    assert not io.read_slice(segmentation, segment_id, volume, axis, 1).any()
    expected = np.zeros(SHAPE, bool)
    slices.put_slice(expected, axis, 0, mask_for(axis, 7))
    slices.put_slab(expected, axis, 2, slab)
    np.testing.assert_array_equal(voxels_in_volume_grid(segmentation, segment_id, volume), expected)


def test_other_segments_sharing_the_layer_are_untouched(scene):
    volume, segmentation, segment_id = placed(scene, "both")
    other_id = segmentation.GetSegmentation().AddEmptySegment("", "Other")
    io = SegmentSlices()
    other = np.zeros(SHAPE[1:], bool)
    other[:, :4] = True
    io.write_slice(segmentation, other_id, volume, "k", 4, other)
    mask = np.zeros(SHAPE[1:], bool)
    mask[5:9, 8:15] = True
    io.write_slice(segmentation, segment_id, volume, "k", 4, mask)
    io.write_slice(segmentation, segment_id, volume, "k", 4, mask[::-1])
    np.testing.assert_array_equal(io.read_slice(segmentation, other_id, volume, "k", 4), other)
    np.testing.assert_array_equal(io.read_slice(segmentation, segment_id, volume, "k", 4), mask[::-1])


def test_reading_a_segment_on_another_grid_resamples_it(scene):
    """A segmentation whose geometry is another volume's (finer, shifted): read_slice
    resamples it onto the volume's grid."""
    volume, _, _ = placed(scene, "none")
    fine_matrix = IJK_TO_RAS.copy()
    fine_matrix[:3, :3] /= 2
    fine = add_volume(scene.scene, np.zeros((18, 28, 34), np.int16), fine_matrix, name="fine")
    segmentation, segment_id = add_segmentation(scene.scene, fine)
    io = SegmentSlices()
    block = np.zeros((18, 28, 34), bool)
    block[4:9, 6:20, 10:30] = True                              # volume voxels k 2..4, j 3..9, i 5..14
    io.write_slab(segmentation, segment_id, fine, "k", 0, block)
    got = io.read_slab(segmentation, segment_id, volume, "k", 0, SHAPE[0])
    expected = np.zeros(SHAPE, bool)
    expected[2:5, 3:10, 5:15] = True
    assert (got != expected).sum() <= 0.02 * expected.sum(), "nearest-neighbour resampling off by more than a rim"
    assert got[3, 6, 10] and not got[0].any()


def test_ensure_reference_geometry_sets_the_volume_grid_once(scene):
    volume = add_volume(scene.scene, np.zeros(SHAPE, np.int16), IJK_TO_RAS)
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "S")
    io = SegmentSlices()
    assert io.ensure_reference_geometry(segmentation, volume)
    assert not io.ensure_reference_geometry(segmentation, volume)
    mask = mask_for("j", 11)
    io.write_slice(segmentation, segment_id, volume, "j", 6, mask)
    expected = np.zeros(SHAPE, bool)
    slices.put_slice(expected, "j", 6, mask)
    np.testing.assert_array_equal(voxels_in_volume_grid(segmentation, segment_id, volume), expected)


def test_bad_inputs_are_refused_with_their_reason(scene):
    volume, segmentation, segment_id = placed(scene, "none")
    io = SegmentSlices()
    with pytest.raises(ValueError, match="no segment with id 'nope'"):
        io.write_slice(segmentation, "nope", volume, "k", 0, np.zeros(SHAPE[1:]))
    with pytest.raises(ValueError, match="outside"):
        io.write_slice(segmentation, segment_id, volume, "k", SHAPE[0], np.zeros(SHAPE[1:]))
    with pytest.raises(ValueError, match="got"):
        io.write_slice(segmentation, segment_id, volume, "j", 0, np.zeros(SHAPE[1:]))


def test_overlap_with_a_segment_sharing_the_layer_keeps_both(scene):
    """Where the new mask covers voxels of another segment in the same labelmap layer, the
    write goes through Slicer's merge (which separates the layers): both keep their voxels."""
    volume, segmentation, segment_id = placed(scene, "both")
    other_id = segmentation.GetSegmentation().AddEmptySegment("", "Other")
    io = SegmentSlices()
    other = np.zeros(SHAPE[1:], bool)
    other[2:8, 2:8] = True
    io.write_slice(segmentation, other_id, volume, "k", 4, other)
    io.write_slice(segmentation, segment_id, volume, "k", 4, np.roll(other, 9, axis=1))
    segmentation.GetSegmentation().CollapseBinaryLabelmaps(False)
    assert segmentation.GetSegmentation().GetNumberOfLayers() == 1, "the segments should share one layer here"
    mask = np.zeros(SHAPE[1:], bool)
    mask[5:11, 5:11] = True                                      # overlaps Other at [5:8, 5:8]
    io.write_slice(segmentation, segment_id, volume, "k", 4, mask)
    np.testing.assert_array_equal(io.read_slice(segmentation, other_id, volume, "k", 4), other)
    np.testing.assert_array_equal(io.read_slice(segmentation, segment_id, volume, "k", 4), mask)
    expected = np.zeros(SHAPE, bool)
    expected[4] = mask
    np.testing.assert_array_equal(voxels_in_volume_grid(segmentation, segment_id, volume), expected)


def test_writing_onto_a_segmentation_on_another_grid_goes_through_slicers_resampling(scene):
    volume, _, _ = placed(scene, "none")
    fine_matrix = IJK_TO_RAS.copy()
    fine_matrix[:3, :3] /= 2
    fine = add_volume(scene.scene, np.zeros((18, 28, 34), np.int16), fine_matrix, name="fine")
    segmentation, segment_id = add_segmentation(scene.scene, fine)
    io = SegmentSlices()
    mask = np.zeros(SHAPE[1:], bool)
    mask[3:10, 5:15] = True
    kept = np.zeros((18, 28, 34), bool)
    kept[10:12] = np.repeat(np.repeat(mask[::-1], 2, axis=0), 2, axis=1)       # coarse slice 5, on the fine grid
    io.write_slab(segmentation, segment_id, fine, "k", 0, kept)
    io.write_slice(segmentation, segment_id, volume, "k", 3, np.ones(SHAPE[1:], bool))
    io.write_slice(segmentation, segment_id, volume, "k", 3, mask)          # MERGE_MIN zeros, MERGE_MAX mask
    back = io.read_slab(segmentation, segment_id, volume, "k", 0, SHAPE[0])
    assert (back[3] != mask).sum() <= 0.05 * mask.sum()
    assert (back[5] != mask[::-1]).sum() <= 0.05 * mask.sum()                # the other slice kept
    assert not back[[0, 1, 2, 4, 6, 7, 8]].any()


def test_a_write_notifies_slicer_and_updates_the_closed_surface(scene):
    volume, segmentation, segment_id = placed(scene, "volume")
    io = SegmentSlices()
    block = np.zeros(SHAPE, bool)
    block[2:7, 3:11, 4:14] = True
    io.write_slab(segmentation, segment_id, volume, "k", 0, block)
    assert segmentation.CreateClosedSurfaceRepresentation()
    surface = vtk.vtkPolyData()
    segmentation.GetClosedSurfaceRepresentation(segment_id, surface)
    before = surface.GetNumberOfPoints()
    assert before > 0
    seen = []
    segmentation.GetSegmentation().AddObserver(slicer.vtkSegmentation.SourceRepresentationModified,
                                               lambda caller, event: seen.append(event))
    io.write_slice(segmentation, segment_id, volume, "k", 8, np.ones(SHAPE[1:], bool))
    assert seen, "no SourceRepresentationModified event"
    assert segmentation.GetClosedSurfaceRepresentation(segment_id, surface), "the closed surface was not rebuilt"
    assert surface.GetNumberOfPoints() > before


def test_a_segmentation_without_reference_geometry_takes_the_first_slice_as_written(scene):
    volume = add_volume(scene.scene, np.zeros(SHAPE, np.int16), IJK_TO_RAS)
    segmentation = scene.scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = segmentation.GetSegmentation().AddEmptySegment("", "S")
    io = SegmentSlices()
    first, second = mask_for("k", 12), mask_for("k", 13)
    io.write_slice(segmentation, segment_id, volume, "k", 4, first)
    io.write_slice(segmentation, segment_id, volume, "k", 6, second)
    expected = np.zeros(SHAPE, bool)
    expected[4], expected[6] = first, second
    np.testing.assert_array_equal(voxels_in_volume_grid(segmentation, segment_id, volume), expected)
