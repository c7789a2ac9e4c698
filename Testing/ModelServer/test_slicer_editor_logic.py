"""EditorLogic on slicer-core's Qt-free vtkSlicerSegmentEditorLogic: one prompt is one
undo step; the editor's mask mode (editable area) and overwrite settings are honoured."""

from __future__ import annotations

import numpy as np
import pytest
import slicer

from SlicerDeSAMLib.EditorLogic import EditorLogic
from SlicerDeSAMLib.requests import PromptOutcome
from SlicerDeSAMLib.SegmentSlices import SegmentSlices

from slicer_helpers import add_linear_transform, add_segmentation, add_volume, core_scene, oblique_ijk_to_ras, rigid

SHAPE = (6, 20, 24)
IJK_TO_RAS = oblique_ijk_to_ras((0.9, 0.9, 3.0), (0.0, 10.0, 20.0), (5.0, -3.0, 1.0))


@pytest.fixture()
def scene():
    with core_scene() as s:
        yield s


@pytest.fixture()
def editor(scene):
    """(editor logic, editor node, volume, segmentation, segment ids A and B); the
    segmentation under a linear transform of its own."""
    volume = add_volume(scene.scene, np.zeros(SHAPE, np.int16), IJK_TO_RAS)
    moved = add_linear_transform(scene.scene, rigid((0.0, 0.0, 30.0), (4.0, 2.0, -1.0)))
    segmentation, a = add_segmentation(scene.scene, volume, "A", parent=moved)
    b = segmentation.GetSegmentation().AddEmptySegment("", "B")
    node = scene.scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    node.SetAndObserveSegmentationNode(segmentation)
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene.scene)
    logic.SetMRMLApplicationLogic(scene.app_logic)
    logic.SetSegmentEditorNode(node)
    logic.SetSourceVolumeNode(volume)
    assert logic.TrivialSetSourceRepresentationToBinaryLabelmap()
    logic.SetCurrentSegmentID(a)
    yield logic, node, volume, segmentation, a, b
    logic.SetSegmentEditorNode(None)


def box(r0, r1, c0, c1) -> np.ndarray:
    mask = np.zeros(SHAPE[1:], bool)
    mask[r0:r1, c0:c1] = True
    return mask


def outcome(index: int, mask: np.ndarray) -> PromptOutcome:
    return PromptOutcome(axis="k", index=index, mask=mask, iou=0.9, area=int(mask.sum()))


def read(segmentation, segment_id, volume, index) -> np.ndarray:
    return SegmentSlices().read_slice(segmentation, segment_id, volume, "k", index)


def test_one_prompt_is_one_undo_step(editor):
    logic, _, volume, segmentation, a, _ = editor
    writer = EditorLogic()
    SegmentSlices().write_slice(segmentation, a, volume, "k", 1, box(0, 5, 0, 5))
    first, second, third = box(2, 8, 3, 9), box(5, 15, 5, 15), box(10, 12, 10, 20)
    writer.apply_prompt_in_editor(logic, outcome(1, first))
    writer.apply_prompt_in_editor(logic, outcome(3, second))
    writer.apply_prompt_in_editor(logic, outcome(1, third))
    np.testing.assert_array_equal(read(segmentation, a, volume, 1), third)     # the slice replaced, not added to
    np.testing.assert_array_equal(read(segmentation, a, volume, 3), second)
    logic.Undo()
    np.testing.assert_array_equal(read(segmentation, a, volume, 1), first)
    np.testing.assert_array_equal(read(segmentation, a, volume, 3), second)
    logic.Undo()
    np.testing.assert_array_equal(read(segmentation, a, volume, 1), first)
    assert not read(segmentation, a, volume, 3).any()
    logic.Undo()
    np.testing.assert_array_equal(read(segmentation, a, volume, 1), box(0, 5, 0, 5))
    assert logic.CanRedo()
    logic.Redo()
    np.testing.assert_array_equal(read(segmentation, a, volume, 1), first)


@pytest.mark.parametrize("mode", ["all", "none"])
def test_overwrite_setting_decides_what_happens_to_other_segments(editor, mode):
    logic, node, volume, segmentation, a, b = editor
    SegmentSlices().write_slice(segmentation, b, volume, "k", 2, box(0, 10, 0, 24))
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments if mode == "all"
                          else slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    EditorLogic().apply_prompt_in_editor(logic, outcome(2, box(5, 15, 5, 15)))
    np.testing.assert_array_equal(read(segmentation, a, volume, 2), box(5, 15, 5, 15))
    other = read(segmentation, b, volume, 2)
    if mode == "all":
        np.testing.assert_array_equal(other, box(0, 10, 0, 24) & ~box(5, 15, 5, 15))
    else:
        np.testing.assert_array_equal(other, box(0, 10, 0, 24))


def test_editable_area_inside_one_segment_limits_the_prompt(editor):
    logic, node, volume, segmentation, a, b = editor
    SegmentSlices().write_slice(segmentation, b, volume, "k", 2, box(0, 10, 0, 24))
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(b)
    EditorLogic().apply_prompt_in_editor(logic, outcome(2, box(5, 15, 5, 15)))
    np.testing.assert_array_equal(read(segmentation, a, volume, 2), box(5, 10, 5, 15))
    np.testing.assert_array_equal(read(segmentation, b, volume, 2), box(0, 10, 0, 24))


def test_editable_area_outside_all_segments_keeps_the_prompt_off_others(editor):
    logic, node, volume, segmentation, a, b = editor
    SegmentSlices().write_slice(segmentation, b, volume, "k", 2, box(0, 10, 0, 24))
    SegmentSlices().write_slice(segmentation, a, volume, "k", 4, box(1, 3, 1, 3))
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteAllSegments)
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    EditorLogic().apply_prompt_in_editor(logic, outcome(2, box(5, 15, 5, 15)))
    np.testing.assert_array_equal(read(segmentation, a, volume, 2), box(10, 15, 5, 15))
    np.testing.assert_array_equal(read(segmentation, b, volume, 2), box(0, 10, 0, 24))
    np.testing.assert_array_equal(read(segmentation, a, volume, 4), box(1, 3, 1, 3))   # other slices untouched


def test_editable_intensity_range_is_honoured(editor):
    logic, node, volume, segmentation, a, _ = editor
    array = slicer.util.arrayFromVolume(volume)
    array[2, :, 12:] = 100
    slicer.util.arrayFromVolumeModified(volume)
    node.SetSourceVolumeIntensityMask(True)
    node.SetSourceVolumeIntensityMaskRange(50, 200)
    EditorLogic().apply_prompt_in_editor(logic, outcome(2, box(5, 15, 5, 15)))
    np.testing.assert_array_equal(read(segmentation, a, volume, 2), box(5, 15, 12, 15))


def test_without_a_selected_segment_it_says_so(editor):
    logic, *_ = editor
    logic.SetCurrentSegmentID("")
    with pytest.raises(ValueError, match="no segment selected"):
        EditorLogic().apply_prompt_in_editor(logic, outcome(2, box(5, 15, 5, 15)))


@pytest.mark.parametrize("visible", [True, False])
def test_overwrite_visible_segments_spares_hidden_ones(editor, visible):
    logic, node, volume, segmentation, a, b = editor
    SegmentSlices().write_slice(segmentation, b, volume, "k", 2, box(0, 10, 0, 24))
    segmentation.GetDisplayNode().SetSegmentVisibility(b, visible)
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteVisibleSegments)
    EditorLogic().apply_prompt_in_editor(logic, outcome(2, box(5, 15, 5, 15)))
    np.testing.assert_array_equal(read(segmentation, a, volume, 2), box(5, 15, 5, 15))
    expected = box(0, 10, 0, 24) & ~box(5, 15, 5, 15) if visible else box(0, 10, 0, 24)
    np.testing.assert_array_equal(read(segmentation, b, volume, 2), expected)


@pytest.mark.parametrize("axis", ["j", "i"])
def test_prompts_on_other_axes_write_that_slice_only(editor, axis):
    logic, _, volume, segmentation, a, _ = editor
    shape = {"j": (SHAPE[0], SHAPE[2]), "i": SHAPE[:2]}[axis]
    mask = np.zeros(shape, bool)
    mask[1:4, 3:12] = True
    SegmentSlices().write_slice(segmentation, a, volume, "k", 2, box(0, 20, 0, 24))
    EditorLogic().apply_prompt_in_editor(logic, PromptOutcome(axis=axis, index=7, mask=mask, iou=0.9, area=27))
    io = SegmentSlices()
    np.testing.assert_array_equal(io.read_slice(segmentation, a, volume, axis, 7), mask)
    expected_k2 = box(0, 20, 0, 24)
    if axis == "j":
        expected_k2[7] = mask[2]
    else:
        expected_k2[:, 7] = mask[2]
    np.testing.assert_array_equal(read(segmentation, a, volume, 2), expected_k2)
    neighbour = np.zeros(shape, bool)
    neighbour[2] = True                                   # only the k = 2 slice filled earlier crosses it
    np.testing.assert_array_equal(io.read_slice(segmentation, a, volume, axis, 6), neighbour)


def test_an_answer_written_by_the_editor_is_refined_by_its_logits_unless_masking_cut_it(editor):
    """The effect records each answer it wrote (``remember_answer``): the next prompt on
    that slice refines it by the service's logits while the slice equals the answer; when
    the editor's masking cut the answer (the slice holds less), the slice's mask is sent."""
    from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic

    logic, node, volume, segmentation, a, b = editor
    prompts = SegmentationLogic(client=None)
    point = [volume_world(volume, (12.0, 10.0, 2.0))]
    answer = PromptOutcome(axis="k", index=2, mask=box(5, 15, 5, 15), iou=0.9, area=100, logits_id="L1")
    EditorLogic().apply_prompt_in_editor(logic, answer)
    prompts.remember_answer(answer, segmentation, a, volume)
    again = prompts.prepare_prompt(volume, segmentation, a, point, [1], axis="k")
    assert again.index == 2 and again.logits_id == "L1"

    SegmentSlices().write_slice(segmentation, b, volume, "k", 3, box(0, 10, 0, 24))
    node.SetOverwriteMode(slicer.vtkMRMLSegmentEditorNode.OverwriteNone)
    node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    node.SetMaskSegmentID(b)
    cut = PromptOutcome(axis="k", index=3, mask=box(5, 15, 5, 15), iou=0.9, area=100, logits_id="L2")
    EditorLogic().apply_prompt_in_editor(logic, cut)
    prompts.remember_answer(cut, segmentation, a, volume)
    masked = prompts.prepare_prompt(volume, segmentation, a, [volume_world(volume, (12.0, 10.0, 3.0))], [1],
                                    axis="k")
    assert masked.index == 3 and masked.logits_id is None
    np.testing.assert_array_equal(masked.mask, box(5, 10, 5, 15))


def volume_world(volume, ijk) -> list[float]:
    from SlicerDeSAMLib.nodes import volume_geometry

    return [float(v) for v in volume_geometry(volume).ijk_to_world(ijk)[:3]]
