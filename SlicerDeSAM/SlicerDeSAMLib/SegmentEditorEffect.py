"""Segment Editor effect "DeSAM": SAM prompts on the selected segment, inside the editor.

Click on a slice view: a positive point (Shift+click: negative), or drag a box with the Box
option. The answer replaces the selected segment on that slice only, refining its current
mask there, and goes through the editor's own write path, so its editable area, masking
(intensity range, "editable area" segments) and overwrite settings apply: one
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
                "<b>Click</b>: positive point. <b>Shift+click</b>: negative point. "
                "With <b>Box</b> chosen, <b>drag</b> a box. Each prompt refines the selected segment on that slice "
                "only, within the editable area and masking settings; Undo removes one prompt.<p>"
                "The service address is set in the SlicerDeSAM module's Server panel.</html>")

    # ---- options --------------------------------------------------------------------------------
    def setupOptionsFrame(self):
        self.pointRadioButton = qt.QRadioButton("Points")
        self.pointRadioButton.toolTip = "Click: positive point; Shift+click: negative point"
        self.boxRadioButton = qt.QRadioButton("Box")
        self.boxRadioButton.toolTip = "Drag a box around the structure"
        self.pointRadioButton.checked = True
        row = qt.QHBoxLayout()
        row.addWidget(self.pointRadioButton)
        row.addWidget(self.boxRadioButton)
        self.scriptedEffect.addLabeledOptionsWidget("Prompt:", row)
        self.statusLabel = qt.QLabel("")
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self.pointRadioButton.connect("toggled(bool)", self.updateMRMLFromGUI)

    def setMRMLDefaults(self):
        self.scriptedEffect.setParameterDefault("PromptMode", "points")

    def updateGUIFromMRML(self):
        box = self.scriptedEffect.parameter("PromptMode") == "box"
        for button, checked in ((self.pointRadioButton, not box), (self.boxRadioButton, box)):
            wasBlocked = button.blockSignals(True)
            button.checked = checked
            button.blockSignals(wasBlocked)

    def updateMRMLFromGUI(self):
        self.scriptedEffect.setParameter("PromptMode", "box" if self.boxRadioButton.checked else "points")

    def activate(self):
        self.timer.start()

    def deactivate(self):
        self.timer.stop()
        self._boxStart = None

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
        box = self.scriptedEffect.parameter("PromptMode") == "box"
        if eventId == vtk.vtkCommand.LeftButtonPressEvent:
            if box:
                self._boxStart = self.xyToRas(xy, viewWidget)
            else:
                label = 0 if callerInteractor.GetShiftKey() else 1
                self.prompt(viewWidget, [tuple(self.xyToRas(xy, viewWidget))], [label], None)
            return True
        if eventId == vtk.vtkCommand.LeftButtonReleaseEvent and box and self._boxStart is not None:
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
            ref = session.volume_ref(volumeNode)
            self.statusLabel.text = "asking the service ..."
            session.worker.submit(self._request, session, ref, request,
                                  on_done=lambda outcome: self._apply(outcome, segmentationNode, volumeNode),
                                  on_error=self._failed, key="prompt")

    @staticmethod
    def _request(session, ref, request):
        return session.segmentation.request_prompt(session.resolve(ref), request)

    def _apply(self, outcome, segmentationNode, volumeNode) -> None:
        with slicer.util.tryWithErrorDisplay("DeSAM: failed to write the answer.", waitCursor=False):
            removeLabelmap, addLabelmap = self.session.editor.slice_labelmaps(outcome, segmentationNode, volumeNode)
            self.scriptedEffect.saveStateForUndo()
            effect = slicer.qSlicerSegmentEditorAbstractEffect
            self.scriptedEffect.modifySelectedSegmentByLabelmap(removeLabelmap, effect.ModificationModeRemove)
            self.scriptedEffect.modifySelectedSegmentByLabelmap(addLabelmap, effect.ModificationModeAdd)
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
