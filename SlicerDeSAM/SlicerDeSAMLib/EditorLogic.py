"""The Segment Editor's write path for a prompt's answer, on Slicer's Qt-free
``vtkSlicerSegmentEditorLogic`` (Slicer 5.10+).

One prompt is one undo step: ``SaveStateForUndo()`` once, then two
``ModifySegmentByLabelmap`` calls on the selected segment: remove the whole slice, add the
mask. Both go through the editor's own rules, so its editable area (mask mode, mask
segment, editable intensity range) and its overwrite setting (other segments: all,
visible, none) apply as for any built-in effect. The labelmaps are on the source volume's
grid in the segmentation's frame (``SegmentSlices.labelmap``); the Qt effect passes the
same two to ``scriptedEffect.modifySelectedSegmentByLabelmap`` after its own
``saveStateForUndo()``.
"""

from __future__ import annotations

import numpy as np
import slicer

from .requests import PromptOutcome
from .SegmentSlices import SegmentSlices

__all__ = ["EditorLogic"]


class EditorLogic:
    """``slices``: builds the labelmaps (default ``SegmentSlices()``)."""

    def __init__(self, slices: SegmentSlices | None = None) -> None:
        self.slices = slices if slices is not None else SegmentSlices()

    def slice_labelmaps(self, outcome: PromptOutcome, segmentation_node, volume_node):
        """(remove, add): ``vtkOrientedImageData`` of the outcome's slice, all ones (the
        slice to clear) and the mask (what to add), on the volume's grid in the
        segmentation's frame."""
        h, w = outcome.mask.shape
        everything = np.ones((1, h, w), np.uint8)
        remove = self.slices.labelmap(segmentation_node, volume_node, outcome.axis, outcome.index, everything)
        add = self.slices.labelmap(segmentation_node, volume_node, outcome.axis, outcome.index, outcome.mask[None])
        return remove, add

    def apply_prompt_in_editor(self, editor_logic, outcome: PromptOutcome, volume_node=None,
                               segment_id: str | None = None) -> None:
        """Write the outcome's slice into the editor's selected segment (or ``segment_id``)
        as one undo step, honouring the editor node's mask mode and overwrite settings.
        ``volume_node``: the volume the prompt was on (default: the editor's source volume)."""
        segmentation_node = editor_logic.GetSegmentationNode()
        if segmentation_node is None:
            raise ValueError("the Segment Editor has no segmentation: select one first")
        segment_id = segment_id or editor_logic.GetCurrentSegmentID()
        if not segment_id or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
            raise ValueError("the Segment Editor has no segment selected: add or select a segment first")
        volume_node = volume_node if volume_node is not None else editor_logic.GetSourceVolumeNode()
        if volume_node is None:
            raise ValueError("the Segment Editor has no source volume: select one first")
        remove, add = self.slice_labelmaps(outcome, segmentation_node, volume_node)
        extent = remove.GetExtent()
        editor_logic.SaveStateForUndo()
        logic = slicer.vtkSlicerSegmentEditorLogic
        editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, remove, logic.ModificationModeRemove,
                                             extent, True, False)
        if outcome.mask.any():
            editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, add, logic.ModificationModeAdd,
                                                 extent, True, False)
