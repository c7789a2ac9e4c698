"""Correct panel: positive / negative point and box prompts on any slice view, Propagate,
Undo and Accept.

Each prompt updates only the slice it was placed on, refining the segment's current mask
there (``SegmentationLogic.prepare_prompt`` reads that mask). Prompts are sent one at a
time: a click placed while the previous one is on its way waits for its answer, so every
prompt refines the mask the previous one left. Propagate runs as a job of the service
from the last prompted slice (or the slice shown in the Red view) to its neighbours.
One Undo step per AI action (``SegmentationLogic.undo_last``).
"""

from __future__ import annotations

import time

import numpy as np
import slicer
from slicer.util import VTKObservationMixin

from SlicerDeSAMLib import nodes
from SlicerDeSAMLib.requests import PropagationOptions

JOB_POLL_S = 0.5
ROLES = {  # role: (node name, colour, prompt label)
    "positive": ("DeSAM positive", (0.2, 0.9, 0.3), 1),
    "negative": ("DeSAM negative", (0.95, 0.3, 0.25), 0),
    "box": ("DeSAM box corners", (1.0, 0.85, 0.2), None),
}


class CorrectPanel(VTKObservationMixin):
    """``module``: the module widget; ``uiWidget``: the loaded ``UI/CorrectPanel.ui``."""

    UI_FILE = "UI/CorrectPanel.ui"

    def __init__(self, module, uiWidget) -> None:
        VTKObservationMixin.__init__(self)
        self.module = module
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.nodes: dict[str, object] = {}
        self.placeWidgets = {"positive": self.ui.positivePlaceWidget, "negative": self.ui.negativePlaceWidget,
                             "box": self.ui.boxPlaceWidget}
        for widget in self.placeWidgets.values():
            widget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self._pending: list[tuple] = []   # prompts waiting for the previous answer
        self._sentPoint = None            # (node, control point id) of the prompt on its way
        # Each applied prompt's undo step and the control point that made it: Undo removes
        # the point too, so it is not sent again with the slice's next click.
        self._stepPoints: list[tuple] = []
        self._lastSlice: tuple[str, int] | None = None
        self._target = None
        self.jobId: str | None = None
        self._lastPoll = 0.0
        self.ui.propagateButton.connect("clicked(bool)", self.onPropagateButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.acceptButton.connect("clicked(bool)", self.onAccept)
        self.ui.correctProgressBar.setMaximum(1)
        self.ui.correctProgressBar.setValue(0)

    # ---- prompt markups ---------------------------------------------------------------------
    def ensureMarkups(self) -> None:
        """Create (again, after a scene close) the three markups nodes the tools place into."""
        for role, (name, colour, _) in ROLES.items():
            node = self.nodes.get(role)
            if node is not None and slicer.mrmlScene.IsNodePresent(node):
                continue
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
            node.CreateDefaultDisplayNodes()
            node.GetDisplayNode().SetSelectedColor(*colour)
            node.GetDisplayNode().SetColor(*colour)
            self.nodes[role] = node
            self.placeWidgets[role].setMRMLScene(slicer.mrmlScene)
            self.placeWidgets[role].setCurrentNode(node)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                             lambda caller, event, role=role: self.onPointPlaced(role, caller))

    def startPlacing(self, role: str) -> None:
        """Keyboard shortcut: switch the view to placing ``role`` prompts."""
        with slicer.util.tryWithErrorDisplay("Failed to start placing prompts.", waitCursor=False):
            self.ensureMarkups()
            self.placeWidgets[role].setPlaceModeEnabled(True)

    def clearPrompts(self) -> None:
        for node in self.nodes.values():
            if slicer.mrmlScene.IsNodePresent(node):
                node.RemoveAllControlPoints()

    def onPointPlaced(self, role: str, node) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to send the prompt.", waitCursor=False):
            count = node.GetNumberOfControlPoints()
            if count == 0:
                return
            ras = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(count - 1, ras)
            if role == "box":
                if count < 2:
                    self.ui.correctStatusLabel.text = "box: now click the opposite corner"
                    return
                corner = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(count - 2, corner)
                node.RemoveAllControlPoints()
                self._enqueue(([], [], (tuple(corner), tuple(ras)), None))
            else:
                self._enqueue(([tuple(ras)], [ROLES[role][2]], None, (node, node.GetNthControlPointID(count - 1))))

    def _enqueue(self, prompt: tuple) -> None:
        self._pending.append(prompt)
        if not self.module.busy("prompt"):
            self._sendNext()

    def _sendNext(self) -> None:
        if not self._pending:
            return
        points, labels, box, self._sentPoint = self._pending.pop(0)
        p = self.module.parameters
        if p is None or p.volume is None or p.segmentation is None or not p.segmentId:
            self._pending.clear()
            raise ValueError("Choose a volume, a segmentation and a segment in the Segment panel first.")
        session = self.module.requireSession()
        first = points[0] if points else tuple((a + b) / 2 for a, b in zip(*box, strict=True))
        axis = self.module.axisForPoint(p.volume, first)
        if points:
            # SAM's interactive use: every click on this slice (since Accept), with the
            # previous answer's logits, not the newest click alone.
            points, labels = self._pointsOnSlice(p.volume, axis, first, labels[0])
        prompt = session.segmentation.prepare_prompt(p.volume, p.segmentation, p.segmentId, points, labels,
                                                     box_world=box, axis=axis)
        ref = session.volume_ref(p.volume)
        self._target = (p.volume, p.segmentation, p.segmentId)
        self.ui.correctStatusLabel.text = "asking the service ..."
        session.worker.submit(self._request, session, ref, prompt, on_done=self._applyPrompt,
                              on_error=self._failed, key="prompt")

    def _pointsOnSlice(self, volumeNode, axis: str, anchor, anchorLabel: int) -> tuple[list, list]:
        """The newest point ``anchor`` (label ``anchorLabel``) first, then the other positive
        and negative points placed on its slice along ``axis`` (world RAS, labels 1/0)."""
        geometry = nodes.volume_geometry(volumeNode)
        index = geometry.slice_index(anchor, axis)
        points, labels = [tuple(anchor)], [anchorLabel]
        for role in ("positive", "negative"):
            node = self.nodes.get(role)
            if node is None or not slicer.mrmlScene.IsNodePresent(node):
                continue
            for n in range(node.GetNumberOfControlPoints()):
                ras = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(n, ras)
                try:
                    on_slice = geometry.slice_index(ras, axis) == index
                except ValueError:          # outside the volume along the axis
                    on_slice = False
                if on_slice and not np.allclose(ras, anchor):
                    points.append(tuple(ras))
                    labels.append(ROLES[role][2])
        return points, labels

    @staticmethod
    def _request(session, ref, prompt):
        """Worker thread: upload if needed, then the prompt."""
        return session.segmentation.request_prompt(session.resolve(ref), prompt)

    def _applyPrompt(self, outcome) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to write the prompt's answer.", waitCursor=False):
            volumeNode, segmentationNode, segmentId = self._target
            session = self.module.requireSession()
            step = session.segmentation.apply_prompt(outcome, segmentationNode, segmentId, volumeNode)
            if self._sentPoint is not None:
                self._stepPoints.append((step, self._sentPoint))
            self._lastSlice = (outcome.axis, int(outcome.index))
            self.ui.correctStatusLabel.text = (f"slice {outcome.index} ({outcome.axis}) updated, "
                                               f"predicted IoU {float(outcome.iou):.2f}")
        with slicer.util.tryWithErrorDisplay("Failed to send the next prompt.", waitCursor=False):
            self._sendNext()

    # ---- Propagate ----------------------------------------------------------------------------
    def onPropagateButton(self) -> None:
        if self.jobId is not None:
            with slicer.util.tryWithErrorDisplay("Failed to cancel the propagation.", waitCursor=False):
                session = self.module.requireSession()
                session.worker.submit(session.segmentation.cancel, self.jobId, on_error=self._failed, key="cancel")
                self.ui.correctStatusLabel.text = "cancelling ..."
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the propagation.", waitCursor=True):
            p = self.module.parameters
            if p is None or p.volume is None or p.segmentation is None or not p.segmentId:
                raise ValueError("Choose a volume, a segmentation and a segment in the Segment panel first.")
            session = self.module.requireSession()
            axis, index = self._lastSlice or self.module.sliceInRedView(p.volume)
            # SAM's prompted decoder, as for the prompts (the Segment panel's decoder is DeSAM's).
            options = PropagationOptions(iou_threshold=p.propagationIou, min_area=p.minArea)
            request = session.segmentation.prepare_propagation(p.volume, p.segmentation, p.segmentId, axis, index,
                                                               options)
            ref = session.volume_ref(p.volume)
            self._target = (p.volume, p.segmentation, p.segmentId)
            self.ui.correctStatusLabel.text = f"propagating from slice {index} ({axis}) ..."
            session.worker.submit(self._startPropagation, session, ref, request, on_done=self._jobStarted,
                                  on_error=self._failed, key="propagate")

    @staticmethod
    def _startPropagation(session, ref, request) -> dict:
        return session.segmentation.request_propagation(session.resolve(ref), request)

    def _jobStarted(self, job: dict) -> None:
        self.jobId = job["id"]
        self.ui.propagateButton.text = "Cancel"
        self._showJob(job)

    def tick(self) -> None:
        session = self.module.session
        if self.jobId is None or session is None or session.worker.busy("propagate"):
            return
        now = time.monotonic()
        if now - self._lastPoll < JOB_POLL_S:
            return
        self._lastPoll = now
        session.worker.submit(session.segmentation.request_job, self.jobId, on_done=self._showJob,
                              on_error=self._failed, key="propagate")

    def _showJob(self, job: dict) -> None:
        done = int(job.get("progress", {}).get("done", len(job.get("slices", []))))
        self.ui.correctProgressBar.setMaximum(max(1, done))
        self.ui.correctProgressBar.setValue(done)
        state = job.get("state")
        if state == "succeeded":
            session = self.module.requireSession()
            jobId, self.jobId = self.jobId, None
            session.worker.submit(session.segmentation.request_job_result, jobId, on_done=self._applyPropagation,
                                  on_error=self._failed, key="propagate")
        elif state in ("failed", "cancelled"):
            self.jobId = None
            self.ui.propagateButton.text = "Propagate"
            self.ui.correctStatusLabel.text = f"propagation {state}: {job.get('error') or ''}".rstrip(": ")
            if state == "failed":
                slicer.util.errorDisplay(f"Propagation failed: {job.get('error')}", windowTitle="DeSAM")

    def _applyPropagation(self, outcome) -> None:
        self.ui.propagateButton.text = "Propagate"
        with slicer.util.tryWithErrorDisplay("Failed to write the propagated slices.", waitCursor=True):
            volumeNode, segmentationNode, segmentId = self._target
            session = self.module.requireSession()
            session.segmentation.apply_auto(outcome, segmentationNode, segmentId, volumeNode)
            items = session.segmentation.review_items(outcome)
            self.module.showReview(outcome.axis, items)
            self.ui.correctStatusLabel.text = f"propagated to {len(items)} slices (see Review)"

    # ---- Undo / Accept ------------------------------------------------------------------------
    def onUndo(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to undo.", waitCursor=True):
            p = self.module.parameters
            session = self.module.requireSession()
            if p is None or p.segmentation is None:
                raise ValueError("No segmentation chosen.")
            step = session.segmentation.undo_last(p.segmentation)
            if step is None:
                self.ui.correctStatusLabel.text = "nothing to undo"
            else:
                self.removePointOf(step)
                self.ui.correctStatusLabel.text = "last AI action undone"

    def removePointOf(self, step) -> None:
        """Remove the control point that made the undone prompt ``step`` (if it was one)."""
        for n, (made, (node, pointId)) in enumerate(self._stepPoints):
            if made is step:
                del self._stepPoints[n]
                index = node.GetNthControlPointIndexByID(pointId) if slicer.mrmlScene.IsNodePresent(node) else -1
                if index >= 0:
                    node.RemoveNthControlPoint(index)
                return

    def onAccept(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to accept.", waitCursor=False):
            self.module.requireSession().segmentation.accept()
            self._stepPoints.clear()
            self.clearPrompts()
            self._lastSlice = None
            self.ui.correctStatusLabel.text = "accepted"

    def _failed(self, exc: BaseException) -> None:
        message = self.module.describe(exc)
        self._pending.clear()
        self.jobId = None
        self.ui.propagateButton.text = "Propagate"
        self.ui.correctStatusLabel.text = message
        slicer.util.errorDisplay(message, windowTitle="DeSAM")

    def cleanup(self) -> None:
        self.removeObservers()
        self._pending.clear()
