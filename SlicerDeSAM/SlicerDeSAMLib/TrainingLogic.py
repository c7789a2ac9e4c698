"""The Train panel's logic: cases read from the scene, uploaded once, a decoder trained by
the service, its progress polled, the decoder registry's versions switched.

``prepare_case`` reads MRML and runs on the main thread (it imports ``slicer`` inside);
every other method is the worker thread's part (``ServerClient`` calls on plain data, no
Qt, no MRML). Progress is polled (``status``: the job's status and metrics, two short
GETs), which fits a ``QTimer`` + ``BackgroundWorker``; the service's event stream is not
needed. Errors come as ``DeSAMError`` with the service's own message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .DeSAMError import DeSAMError
from .ServerClient import ServerClient, ServerError
from .TrainingCase import TrainingCase
from .TrainingStatus import TrainingStatus

__all__ = ["TrainingLogic"]

#: The model family whose cases carry per-slice lists (the service's ``TrainingCaseRef``).
SLICE_LISTS_FAMILY = "sammix"

#: The options that belong to the training loop's configuration (``options.config`` on the
#: wire); every other option is the data's (split, empty slices, augmentations, axis).
CONFIG_KEYS = ("family", "strategy", "epochs", "batch_size", "learning_rate", "poly_power", "seed", "precision",
               "validation_grid_size", "min_region_area", "iou_threshold")


class TrainingLogic:
    """``client``: the session's client (uploads, start, registry); ``poll_timeout``:
    seconds a status poll may take, so that a service that hangs is reported within it."""

    def __init__(self, client: ServerClient, poll_timeout: float = 10.0) -> None:
        self.client = client
        self._poll = ServerClient(client.url, token=client.token, timeout=poll_timeout, ca_file=client.ca_file)

    @property
    def url(self) -> str:
        return self.client.url

    def _error(self, exc: ServerError, action: str) -> DeSAMError:
        return DeSAMError.from_server_error(exc, self.url, action)

    # ---- main thread --------------------------------------------------------------------------
    @staticmethod
    def prepare_case(volume_node, segmentation_node, segment_id: str, structure: str | None = None) -> TrainingCase:
        """The volume's voxels and geometry and the segment's label on the volume's grid
        (``slicer.util.arrayFromSegmentBinaryLabelmap`` with the volume as reference, so
        both nodes' transforms are honoured). ``structure``: the name the label is stored
        under (default: the segment's name). Main thread only."""
        import slicer

        if volume_node is None or segmentation_node is None or not segment_id:
            raise DeSAMError("Choose a volume, a segmentation and a segment for the training case.")
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            raise DeSAMError(f"The segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}'.")
        name = f"{volume_node.GetName()} / {segment.GetName()}"
        array = slicer.util.arrayFromVolume(volume_node)
        if array is None or array.ndim != 3:
            shape = None if array is None else array.shape
            raise DeSAMError(f"Training case {name}: '{volume_node.GetName()}' is not a scalar 3D volume (voxel "
                             f"array {shape}).")
        # The segment on the volume's grid through both nodes' parent transforms (the reader
        # the prompts use; Slicer's arrayFromSegmentBinaryLabelmap misplaces edge voxels
        # under oblique parent transforms), and the upload geometry the prompts use.
        from . import nodes
        from .SegmentSlices import SegmentSlices

        geometry = nodes.volume_geometry(volume_node)
        label = SegmentSlices().read_slab(segmentation_node, segment_id, volume_node, "k", 0, array.shape[0])
        return TrainingCase(name=name, structure=structure or segment.GetName(), array=np.array(array),
                            label=label, **geometry.lps_geometry())

    # ---- worker thread ------------------------------------------------------------------------
    def upload_cases(self, cases: Sequence[TrainingCase]) -> list[dict]:
        """Each case's volume (once per content id; skipped when the service holds it) and
        its label (PUT under the case's structure name). Returns one reference per case:
        ``{"volume_id", "structure", "name", "uploaded" (volume bytes sent), "voxels",
        "slices", "segmented_slices", "present_slices"}`` (the last two:
        ``TrainingCase.slice_lists``, used by a SAM-Mix run); pass them to ``start``."""
        refs, sent = [], {}
        for case in cases:
            volume_id = case.volume_id
            try:
                if volume_id not in sent:
                    got, sent[volume_id] = self.client.upload_volume(case.array, **case.geometry)
                    if got != volume_id:
                        raise DeSAMError(f"The service named the volume of {case.name} {got[:12]}, this module "
                                         f"{volume_id[:12]}.")
                label = self.client.put_label(volume_id, case.structure, case.label)
            except ServerError as exc:
                raise self._error(exc, f"Could not upload the training case {case.name}") from None
            refs.append({"volume_id": volume_id, "structure": case.structure, "name": case.name,
                         "uploaded": sent[volume_id], "voxels": label.get("voxels"), "slices": label.get("slices"),
                         **case.slice_lists()})
        return refs

    @staticmethod
    def training_options(options: dict | None) -> dict:
        """The service's nested options from flat ones (``strategy``, ``epochs``, ... go into
        ``config``; ``validation_fraction``, ``empty_ratio``, ``slice_step``, ... stay at the
        top); an explicit ``config`` dict is kept and the flat keys added to it."""
        flat = dict(options or {})
        config = dict(flat.pop("config", None) or {})
        for key in CONFIG_KEYS:
            if key in flat:
                config[key] = flat.pop(key)
        return {**flat, "config": config} if config else flat

    def start(self, structure: str, case_refs: Sequence[dict], options: dict | None = None) -> dict:
        """Start training a decoder for ``structure`` on uploaded cases (``upload_cases``'s
        references); ``options``: flat or nested (``training_options``), e.g.
        ``{"strategy": "box", "epochs": 50}``. Returns the job's status (``id``). One job at
        a time: a second is refused with the service's message naming the first. A SAM-Mix
        run (family ``sammix``) sends each case's segmented and present slices."""
        nested = self.training_options(options)
        keys = ("volume_id", "structure")
        if nested.get("config", {}).get("family") == SLICE_LISTS_FAMILY:
            keys += ("segmented_slices", "present_slices")
        cases = [{key: r[key] for key in keys} for r in case_refs]
        if not cases:
            raise DeSAMError("Add at least one training case (a volume and a segment) first.")
        try:
            return self.client.start_training(structure, cases, nested)
        except ServerError as exc:
            raise self._error(exc, "Could not start training") from None

    def status(self, job_id: str) -> TrainingStatus:
        """The job's status and metrics (two GETs). A service that went away raises
        ``Cannot reach the DeSAM service at ...``; one restarted since (jobs do not survive
        a restart) says so."""
        try:
            job = self._poll.training_job(job_id)
            metrics = self._poll.training_metrics(job_id)
        except ServerError as exc:
            if exc.status == 404:
                raise DeSAMError(f"The DeSAM service at {self.url} no longer knows training job {job_id[:8]}: it was "
                                 "restarted (a job does not survive a restart) or has forgotten the job. Start the "
                                 "training again; the uploaded cases are still there.", status=404) from None
            raise self._error(exc, "Could not read the training job's status") from None
        return TrainingStatus.from_answers(job, metrics)

    def cancel(self, job_id: str) -> TrainingStatus:
        """Ask the job to stop (before its next step); returns its status (still
        ``running`` until the process has stopped: keep polling)."""
        try:
            self.client.cancel_training(job_id)
        except ServerError as exc:
            raise self._error(exc, "Could not cancel training") from None
        return self.status(job_id)

    def log(self, job_id: str, lines: int = 100) -> list[str]:
        try:
            return self.client.training_log(job_id, lines)
        except ServerError as exc:
            raise self._error(exc, "Could not read the training log") from None

    # ---- decoder registry -----------------------------------------------------------------------
    def versions(self, structure: str | None = None) -> list[dict]:
        """The registry's decoder versions (of ``structure``, or of every structure), oldest
        first per structure: ``{"structure", "version", "created", "active", "family",
        "encoder", "size_bytes", "curve", "problem"}`` (``family``: desam, dbsam or sammix)."""
        try:
            states = [self.client.registry_structure(structure)] if structure else self.client.registry()
        except ServerError as exc:
            raise self._error(exc, "Could not read the decoder versions") from None
        out = []
        for state in states:
            for v in state.get("versions", []):
                out.append({"structure": state["structure"], "version": v["version"], "created": v.get("created"),
                            "active": v["version"] == state.get("active"), "family": v.get("family"),
                            "encoder": v.get("encoder"),
                            "size_bytes": v.get("size_bytes"), "curve": v.get("curve"),
                            "problem": state.get("problem")})
        return out

    def activate(self, structure: str, version: str) -> dict:
        """Serve ``version`` of ``structure`` from now on (no restart)."""
        try:
            return self.client.activate_decoder(structure, version)
        except ServerError as exc:
            raise self._error(exc, f"Could not activate {structure} {version}") from None

    def rollback(self, structure: str) -> dict:
        """Back to the version of ``structure`` that was active before."""
        try:
            return self.client.rollback_decoder(structure)
        except ServerError as exc:
            raise self._error(exc, f"Could not roll back {structure}") from None
