"""Tell the service which slice the user is looking at, so it encodes that one first.

Observes every slice node (Red, Yellow, Green, ...). When one moves, the next timer tick
works out which slice of the chosen volume it shows (the view's normal gives the axis, its
centre the index) and, if that changed, sends ``ServerClient.set_view`` on the worker.
When the chosen volume changes while the service is connected (a successful Test
connection), the volume is uploaded in the background and the Red view's slice hinted, so
encoding starts before the first click.
"""

from __future__ import annotations

import time

import slicer
import vtk
from slicer.util import VTKObservationMixin

HINT_PERIOD_S = 0.25


class ViewHint(VTKObservationMixin):
    """``module``: the module widget (session, parameters, geometry helpers)."""

    def __init__(self, module) -> None:
        VTKObservationMixin.__init__(self)
        self.module = module
        self._moved = None          # the slice node that moved last, until the next tick
        self._sent: tuple | None = None
        self._last = 0.0

    def observe(self) -> None:
        """(Re)observe the scene's slice nodes; call after setup and after a scene close."""
        self.removeObservers(self.onSliceModified)
        for sliceNode in slicer.util.getNodesByClass("vtkMRMLSliceNode"):
            self.addObserver(sliceNode, vtk.vtkCommand.ModifiedEvent, self.onSliceModified)

    def onSliceModified(self, caller, event) -> None:
        self._moved = caller

    def volumeChanged(self) -> None:
        """The chosen volume changed (or the service was connected): upload it if the
        service is connected and lacks it, then hint the slice the Red view shows."""
        self._sent = None
        self._moved = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")
        session, p = self.module.session, self.module.parameters
        if session is None or not session.connected or p is None or p.volume is None:
            return
        if session.known_volume_id(p.volume) is None and not session.worker.busy("upload"):
            ref = session.volume_ref(p.volume)
            session.worker.submit(session.resolve, ref, on_done=lambda _: self.volumeUploaded(),
                                  on_error=self._hintFailed, key="upload")

    def volumeUploaded(self) -> None:
        self._sent = None
        self._moved = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceNodeRed")

    def tick(self) -> None:
        now = time.monotonic()
        if self._moved is None or now - self._last < HINT_PERIOD_S:
            return
        self._last = now
        sliceNode, self._moved = self._moved, None
        session = self.module.session
        p = self.module.parameters
        if session is None or p is None or p.volume is None or session.worker.busy("view"):
            return
        volumeId = session.known_volume_id(p.volume)
        if volumeId is None:
            return
        try:
            where = self.module.sliceOf(p.volume, sliceNode)
        except ValueError:  # e.g. a non-linear transform: the actions themselves say so
            return
        if where is None:
            return
        hint = (volumeId, *where)
        if hint == self._sent:
            return
        self._sent = hint
        window = self.module.displayWindow(p.volume)
        # A failed hint is not worth a dialog: the next move sends another one.
        session.worker.submit(session.client.set_view, volumeId, where[0], where[1], window,
                              on_error=self._hintFailed, key="view")

    def _hintFailed(self, exc: BaseException) -> None:
        self._sent = None

    def cleanup(self) -> None:
        self.removeObservers()
