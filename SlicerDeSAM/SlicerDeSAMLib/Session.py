"""The module's connection to the service and the objects built on it.

One ``Session`` per service URL and token: the ``ServerClient``, the logic objects that use
it (segmentation, server, training) and the ``BackgroundWorker`` that runs their network
parts off the main thread. It also remembers which scene volumes the service already has,
so a volume is uploaded once per session (the service dedups by content too).

No Qt here, and no MRML call except reading a volume node's key on the main thread: the
panels read the scene on the main thread and pass plain data.
"""

from __future__ import annotations

import threading

import vtk

from SlicerDeSAMLib.BackgroundWorker import BackgroundWorker
from SlicerDeSAMLib.DeSAMError import DeSAMError
from SlicerDeSAMLib.EditorLogic import EditorLogic
from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic
from SlicerDeSAMLib.ServerClient import ServerClient, ServerError
from SlicerDeSAMLib.ServerLogic import ServerLogic
from SlicerDeSAMLib.TrainingLogic import TrainingLogic
from SlicerDeSAMLib.VolumeRef import VolumeRef


class Session:
    """``url`` and ``token`` as the user set them in the Server panel."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.client = ServerClient(url, token=token or None)
        self.segmentation = SegmentationLogic(self.client)
        self.server = ServerLogic(self.client)
        self.training = TrainingLogic(self.client)
        self.editor = EditorLogic()
        self.worker = BackgroundWorker()
        self._volumes: dict[tuple, str] = {}
        self._lock = threading.Lock()
        self.connected = False  # set by the Server panel after a successful Test connection

    @property
    def url(self) -> str:
        return self.client.url

    # ---- volumes --------------------------------------------------------------------------
    @staticmethod
    def volume_key(volume_node) -> tuple:
        """Main thread: what identifies the current content and geometry of ``volume_node``."""
        image = volume_node.GetImageData()
        m = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(m)  # the local grid the wire format describes
        return (volume_node.GetID(), image.GetMTime() if image is not None else 0,
                tuple(m.GetElement(r, c) for r in range(4) for c in range(4)))

    def volume_ref(self, volume_node) -> VolumeRef:
        """Main thread: the service's id of ``volume_node`` if known, else its prepared upload."""
        if volume_node is None or volume_node.GetImageData() is None:
            raise ValueError("Select a volume with image data first.")
        key = self.volume_key(volume_node)
        with self._lock:
            known = self._volumes.get(key)
        if known is not None:
            return VolumeRef(key, known)
        return VolumeRef(key, None, self.segmentation.prepare_volume(volume_node))

    def known_volume_id(self, volume_node) -> str | None:
        """Main thread: the service's id of ``volume_node`` if it was uploaded in this session."""
        if volume_node is None or volume_node.GetImageData() is None:
            return None
        with self._lock:
            return self._volumes.get(self.volume_key(volume_node))

    def resolve(self, ref: VolumeRef) -> str:
        """Worker thread: the volume's id, uploading it first when the service lacks it."""
        if ref.volume_id is not None:
            return ref.volume_id
        volume_id = self.segmentation.request_upload(ref.volume_input)
        with self._lock:
            self._volumes[ref.key] = volume_id
        return volume_id

    def forget_volumes(self) -> None:
        """After the service restarted: upload again on next use."""
        with self._lock:
            self._volumes.clear()

    # ---- errors -----------------------------------------------------------------------------
    def describe(self, exc: BaseException) -> str:
        """A message for the user: the service's own words when it answered one (the same
        fixed first words as the logic's ``DeSAMError``, which the README quotes)."""
        if isinstance(exc, DeSAMError):
            return exc.message
        if isinstance(exc, ServerError):
            return DeSAMError.from_server_error(exc, self.url, "The DeSAM service answered an error").message
        if isinstance(exc, ValueError | RuntimeError | TimeoutError):
            return str(exc)
        return f"{type(exc).__name__}: {exc}"

    def report(self, exc: BaseException) -> str:
        """``describe(exc)``, and when the service has gone away (not reachable) or no longer
        knows a volume (404: restarted, or its cache was cleared), forget the volumes it was
        sent, so the next action uploads again: the user recovers by repeating the action."""
        status = getattr(exc, "status", None)
        if status in (0, 404):
            self.forget_volumes()
            if status == 0:
                self.connected = False
        return self.describe(exc)

    def close(self) -> None:
        self.worker.shutdown(wait=False)
        self.client.close()
