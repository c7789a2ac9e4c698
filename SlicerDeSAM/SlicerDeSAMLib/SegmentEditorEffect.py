"""Segment Editor effect "DeSAM": SAM prompts on the selected segment, inside the editor.

Choose Positive, Negative or Box, then click on a slice view (Ctrl+click: a point of the
other label; Shift+drag still pans the view), or drag a box. The answer replaces the
selected segment on that slice only, refining its current mask there, and goes through the
editor's own write path, so its editable area, masking (intensity range, "editable area"
segments) and overwrite settings apply: one
``saveStateForUndo()`` per prompt, then ``modifySelectedSegmentByLabelmap`` with
``Remove`` (the slice's box) and ``Add`` (the mask) — one Undo step per prompt.

The network part runs on a ``BackgroundWorker`` polled by a ``qt.QTimer``; the service URL
and token are those of the SlicerDeSAM module's Server panel (Slicer's settings).
"""

from __future__ import annotations

import os

import numpy as np
import qt
import slicer
import vtk
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect

from SlicerDeSAMLib.ServerClient import DEFAULT_URL
from SlicerDeSAMLib.ServerPanel import SETTINGS_TOKEN, SETTINGS_URL
from SlicerDeSAMLib.Session import Session
from SlicerDeSAMLib.SliceViews import SliceViews

POLL_MS = 50


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Registered by the SlicerDeSAM module on ``startupCompleted``."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "DeSAM"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.session: Session | None = None
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.poll)
        self._boxStart = None
        self._pending: list[tuple] = []
        # The clicks answered on each slice, (segment, axis, index) -> [(ras, label), ...]:
        # a click is sent with them while the slice still holds the last answer.
        self._clicks: dict[tuple, list] = {}

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        iconPath = os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "SegmentEditorEffect.png")
        return qt.QIcon(iconPath) if os.path.exists(iconPath) else qt.QIcon()

    def helpText(self):
        return ("<html>Segment with SAM prompts from the DeSAM service.<p>"
                "Choose <b>Positive</b>, <b>Negative</b> or <b>Box</b>. <b>Click</b>: a point of that label "
                "(<b>Ctrl+click</b>: of the other label). With <b>Box</b>, <b>drag</b> a box. Each prompt "
                "refines the selected segment on that slice only, within the editable area and masking "
                "settings; Undo removes one prompt.<p>"
                "The service address is set in the SlicerDeSAM module's Server panel.</html>")

    # ---- options --------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.modeButtons = {}
        row = qt.QHBoxLayout()
        for mode, text, tip in (("positive", "Positive", "Click: a point inside the structure (Ctrl+click: outside)"),
                                ("negative", "Negative", "Click: a point outside the structure (Ctrl+click: inside)"),
                                ("box", "Box", "Drag a box around the structure")):
            button = qt.QRadioButton(text)
            button.toolTip = tip
            button.connect("toggled(bool)", self.updateMRMLFromGUI)
            row.addWidget(button)
            self.modeButtons[mode] = button
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", row)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("PromptMode", "positive")

    def updateGUIFromMRML(self):
        mode = self.scriptedEffect.parameter("PromptMode")
        for name, button in self.modeButtons.items():
            wasBlocked = button.blockSignals(True)
            button.checked = name == mode
            button.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        for name, button in self.modeButtons.items():
            if button.checked:
                self.scriptedEffect.setParameter("PromptMode", name)

    def activate(self):
        self.timer.start()

    def deactivate(self):
        self.timer.stop()
        self._boxStart = None
        self._clicks.clear()

    def cleanup(self):
        self.timer.stop()
        if self.session is not None:
            self.session.close()
            self.session = None

    # ---- prompts --------------------------------------------------------------------------------
    def processInteractionEvents(self, callerInteractor, eventId, viewWidget):
        if viewWidget.className() != "qMRMLSliceWidget":
            return False
        xy = callerInteractor.GetEventPosition()
        mode = self.scriptedEffect.parameter("PromptMode")
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if mode == "box":
                self._boxStart = self.xyToRas(xy, viewWidget)
            else:
                label = 1 if mode == "positive" else 0
                if callerInteractor.GetControlKey():  # Ctrl+click: the other label
                    label = 1 - label
                self.prompt(viewWidget, [tuple(self.xyToRas(xy, viewWidget))], [label], None)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and mode == "box" and self._boxStart is not None:
            start, self._boxStart = self._boxStart, None
            self.prompt(viewWidget, [], [], (tuple(start), tuple(self.xyToRas(xy, viewWidget))))
            return True
        return False

    def _session(self) -> Session:
        settings = qt.QSettings()
        url = settings.value(SETTINGS_URL, DEFAULT_URL)
        token = settings.value(SETTINGS_TOKEN, "")
        if self.session is None or self.session.url != url.rstrip("/") or self.session.client.token != (token or None):
            if self.session is not None:
                self.session.close()
            self.session = Session(url, token)
        return self.session

    def prompt(self, viewWidget, points, labels, box) -> None:
        normal = viewWidget.mrmlSliceNode().GetSliceToRAS()
        self._pending.append((points, labels, box, [normal.GetElement(r, 2) for r in range(3)]))
        if not (self.session is not None and self.session.worker.busy("prompt")):
            self._sendNext()

    def _sendNext(self) -> None:
        if not self._pending:
            return
        points, labels, box, normal = self._pending.pop(0)
        with slicer.util.tryWithErrorDisplay("DeSAM: failed to send the prompt.", waitCursor=False):
            editorNode = self.scriptedEffect.parameterSetNode()
            volumeNode = editorNode.GetSourceVolumeNode()
            segmentationNode = editorNode.GetSegmentationNode()
            segmentId = editorNode.GetSelectedSegmentID()
            if volumeNode is None or segmentationNode is None or not segmentId:
                raise ValueError("Choose a source volume and select a segment first.")
            axis = SliceViews.geometry(volumeNode).axis_for_normal(np.array(normal))
            session = self._session()
            request = session.segmentation.prepare_prompt(volumeNode, segmentationNode, segmentId, points, labels,
                                                          box_world=box, axis=axis)
            if points:
                request = self._withEarlierClicks(session, request, (volumeNode, segmentationNode, segmentId),
                                                  points, labels)
            ref = session.volume_ref(volumeNode)
            self.statusLabel.text = "asking the service ..."
            session.worker.submit(self._request, session, ref, request,
                                  on_done=lambda outcome: self._apply(outcome, segmentationNode, segmentId, volumeNode),
                                  on_error=self._failed, key="prompt")

    def _withEarlierClicks(self, session, request, nodes, points, labels):
        """SAM's interactive use: the click with the earlier clicks on its slice, while the
        slice still holds the last answer (``logits_id`` set: nothing edited it since);
        otherwise the click alone, and the slice's click list starts again."""
        volumeNode, segmentationNode, segmentId = nodes
        key = (segmentationNode.GetID(), segmentId, request.axis, request.index)
        earlier = self._clicks.get(key, []) if request.logits_id else []
        self._clicks[key] = [*earlier, *zip(points, labels, strict=True)]
        if not earlier:
            return request
        allPoints = [ras for ras, _ in self._clicks[key]]
        allLabels = [label for _, label in self._clicks[key]]
        return session.segmentation.prepare_prompt(volumeNode, segmentationNode, segmentId, allPoints, allLabels,
                                                   axis=request.axis)

    @staticmethod
    def _request(session, ref, request):
        return session.segmentation.request_prompt(session.resolve(ref), request)

    def _apply(self, outcome, segmentationNode, segmentId, volumeNode) -> None:
        with slicer.util.tryWithErrorDisplay("DeSAM: failed to write the answer.", waitCursor=False):
            removeLabelmap, addLabelmap = self.session.editor.slice_labelmaps(outcome, segmentationNode, volumeNode)
            self.scriptedEffect.saveStateForUndo()
            effect = slicer.qSlicerSegmentEditorAbstractEffect
            self.scriptedEffect.modifySelectedSegmentByLabelmap(removeLabelmap, effect.ModificationModeRemove)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(addLabelmap, effect.ModificationModeAdd)
            self.session.segmentation.remember_answer(outcome, segmentationNode, segmentId, volumeNode)
            self.statusLabel.text = f"slice {outcome.index} ({outcome.axis}): predicted IoU {float(outcome.iou):.2f}"
        self._sendNext()

    def _failed(self, exc: BaseException) -> None:
        self._pending.clear()
        message = self.session.describe(exc)
        self.statusLabel.text = message
        slicer.util.errorDisplay(f"DeSAM: {message}", windowTitle="DeSAM")

    def poll(self) -> None:
        if self.session is not None:
            self.session.worker.poll()
