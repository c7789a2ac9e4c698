"""Train panel: training cases from the scene, Start / Cancel, live progress, and the
service's decoder versions with Activate and Roll back.

The scene is read on the main thread (``TrainingLogic.prepare_case``: the segment as a
K x J x I array on the volume's grid); uploads, the job and its status polls run on the
session's worker.
"""

from __future__ import annotations

import time

import qt
import slicer

STATUS_POLL_S = 1.0
#: The families that train with one strategy whatever the Strategy box shows.
FAMILY_STRATEGIES = {"dbsam": "box", "sammix": "gt_box"}


class TrainPanel:
    """``module``: the module widget; ``uiWidget``: the loaded ``UI/TrainPanel.ui``."""

    UI_FILE = "UI/TrainPanel.ui"

    def __init__(self, module, uiWidget) -> None:
        self.module = module
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.cases: list[tuple[str, str, str]] = []  # (volume node ID, segmentation node ID, segment ID)
        self.jobId: str | None = None
        self._lastPoll = 0.0
        self._versions: list[dict] = []
        self.ui.casesTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.versionsTableWidget.horizontalHeader().setStretchLastSection(True)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.startTrainingButton.connect("clicked(bool)", self.onStartButton)
        self.ui.refreshVersionsButton.connect("clicked(bool)", self.refreshVersions)
        self.ui.activateVersionButton.connect("clicked(bool)", self.onActivate)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.ui.trainingProgressBar.setMaximum(1)
        self.ui.trainingProgressBar.setValue(0)

    # ---- cases --------------------------------------------------------------------------------
    def onAddCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to add the training case.", waitCursor=False):
            volumeNode = self.ui.caseVolumeSelector.currentNode()
            segmentationNode = self.ui.caseSegmentSelector.currentNode()
            segmentId = self.ui.caseSegmentSelector.currentSegmentID()
            if volumeNode is None or segmentationNode is None or not segmentId:
                raise ValueError("Choose a volume and a label segment first.")
            case = (volumeNode.GetID(), segmentationNode.GetID(), segmentId)
            if case in self.cases:
                raise ValueError("This volume + segment pair is already in the list.")
            self.cases.append(case)
            self._showCases()

    def onRemoveCase(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to remove the training case.", waitCursor=False):
            row = self.ui.casesTableWidget.currentRow()
            if not 0 <= row < len(self.cases):
                raise ValueError("Select a training case in the list first.")
            del self.cases[row]
            self._showCases()

    def _showCases(self) -> None:
        table = self.ui.casesTableWidget
        table.setRowCount(len(self.cases))
        for row, (volumeId, segmentationId, segmentId) in enumerate(self.cases):
            volumeNode = slicer.mrmlScene.GetNodeByID(volumeId)
            segmentationNode = slicer.mrmlScene.GetNodeByID(segmentationId)
            segment = segmentationNode.GetSegmentation().GetSegment(segmentId) if segmentationNode else None
            table.setItem(row, 0, qt.QTableWidgetItem(volumeNode.GetName() if volumeNode else "(removed)"))
            table.setItem(row, 1, qt.QTableWidgetItem(segment.GetName() if segment else "(removed)"))

    def sceneClosed(self) -> None:
        self.cases.clear()
        self._showCases()

    # ---- Start / Cancel -----------------------------------------------------------------------
    def onStartButton(self) -> None:
        if self.jobId is not None:
            with slicer.util.tryWithErrorDisplay("Failed to cancel the training.", waitCursor=False):
                session = self.module.requireSession()
                session.worker.submit(session.training.cancel, self.jobId, on_done=self._showStatus,
                                      on_error=self._failed, key="train-cancel")
                self.ui.trainingStatusLabel.text = "cancelling ..."
            return
        with slicer.util.tryWithErrorDisplay("Failed to start the training.", waitCursor=True):
            p = self.module.parameters
            structure = p.trainStructure.strip()
            if not structure:
                raise ValueError("Give the structure's name (e.g. liver): the trained decoder is served under it.")
            if not self.cases:
                raise ValueError("Add at least one training case (volume + label segment).")
            session = self.module.requireSession()
            prepared = []
            for volumeId, segmentationId, segmentId in self.cases:
                volumeNode = slicer.mrmlScene.GetNodeByID(volumeId)
                segmentationNode = slicer.mrmlScene.GetNodeByID(segmentationId)
                if volumeNode is None or segmentationNode is None:
                    raise ValueError("A training case's volume or segmentation was removed from the scene.")
                prepared.append(session.training.prepare_case(volumeNode, segmentationNode, segmentId, structure))
            # DB-SAM trains with (jittered ground-truth) boxes only; SAM-Mix's SAM with the
            # painted slices' (jittered) boxes.
            strategy = FAMILY_STRATEGIES.get(p.trainFamily, p.trainStrategy)
            options = {"family": p.trainFamily, "strategy": strategy, "epochs": p.trainEpochs}
            self.ui.trainingStatusLabel.text = f"uploading {len(prepared)} case(s) ..."
            self.ui.startTrainingButton.enabled = False
            session.worker.submit(self._start, session, structure, prepared, options, on_done=self._started,
                                  on_error=self._failed, key="train")

    @staticmethod
    def _start(session, structure, prepared, options) -> dict:
        """Worker thread: upload the cases (once each), then start the job."""
        refs = session.training.upload_cases(prepared)
        return session.training.start(structure, refs, options)

    def _started(self, job: dict) -> None:
        self.jobId = job["id"]
        self.ui.startTrainingButton.enabled = True
        self.ui.startTrainingButton.text = "Cancel training"
        self.ui.trainingStatusLabel.text = "queued"

    def tick(self) -> None:
        session = self.module.session
        if self.jobId is None or session is None or session.worker.busy("train"):
            return
        now = time.monotonic()
        if now - self._lastPoll < STATUS_POLL_S:
            return
        self._lastPoll = now
        session.worker.submit(session.training.status, self.jobId, on_done=self._showStatus,
                              on_error=self._failed, key="train")

    def _showStatus(self, status) -> None:
        """``status``: a ``TrainingStatus`` (its ``message`` is the status line)."""
        self.ui.trainingProgressBar.setMaximum(1000)
        self.ui.trainingProgressBar.setValue(int(round(1000 * status.fraction)))
        self.ui.trainingProgressBar.format = f"epoch {status.epoch} / {status.epochs}" if status.epochs else "%p%"
        self.ui.lossLabel.text = "-" if status.loss is None else f"{status.loss:.4f}"
        self.ui.diceLabel.text = "-" if status.validation_dice is None else f"{status.validation_dice:.3f}"
        self.ui.timeLeftLabel.text = "-" if status.seconds_left is None else _duration(status.seconds_left)
        self.ui.trainingStatusLabel.text = status.message
        if status.active:
            return
        self.jobId = None
        self.ui.startTrainingButton.text = "Start training"
        if status.state == "finished":
            self.refreshVersions()
        elif status.state == "failed":
            slicer.util.errorDisplay(status.message, windowTitle="DeSAM")

    def _failed(self, exc: BaseException) -> None:
        message = self.module.describe(exc)
        self.ui.startTrainingButton.enabled = True
        self.ui.trainingStatusLabel.text = message
        slicer.util.errorDisplay(message, windowTitle="DeSAM")

    # ---- versions -----------------------------------------------------------------------------
    def refreshVersions(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to list the decoder versions.", waitCursor=False):
            session = self.module.requireSession()
            session.worker.submit(session.training.versions, on_done=self._showVersions, on_error=self._failed,
                                  key="versions")

    def _showVersions(self, versions: list) -> None:
        self._versions = list(versions)
        table = self.ui.versionsTableWidget
        table.setRowCount(len(self._versions))
        for row, v in enumerate(self._versions):
            created = time.strftime("%Y-%m-%d %H:%M", time.localtime(v["created"])) if v.get("created") else ""
            cells = (v["structure"], v["version"], v.get("family") or "", "yes" if v.get("active") else "", created)
            for column, text in enumerate(cells):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    def _selectedVersion(self) -> dict:
        row = self.ui.versionsTableWidget.currentRow()
        if not 0 <= row < len(self._versions):
            raise ValueError("Select a decoder version in the list first.")
        return self._versions[row]

    def onActivate(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to activate the version.", waitCursor=False):
            v = self._selectedVersion()
            session = self.module.requireSession()
            session.worker.submit(session.training.activate, v["structure"], v["version"],
                                  on_done=lambda _: self.refreshVersions(), on_error=self._failed, key="versions")

    def onRollback(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to roll back.", waitCursor=False):
            v = self._selectedVersion()
            session = self.module.requireSession()
            session.worker.submit(session.training.rollback, v["structure"],
                                  on_done=lambda _: self.refreshVersions(), on_error=self._failed, key="versions")

    def cleanup(self) -> None:
        self.jobId = None


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
