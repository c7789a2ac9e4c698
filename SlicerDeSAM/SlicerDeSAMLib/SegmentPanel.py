"""Segment panel (automatic mode) and its Review list.

Segment: an automatic mode on the whole volume or a slice range, along any axis, as a
job of the service: DeSAM's whole box or grid points, the box of a markups ROI on every
slice it covers (any decoder; DB-SAM's automatic mode), or SAM-Mix's class-activation-map
boxes; the button becomes Cancel while the job runs, a progress bar follows it.
Review: the slices of the last run with their predicted IoU, lowest first, or (a cam-box
run) by the slice classifier's presence probability, least certain first; clicking one
moves the slice views there.

Threading: ``prepare_*``/``apply_*`` here on the main thread, ``request_*`` on the
session's worker (see CONTRACT.md); the module's timer calls ``tick()``.
"""

from __future__ import annotations

import time

import qt
import slicer

from SlicerDeSAMLib.requests import AutoOptions

JOB_POLL_S = 0.5


class SegmentPanel:
    """``module``: the module widget; ``uiWidget``: the loaded ``UI/SegmentPanel.ui``."""

    UI_FILE = "UI/SegmentPanel.ui"

    def __init__(self, module, uiWidget) -> None:
        self.module = module
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.jobId: str | None = None
        self._target = None  # (volume node, segmentation node, segment id) of the running job
        self._lastPoll = 0.0
        self._reviewIndices: list[int] = []
        self._reviewAxis = "k"
        self._lastOutcome = None
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.decoderComboBox.connect("currentIndexChanged(int)", self.onDecoderChanged)
        self.ui.reviewByComboBox.connect("currentIndexChanged(int)", self.onReviewByChanged)
        self.ui.reviewTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.reviewTableWidget.connect("cellClicked(int,int)", self.onReviewClicked)
        self.ui.segmentProgressBar.setMaximum(1)
        self.ui.segmentProgressBar.setValue(0)

    # ---- parameter node <-> widgets the wrapper cannot bind ---------------------------------
    def updateFromParameters(self) -> None:
        p = self.module.parameters
        if p is None:
            return
        wasBlocked = self.ui.segmentSelector.blockSignals(True)
        self.ui.segmentSelector.setCurrentNode(p.segmentation)
        if p.segmentId:
            self.ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        self.ui.segmentSelector.blockSignals(wasBlocked)
        index = self.ui.decoderComboBox.findData(p.decoder)
        if index >= 0 and index != self.ui.decoderComboBox.currentIndex:
            self.ui.decoderComboBox.setCurrentIndex(index)
        self.ui.firstSliceSpinBox.enabled = not p.wholeVolume
        self.ui.lastSliceSpinBox.enabled = not p.wholeVolume
        self.ui.gridSizeSpinBox.enabled = p.autoMode == "grid"
        self.ui.roiSelector.enabled = p.autoMode == "roi"
        window = self.module.displayWindow(p.volume) if p.volume else None
        self.ui.windowLabel.text = "-" if window is None else f"center {window[0]:g}, width {window[1]:g}"
        self._updateButton()

    def onSegmentationChanged(self, node) -> None:
        if self.module.parameters is not None:
            self.module.parameters.segmentation = node

    def onSegmentChanged(self, segmentId) -> None:
        if self.module.parameters is not None:
            self.module.parameters.segmentId = segmentId or ""

    def onDecoderChanged(self, index: int) -> None:
        if self.module.parameters is not None and index >= 0:
            self.module.parameters.decoder = self.ui.decoderComboBox.itemData(index) or ""

    def setDecoders(self, names: list[str]) -> None:
        """The decoders the service has (called after a successful connection test)."""
        current = self.module.parameters.decoder if self.module.parameters else ""
        wasBlocked = self.ui.decoderComboBox.blockSignals(True)
        self.ui.decoderComboBox.clear()
        self.ui.decoderComboBox.addItem("service default", "")
        for name in names:
            self.ui.decoderComboBox.addItem(name, name)
        index = self.ui.decoderComboBox.findData(current)
        self.ui.decoderComboBox.setCurrentIndex(max(0, index))
        self.ui.decoderComboBox.blockSignals(wasBlocked)

    def _updateButton(self) -> None:
        p = self.module.parameters
        running = self.jobId is not None or self.module.busy("auto")
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        ready = p is not None and p.volume is not None and p.segmentation is not None and bool(p.segmentId)
        self.ui.segmentButton.enabled = running or ready
        self.ui.segmentButton.toolTip = ("Stop the running job" if running else
                                         "Segment the chosen slices automatically" if ready else
                                         "Choose a volume, a segmentation and a segment first")

    # ---- Segment / Cancel -------------------------------------------------------------------
    def onSegmentButton(self) -> None:
        if self.jobId is not None:
            self.cancel()
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the automatic segmentation.", waitCursor=True):
            p = self.module.parameters
            session = self.module.requireSession()
            if p.volume is None or p.segmentation is None or not p.segmentId:
                raise ValueError("Choose a volume, a segmentation and a segment first.")
            start, stop = None, None
            if not p.wholeVolume:
                if p.lastSlice < p.firstSlice:
                    raise ValueError(f"The last slice ({p.lastSlice}) is before the first ({p.firstSlice}).")
                start, stop = p.firstSlice, p.lastSlice + 1
            box = None
            if p.autoMode == "roi":
                if p.roi is None:
                    raise ValueError("Choose the ROI of the roi mode first (Markups: place an ROI around the "
                                     "structure).")
                box, roiStart, roiStop = session.segmentation.prepare_roi(p.volume, p.roi, p.axis)
                start, stop = (roiStart, roiStop) if start is None else (max(start, roiStart), min(stop, roiStop))
                if stop <= start:
                    raise ValueError(f"The ROI covers slices {roiStart} to {roiStop - 1}, outside the chosen range.")
            options = AutoOptions(axis=p.axis, mode=p.autoMode, decoder=p.decoder or None, start=start, stop=stop,
                                  grid_size=p.gridSize, iou_threshold=p.iouThreshold, box=box)
            ref = session.volume_ref(p.volume)
            window = session.segmentation.window_of(p.volume)
            self._target = (p.volume, p.segmentation, p.segmentId)
            self.ui.segmentStatusLabel.text = "uploading the volume ..." if ref.volume_id is None else "starting ..."
            session.worker.submit(self._startJob, session, ref, options, window, on_done=self._jobStarted,
                                  on_error=self._failed, key="auto")
            self._updateButton()

    @staticmethod
    def _startJob(session, ref, options, window) -> dict:
        """Worker thread: upload if needed, then start the job (in the volume's display window)."""
        return session.segmentation.request_auto(session.resolve(ref), options, window)

    def _jobStarted(self, job: dict) -> None:
        self.jobId = job["id"]
        self.ui.segmentStatusLabel.text = "running"
        self._showJob(job)
        self._updateButton()

    def cancel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to cancel the job.", waitCursor=False):
            session = self.module.requireSession()
            session.worker.submit(session.segmentation.cancel, self.jobId, on_error=self._failed, key="cancel")
            self.ui.segmentStatusLabel.text = "cancelling ..."

    def tick(self) -> None:
        """Main thread (module timer): ask for the job's state twice a second."""
        session = self.module.session
        if self.jobId is None or session is None or session.worker.busy("auto"):
            return
        now = time.monotonic()
        if now - self._lastPoll < JOB_POLL_S:
            return
        self._lastPoll = now
        session.worker.submit(session.segmentation.request_job, self.jobId, on_done=self._showJob,
                              on_error=self._failed, key="auto")

    def _showJob(self, job: dict) -> None:
        progress = job.get("progress", {})
        self.ui.segmentProgressBar.setMaximum(max(1, int(progress.get("total", 1))))
        self.ui.segmentProgressBar.setValue(int(progress.get("done", 0)))
        state = job.get("state")
        if state == "succeeded":
            session = self.module.requireSession()
            self.ui.segmentStatusLabel.text = "fetching the result ..."
            jobId, self.jobId = self.jobId, None
            session.worker.submit(session.segmentation.request_job_result, jobId, on_done=self._applyResult,
                                  on_error=self._failed, key="auto")
        elif state in ("failed", "cancelled"):
            self.jobId = None
            reason = job.get("error") or state
            self.ui.segmentStatusLabel.text = f"{state}: {reason}" if state == "failed" else "cancelled"
            if state == "failed":
                slicer.util.errorDisplay(f"Automatic segmentation failed: {reason}", windowTitle="DeSAM")
        self._updateButton()

    def _applyResult(self, outcome) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to write the result into the segment.", waitCursor=True):
            volumeNode, segmentationNode, segmentId = self._target
            session = self.module.requireSession()
            session.segmentation.apply_auto(outcome, segmentationNode, segmentId, volumeNode)
            self._lastOutcome = outcome
            self._showOutcome()
            self.ui.segmentStatusLabel.text = f"done: {len(self._reviewIndices)} slices written"
        self._updateButton()

    def _failed(self, exc: BaseException) -> None:
        message = self.module.describe(exc)
        self.jobId = None
        self.ui.segmentStatusLabel.text = message
        self._updateButton()
        slicer.util.errorDisplay(message, windowTitle="DeSAM")

    # ---- Review -----------------------------------------------------------------------------
    def _showOutcome(self) -> None:
        """The last run's slices in the order the Review list is asked for (by presence only
        when the run reported it: a cam-box run)."""
        outcome = self._lastOutcome
        if outcome is None:
            return
        # The combo box, not the parameter: the parameter node may hear of the change after us.
        by = "presence" if self.ui.reviewByComboBox.currentText == "presence" and outcome.presence else "iou"
        session = self.module.requireSession()
        self.showReview(outcome.axis, session.segmentation.review_items(outcome, by=by))

    def onReviewByChanged(self, index: int) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to order the Review list.", waitCursor=False):
            self._showOutcome()

    def showReview(self, axis: str, items) -> None:
        """``items``: (slice index, score): predicted IoU or presence probability, in order."""
        table = self.ui.reviewTableWidget
        table.setRowCount(0)
        self._reviewAxis = axis
        self._reviewIndices = [int(index) for index, _ in items]
        table.setRowCount(len(self._reviewIndices))
        for row, (index, iou) in enumerate(items):
            known = iou is not None and iou == iou  # None / NaN: no prediction (e.g. a propagation's seed)
            table.setItem(row, 0, qt.QTableWidgetItem(str(int(index))))
            table.setItem(row, 1, qt.QTableWidgetItem(f"{float(iou):.3f}" if known else "-"))

    def onReviewClicked(self, row: int, column: int) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to show the slice.", waitCursor=False):
            volumeNode = self._target[0] if self._target else self.module.parameters.volume
            self.module.jumpToSlice(volumeNode, self._reviewAxis, self._reviewIndices[row])

    def cleanup(self) -> None:
        self.jobId = None
