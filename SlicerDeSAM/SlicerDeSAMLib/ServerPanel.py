"""Server panel: where the service is, whether it answers, and a local service to start.

The URL and the token are kept in Slicer's settings (``qt.QSettings``), never in the scene.
Every network call runs on the session's worker; this panel only reads the answers when
the module's timer polls the worker.
"""

from __future__ import annotations

import shlex
import time

import qt
import slicer

from SlicerDeSAMLib.LocalServer import LocalServer
from SlicerDeSAMLib.ServerClient import DEFAULT_URL

SETTINGS_URL = "SlicerDeSAM/ServerURL"
SETTINGS_TOKEN = "SlicerDeSAM/ServerToken"
SETTINGS_EXECUTABLE = "SlicerDeSAM/ServerExecutable"
SETTINGS_ARGUMENTS = "SlicerDeSAM/ServerArguments"
PROGRESS_PERIOD_S = 2.0
LOG_PERIOD_S = 1.0


class ServerPanel:
    """``module``: the module widget (``SlicerDeSAMWidget``): it owns the session and the
    parameter node; ``uiWidget``: this panel's loaded ``UI/ServerPanel.ui``."""

    UI_FILE = "UI/ServerPanel.ui"

    def __init__(self, module, uiWidget) -> None:
        self.module = module
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.localServer: LocalServer | None = None
        self._lastProgress = 0.0
        self._lastLog = 0.0
        self._exitShown = True
        settings = qt.QSettings()
        self.ui.urlLineEdit.text = settings.value(SETTINGS_URL, DEFAULT_URL)
        self.ui.tokenLineEdit.text = settings.value(SETTINGS_TOKEN, "")
        self.ui.executablePathLineEdit.currentPath = settings.value(SETTINGS_EXECUTABLE, "")
        self.ui.serverArgsLineEdit.text = settings.value(SETTINGS_ARGUMENTS, "")
        self.ui.urlLineEdit.connect("editingFinished()", self.onConnectionEdited)
        self.ui.tokenLineEdit.connect("editingFinished()", self.onConnectionEdited)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.startServerButton.connect("clicked(bool)", self.onStartServer)
        self.ui.stopServerButton.connect("clicked(bool)", self.onStopServer)
        self.ui.encodingProgressBar.setMaximum(1)
        self.ui.encodingProgressBar.setValue(0)

    # ---- connection -------------------------------------------------------------------------
    def url(self) -> str:
        return self.ui.urlLineEdit.text.strip() or DEFAULT_URL

    def token(self) -> str:
        return self.ui.tokenLineEdit.text.strip()

    def onConnectionEdited(self) -> None:
        with slicer.util.tryWithErrorDisplay("Invalid service address.", waitCursor=False):
            settings = qt.QSettings()
            settings.setValue(SETTINGS_URL, self.url())
            settings.setValue(SETTINGS_TOKEN, self.token())
            self.module.connectTo(self.url(), self.token())

    def onTestConnection(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to test the connection.", waitCursor=False):
            self.onConnectionEdited()
            session = self.module.session
            self.ui.connectionStatusLabel.text = f"asking {session.url} ..."
            session.worker.submit(session.server.test_connection, on_done=self._showSummary,
                                  on_error=self._showConnectionError, key="server")

    def _showSummary(self, summary) -> None:
        self.module.session.connected = True
        self.ui.connectionStatusLabel.text = "connected"
        self.ui.modelLabel.text = summary.model
        self.ui.deviceLabel.text = summary.device
        self.ui.decodersLabel.text = summary.decoders
        self.ui.cacheLabel.text = summary.cache
        self.module.serviceConnected(summary)

    def _showConnectionError(self, exc: BaseException) -> None:
        message = self.module.describe(exc)
        self.ui.connectionStatusLabel.text = message
        for label in (self.ui.modelLabel, self.ui.deviceLabel, self.ui.decodersLabel, self.ui.cacheLabel):
            label.text = "-"
        slicer.util.errorDisplay(message, windowTitle="DeSAM service")

    # ---- local service ----------------------------------------------------------------------
    def onStartServer(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to start the local DeSAM service.", waitCursor=True):
            executable = self.ui.executablePathLineEdit.currentPath.strip()
            if not executable:
                raise ValueError("Choose the desam-server program first (Server panel, Local service).")
            args = shlex.split(self.ui.serverArgsLineEdit.text)
            settings = qt.QSettings()
            settings.setValue(SETTINGS_EXECUTABLE, executable)
            settings.setValue(SETTINGS_ARGUMENTS, self.ui.serverArgsLineEdit.text)
            if self.localServer is not None and self.localServer.is_running():
                raise RuntimeError("The local DeSAM service is already running; stop it first.")
            # Listens where the Service URL points; Slicer's launcher settings are not passed on.
            self.localServer = LocalServer.for_url(executable, self.url(), args=args,
                                                   env=slicer.util.startupEnvironment())
            self.onConnectionEdited()
            self.ui.serverLogPlainTextEdit.clear()
            self.localServer.start()
            self._exitShown = False
            self.ui.connectionStatusLabel.text = f"local service starting at {self.localServer.url} ..."
            self._updateServerButtons()

    def onStopServer(self) -> None:
        with slicer.util.tryWithErrorDisplay("Failed to stop the local DeSAM service.", waitCursor=True):
            self.stopLocalServer()

    def stopLocalServer(self) -> None:
        """Also called when Slicer quits (``aboutToQuit``) and when the module is unloaded."""
        if self.localServer is not None and self.localServer.is_running():
            self.localServer.stop(timeout=10.0)
            if self.module.session is not None:
                self.module.session.forget_volumes()
        self._updateServerButtons()

    def _updateServerButtons(self) -> None:
        running = self.localServer is not None and self.localServer.is_running()
        self.ui.startServerButton.enabled = not running
        self.ui.stopServerButton.enabled = running

    def _showLog(self) -> None:
        if self.localServer is None:
            return
        if not self._exitShown and not self.localServer.is_running():
            self._exitShown = True
            self.ui.connectionStatusLabel.text = self.localServer.exit_message() or "the local service has stopped"
            if self.module.session is not None:
                self.module.session.forget_volumes()
        lines = self.localServer.log_tail(lines=200)
        text = "\n".join(lines)
        if self.ui.serverLogPlainTextEdit.toPlainText() != text:
            self.ui.serverLogPlainTextEdit.setPlainText(text)
            bar = self.ui.serverLogPlainTextEdit.verticalScrollBar()
            bar.setValue(bar.maximum)
        self._updateServerButtons()

    # ---- encoding progress ------------------------------------------------------------------
    def _requestProgress(self) -> None:
        session = self.module.session
        volumeNode = self.module.parameters.volume if self.module.parameters else None
        if session is None or volumeNode is None or session.worker.busy("progress"):
            return
        volumeId = session.known_volume_id(volumeNode)
        if volumeId is None:
            return
        axis = self.module.parameters.axis
        window = self.module.displayWindow(volumeNode)
        session.worker.submit(session.server.encoding_progress, volumeId, axis, window,
                              on_done=self._showProgress, on_error=self._progressFailed, key="progress")

    def _showProgress(self, progress) -> None:
        done, total = progress
        self.ui.encodingProgressBar.setMaximum(max(1, int(total)))
        self.ui.encodingProgressBar.setValue(int(done))

    def _progressFailed(self, exc: BaseException) -> None:
        # Shown in the status line, not a dialog: this poll repeats every few seconds.
        self.ui.connectionStatusLabel.text = self.module.describe(exc)

    def tick(self) -> None:
        """Called by the module's timer on the main thread."""
        now = time.monotonic()
        if now - self._lastLog >= LOG_PERIOD_S:
            self._lastLog = now
            self._showLog()
        if now - self._lastProgress >= PROGRESS_PERIOD_S:
            self._lastProgress = now
            self._requestProgress()

    def cleanup(self) -> None:
        self.stopLocalServer()
