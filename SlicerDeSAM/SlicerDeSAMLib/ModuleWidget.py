"""The module's panels put together: the session, the parameter node, the timer that polls
the worker, the keyboard shortcuts and the geometry helpers the panels share.

``SlicerDeSAM.SlicerDeSAMWidget`` (the entry file) creates one ``ModuleWidget`` in its
``setup`` and forwards ``enter``/``exit``/``cleanup`` to it.
"""

from __future__ import annotations

import qt
import slicer
import vtk
from slicer.util import VTKObservationMixin

from SlicerDeSAMLib.CorrectPanel import CorrectPanel
from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic
from SlicerDeSAMLib.SegmentPanel import SegmentPanel
from SlicerDeSAMLib.ServerPanel import ServerPanel
from SlicerDeSAMLib.Session import Session
from SlicerDeSAMLib.SliceViews import SliceViews
from SlicerDeSAMLib.TrainPanel import TrainPanel
from SlicerDeSAMLib.ViewHint import ViewHint
from SlicerDeSAMLib.VolumeGeometry import VolumeGeometry

POLL_MS = 100
SHORTCUTS = (  # key sequence, what it does (documented in README.md, Keyboard shortcuts)
    ("P", "positive"),
    ("N", "negative"),
    ("X", "box"),  # not B: b/f move a slice view's slice in Slicer
    ("Shift+P", "propagate"),
    ("Ctrl+Shift+Z", "undo"),
)


class ModuleWidget(VTKObservationMixin):
    """``resourcePath``: the entry widget's ``resourcePath``; ``layout``: where the panels go;
    ``logic``: the entry's ``SlicerDeSAMLogic`` (gives the typed parameter node)."""

    def __init__(self, resourcePath, layout, logic) -> None:
        VTKObservationMixin.__init__(self)
        self.logic = logic
        self.session: Session | None = None
        self.parameters = None
        self._volume = None  # the parameter node's volume last seen (view hint on change)
        self._guiTags: list = []
        self._shortcuts: list = []
        self.panelWidgets = []
        panels = []
        for cls in (ServerPanel, SegmentPanel, CorrectPanel, TrainPanel):
            uiWidget = slicer.util.loadUI(resourcePath(cls.UI_FILE))
            uiWidget.setMRMLScene(slicer.mrmlScene)
            layout.addWidget(uiWidget)
            self.panelWidgets.append(uiWidget)
            panels.append(cls(self, uiWidget))
        self.serverPanel, self.segmentPanel, self.correctPanel, self.trainPanel = panels
        self.panels = panels
        layout.addStretch(1)
        self.viewHint = ViewHint(self)
        self.viewHint.observe()
        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_MS)
        self.timer.connect("timeout()", self.tick)
        self.timer.start()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        slicer.app.connect("aboutToQuit()", self.onAboutToQuit)
        self.initializeParameterNode()

    # ---- session ------------------------------------------------------------------------------
    def connectTo(self, url: str, token: str) -> None:
        """Use the service at ``url`` (a new session when the URL or the token changed)."""
        if self.session is not None and self.session.url == url.rstrip("/") and self.session.client.token == (
                token or None):
            return
        old, self.session = self.session, Session(url, token)
        if old is not None:
            old.close()

    def requireSession(self) -> Session:
        if self.session is None:
            self.connectTo(self.serverPanel.url(), self.serverPanel.token())
        return self.session

    def busy(self, key: str) -> bool:
        return self.session is not None and self.session.worker.busy(key)

    def describe(self, exc: BaseException) -> str:
        return self.session.report(exc) if self.session is not None else str(exc)

    def serviceConnected(self, summary) -> None:
        """After a successful connection test (``ServerSummary``): refresh the lists that
        come from the service."""
        self.segmentPanel.setDecoders(list(summary.decoder_names))
        self.trainPanel.refreshVersions()
        with slicer.util.tryWithErrorDisplay("Failed to send the volume to the service.", waitCursor=False):
            self.viewHint.volumeChanged()

    def showReview(self, axis: str, items) -> None:
        self.segmentPanel.showReview(axis, items)

    def tick(self) -> None:
        """Main thread, every ``POLL_MS``: finished worker tasks' callbacks, then each panel's polls."""
        if self.session is not None:
            try:
                self.session.worker.poll()
            except Exception as exc:  # noqa: BLE001 - a failed callback is shown; the timer must keep polling
                slicer.util.errorDisplay(self.describe(exc), windowTitle="DeSAM")
        for panel in self.panels:
            panel.tick()
        self.viewHint.tick()

    # ---- parameter node -----------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if self.parameters.volume is None:
            self.parameters.volume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.correctPanel.ensureMarkups()

    def setParameterNode(self, parameters) -> None:
        if self.parameters is not None:
            for tag in self._guiTags:
                self.parameters.disconnectGui(tag)
            self._guiTags = []
            self.removeObserver(self.parameters.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersModified)
        self.parameters = parameters
        if parameters is not None:
            for panel in self.panels:
                self._guiTags.append(parameters.connectGui(panel.ui))
            self.addObserver(parameters.parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParametersModified)
            self.onParametersModified()

    def onParametersModified(self, caller=None, event=None) -> None:
        volume = self.parameters.volume if self.parameters else None
        if volume is not self._volume:
            self._volume = volume
            with slicer.util.tryWithErrorDisplay("Failed to send the volume to the service.", waitCursor=False):
                self.viewHint.volumeChanged()
        self.segmentPanel.updateFromParameters()

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.trainPanel.sceneClosed()

    def onSceneEndClose(self, caller, event) -> None:
        self.viewHint.observe()
        if self.entered:
            self.initializeParameterNode()

    # ---- enter / exit / cleanup -----------------------------------------------------------------
    entered = False

    def enter(self) -> None:
        self.entered = True
        self.initializeParameterNode()
        self.installShortcuts()

    def exit(self) -> None:
        self.entered = False
        self.removeShortcuts()
        if self.parameters is not None:
            for tag in self._guiTags:
                self.parameters.disconnectGui(tag)
            self._guiTags = []

    def installShortcuts(self) -> None:
        self.removeShortcuts()
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:  # Slicer --no-main-window
            return
        actions = {"positive": lambda: self.correctPanel.startPlacing("positive"),
                   "negative": lambda: self.correctPanel.startPlacing("negative"),
                   "box": lambda: self.correctPanel.startPlacing("box"),
                   "propagate": self.correctPanel.onPropagateButton,
                   "undo": self.correctPanel.onUndo}
        for keys, action in SHORTCUTS:
            shortcut = qt.QShortcut(qt.QKeySequence(keys), mainWindow)
            shortcut.connect("activated()", actions[action])
            self._shortcuts.append(shortcut)

    def removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.setParent(None)
            shortcut.deleteLater()
        self._shortcuts = []

    def onAboutToQuit(self) -> None:
        self.serverPanel.stopLocalServer()

    def cleanup(self) -> None:
        self.timer.stop()
        self.removeShortcuts()
        slicer.app.disconnect("aboutToQuit()", self.onAboutToQuit)
        for panel in self.panels:
            panel.cleanup()
        self.viewHint.cleanup()
        self.removeObservers()
        if self.session is not None:
            self.session.close()
            self.session = None

    # ---- geometry helpers (main thread; SliceViews is MRML-only and tested on slicer-core) ----
    @staticmethod
    def geometryOf(volumeNode) -> VolumeGeometry:
        return SliceViews.geometry(volumeNode)

    @staticmethod
    def sliceOf(volumeNode, sliceNode) -> tuple[str, int] | None:
        return None if sliceNode is None else SliceViews.slice_of(volumeNode, sliceNode)

    @staticmethod
    def sliceInRedView(volumeNode) -> tuple[str, int]:
        return SliceViews.red_slice(slicer.mrmlScene, volumeNode)

    @staticmethod
    def axisForPoint(volumeNode, ras) -> str:
        return SliceViews.axis_for_point(slicer.mrmlScene, volumeNode, ras)

    @staticmethod
    def jumpToSlice(volumeNode, axis: str, index: int) -> None:
        SliceViews.jump_to_slice(slicer.mrmlScene, volumeNode, axis, index)

    @staticmethod
    def displayWindow(volumeNode) -> tuple[float, float] | None:
        """(center, width) of the volume's display window/level: the intensity window sent."""
        return None if volumeNode is None else SegmentationLogic.window_of(volumeNode)
