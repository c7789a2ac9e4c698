"""Automatic, prompted and propagated segmentation of a volume through the DeSAM service,
written into a segment slice by slice, with one undo step per AI action.

Threading rule: every user action is three calls.
1. ``prepare_*`` (main thread) reads MRML into a frozen value of ``requests.py``;
2. ``request_*`` (worker thread) talks to the service through ``ServerClient`` only, and
   returns another frozen value; it touches neither MRML nor Qt;
3. ``apply_*`` (main thread) writes the answer into the segment (``SegmentSlices``).
No Qt here; ``slicer`` (MRML) is used by the prepare and apply parts only.

Undo outside the Segment Editor: each ``apply_*`` records the slices it replaces (their
content before); ``undo_last(segmentation_node)`` puts back the last action's slices
exactly, ``accept()`` forgets the history.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import slicer

from . import nodes
from .requests import (
    AutoOptions,
    AutoOutcome,
    PromptInput,
    PromptOutcome,
    PropagationInput,
    PropagationOptions,
    UndoStep,
    VolumeInput,
)
from .SegmentSlices import SegmentSlices
from .ServerClient import ServerError
from .wire import DTYPES

__all__ = ["SegmentationLogic"]


class SegmentationLogic:
    """``client``: a ``ServerClient``; ``slices``: the segment reader/writer (default
    ``SegmentSlices()``); ``max_undo``: how many AI actions ``undo_last`` can take back."""

    def __init__(self, client, slices: SegmentSlices | None = None, *, max_undo: int = 20) -> None:
        self.client = client
        self.slices = slices if slices is not None else SegmentSlices()
        self.max_undo = max_undo
        self._history: list[UndoStep] = []
        self._answers: dict[tuple, PromptOutcome] = {}      # the last answer written on each slice
        self._uploaded: dict[tuple, str] = {}
        self._lock = threading.Lock()

    # ---- volume -------------------------------------------------------------------------------
    def prepare_volume(self, volume_node) -> VolumeInput:
        """Main thread: the volume's voxels (a read-only copy), geometry and display window."""
        geometry = nodes.volume_geometry(volume_node)
        array = slicer.util.arrayFromVolume(volume_node)
        if array.ndim != 3:
            raise ValueError(f"'{volume_node.GetName()}' is not a scalar volume (its voxels have {array.ndim - 3} "
                             "extra dimension): choose a scalar volume")
        if array.dtype.name not in DTYPES:
            array = array.astype(np.float32)
        ijk = geometry.local_ijk_to_ras
        key = (volume_node.GetID(), volume_node.GetImageData().GetMTime(), ijk.tobytes())
        return VolumeInput(array=array, geometry=geometry, window=self.window_of(volume_node),
                           key=key, name=volume_node.GetName() or "")

    @staticmethod
    def window_of(volume_node) -> tuple[float, float] | None:
        """(center, width) of the volume's display window/level; None without a display node."""
        display = volume_node.GetDisplayNode()
        if display is None or not hasattr(display, "GetWindow") or display.GetWindow() <= 0:
            return None
        return float(display.GetLevel()), float(display.GetWindow())

    def request_upload(self, volume: VolumeInput) -> str:
        """Worker: the service's id of the volume, uploading it only when the service does
        not hold it (the id of a volume already sent is remembered and checked)."""
        with self._lock:
            known = self._uploaded.get(volume.key)
        if known is not None and self.client.has_volume(known):
            return known
        volume_id, _ = self.client.upload_volume(volume.array, **volume.geometry.lps_geometry())
        with self._lock:
            self._uploaded[volume.key] = volume_id
        return volume_id

    # ---- automatic ----------------------------------------------------------------------------
    @staticmethod
    def prepare_roi(volume_node, roi_node, axis: str) -> tuple[tuple[float, float, float, float], int, int]:
        """Main thread: a markups ROI as the 'roi' mode takes it along ``axis``: (the box in
        the slice frame, start, stop): the ROI's corners projected along the axis, and the
        slices its extent along the axis covers. ValueError when it misses the volume."""
        return nodes.volume_geometry(volume_node).region_box(nodes.roi_corners_world(roi_node), axis)

    def request_auto(self, volume_id: str, options: AutoOptions, window=None) -> dict:
        """Worker: start the automatic job; returns its JSON (``id``, ``state``...)."""
        return self.client.segment_auto(volume_id, axis=options.axis, start=options.start, stop=options.stop,
                                        mode=options.mode, decoder=options.decoder, window=window,
                                        grid_size=options.grid_size, iou_threshold=options.iou_threshold,
                                        min_region_area=options.min_region_area, box=options.box,
                                        presence_threshold=options.presence_threshold)

    def request_job(self, job_id: str) -> dict:
        """Worker: the job's state and progress (and ``slices`` done so far)."""
        return self.client.job(job_id)

    def cancel(self, job_id: str) -> dict:
        """Worker: ask the service to stop the job before its next slice."""
        return self.client.cancel_job(job_id)

    def request_job_result(self, job_id: str) -> AutoOutcome:
        """Worker: a finished job's mask slab with each slice's predicted IoU and area;
        RuntimeError with the service's reason when the job did not succeed."""
        job = self.client.job(job_id)
        if job["state"] != "succeeded":
            reason = job.get("error") or "no reason given"
            raise RuntimeError(f"the job {job_id[:8]} {job['state']}: {reason}")
        decoded = self.client.job_result(job_id)
        slab = decoded.mask if decoded.mask.ndim == 3 else decoded.mask[None]
        scores = tuple(sorted((int(s["index"]), None if s.get("iou") is None else float(s["iou"]), int(s["area"]))
                              for s in job.get("slices") or ()))
        reached = job.get("reached")
        presence = tuple(sorted((int(s["index"]), float(s["presence"])) for s in job.get("slices") or ()
                                if s.get("presence") is not None))
        threshold = (job.get("spec") or {}).get("presence_threshold") if presence else None
        return AutoOutcome(job_id=job_id, kind=job.get("kind", "auto"), axis=decoded.axis, offset=decoded.offset,
                           slab=slab, slices=scores, reached=None if reached is None else tuple(reached),
                           presence=presence, presence_threshold=None if threshold is None else float(threshold))

    def apply_auto(self, outcome: AutoOutcome, segmentation_node, segment_id: str, volume_node) -> UndoStep:
        """Main thread: write the job's slices into the segment (one undo step)."""
        return self._replace(f"{outcome.kind} job {outcome.job_id[:8]}", segmentation_node, segment_id, volume_node,
                             outcome.axis, outcome.offset, outcome.slab)

    @staticmethod
    def review_items(outcome: AutoOutcome, include_empty: bool = False, *, by: str = "iou") -> list[tuple[int, float]]:
        """The slices to check first, ties by index.

        by 'iou': (slice index, predicted IoU), lowest IoU first. Slices where nothing was
        found (area 0) are left out unless ``include_empty``, and so is a propagation's
        seed (its mask was the user's: no IoU).
        by 'presence' (a 'cam-box' run): (slice index, presence probability), the
        classifier's least certain decisions first (probability nearest its threshold),
        every slice it judged, segmented or not."""
        if by == "presence":
            threshold = 0.5 if outcome.presence_threshold is None else outcome.presence_threshold
            return sorted(outcome.presence, key=lambda item: (abs(item[1] - threshold), item[0]))
        if by != "iou":
            raise ValueError(f"review by 'iou' or 'presence', not {by!r}")
        items = [(index, iou) for index, iou, area in outcome.slices
                 if iou is not None and (include_empty or area > 0)]
        return sorted(items, key=lambda item: (item[1], item[0]))

    # ---- prompts --------------------------------------------------------------------------------
    def prepare_prompt(self, volume_node, segmentation_node, segment_id: str, points_world, labels,
                       box_world=None, axis: str = "k", decoder: str = "sam") -> PromptInput:
        """Main thread: points (world RAS, with labels 1/0) and/or a box (two opposite
        world corners) on one slice along ``axis`` (the slice of the first point, else of
        the box's first corner), mapped into the service's slice frame, with the segment's
        current mask on that slice to refine."""
        geometry = nodes.volume_geometry(volume_node)
        points_world = [] if points_world is None else [np.asarray(p, dtype=np.float64) for p in points_world]
        labels = tuple(int(v) for v in (labels if labels is not None else [1] * len(points_world)))
        if len(labels) != len(points_world) or any(v not in (0, 1) for v in labels):
            raise ValueError(f"each point needs a label 1 (foreground) or 0 (background): {len(points_world)} points, "
                             f"labels {list(labels)}")
        if not points_world and box_world is None:
            raise ValueError("a prompt needs at least one point or a box")
        anchor = points_world[0] if points_world else np.asarray(box_world[0], dtype=np.float64)
        index = geometry.slice_index(anchor, axis)
        points = np.array([geometry.slice_point(p, axis, index) for p in points_world]) if points_world else None
        box = None if box_world is None else geometry.slice_box(box_world[0], box_world[1], axis, index)
        self.slices.ensure_reference_geometry(segmentation_node, volume_node)
        current = self.slices.read_slice(segmentation_node, segment_id, volume_node, axis, index)
        last = self._answers.get(self._slice_key(segmentation_node, segment_id, volume_node, axis, index))
        unchanged = last is not None and last.logits_id and np.array_equal(last.mask, current)
        return PromptInput(axis=axis, index=index, shape=geometry.slice_shape(axis), points=points, labels=labels,
                           box=box, mask=current if current.any() else None, window=self.window_of(volume_node),
                           decoder=decoder, logits_id=last.logits_id if unchanged else None)

    def request_prompt(self, volume_id: str, prompt: PromptInput) -> PromptOutcome:
        """Worker: the service's best mask for the prompt, refining the slice's current
        mask (SAM's decoder only): by the logits of the answer that is still there
        (``logits_id``), else (or when the service has forgotten them) by the mask itself."""
        refine = prompt.decoder == "sam"
        logits_id = prompt.logits_id if refine else None
        try:
            return self._prompt(volume_id, prompt, logits_id, prompt.mask if refine else None)
        except ServerError as exc:
            if logits_id is None or exc.status not in (404, 422):
                raise
            return self._prompt(volume_id, prompt, None, prompt.mask)      # the logits expired: send the mask

    def _prompt(self, volume_id: str, prompt: PromptInput, logits_id: str | None, mask) -> PromptOutcome:
        points = None if prompt.points is None else prompt.points.tolist()
        single_point = points is not None and len(points) == 1 and prompt.box is None and mask is None
        started = time.perf_counter()
        answer = self.client.segment_prompt(volume_id, prompt.axis, prompt.index, points=points,
                                            labels=list(prompt.labels) if points is not None else None,
                                            box=prompt.box, logits_id=logits_id, mask=None if logits_id else mask,
                                            multimask=single_point, decoder=prompt.decoder, window=prompt.window)
        round_trip = time.perf_counter() - started
        best = int(answer.best)
        chosen = answer.masks[best]
        if (answer.axis, int(answer.index)) != (prompt.axis, prompt.index) or chosen.shape != tuple(prompt.shape):
            raise RuntimeError(f"the service answered slice {answer.index} along {answer.axis} with a "
                               f"{chosen.shape} mask; asked slice {prompt.index} along {prompt.axis}, {prompt.shape}")
        return PromptOutcome(axis=prompt.axis, index=prompt.index, mask=chosen, iou=float(answer.ious[best]),
                             area=int(answer.areas[best]), logits_id=answer.logits_ids[best], decoder=answer.decoder,
                             timing=dict(answer.timing), round_trip_s=round_trip)

    def apply_prompt(self, outcome: PromptOutcome, segmentation_node, segment_id: str, volume_node) -> UndoStep:
        """Main thread: set that slice of the segment to the mask (one undo step)."""
        step = self._replace(f"prompt on slice {outcome.index}", segmentation_node, segment_id, volume_node,
                             outcome.axis, outcome.index, outcome.mask[None])
        self.remember_answer(outcome, segmentation_node, segment_id, volume_node)
        return step

    def remember_answer(self, outcome: PromptOutcome, segmentation_node, segment_id: str, volume_node) -> None:
        """The outcome was written on its slice (here, or by the Segment Editor's path): the
        next prompt there refines it by its logits while the slice still equals its mask."""
        key = self._slice_key(segmentation_node, segment_id, volume_node, outcome.axis, outcome.index)
        self._answers[key] = outcome

    @staticmethod
    def _slice_key(segmentation_node, segment_id: str, volume_node, axis: str, index: int) -> tuple:
        return segmentation_node.GetID(), segment_id, volume_node.GetID(), axis, int(index)

    # ---- propagation ------------------------------------------------------------------------------
    def prepare_propagation(self, volume_node, segmentation_node, segment_id: str, axis: str, index: int,
                            options: PropagationOptions | None = None) -> PropagationInput:
        """Main thread: the seed slice's mask (it must not be empty)."""
        mask = self.slices.read_slice(segmentation_node, segment_id, volume_node, axis, index)
        if not mask.any():
            raise ValueError(f"slice {index} along {axis} of the segment is empty: segment it (or correct it) first, "
                             "then propagate from it")
        return PropagationInput(axis=axis, index=int(index), mask=mask, options=options or PropagationOptions(),
                                window=self.window_of(volume_node))

    def request_propagation(self, volume_id: str, seed: PropagationInput) -> dict:
        """Worker: start the propagation job; returns its JSON. Poll it with
        ``request_job``, fetch it with ``request_job_result``, write it with ``apply_auto``."""
        o = seed.options
        limits = (("min_area", o.min_area), ("min_area_ratio", o.min_area_ratio), ("max_area_ratio", o.max_area_ratio))
        extra = {name: value for name, value in limits if value is not None}
        return self.client.segment_propagate(volume_id, seed.axis, seed.index, seed.mask, decoder=o.decoder,
                                             start=o.start, stop=o.stop, iou_threshold=o.iou_threshold,
                                             window=seed.window, **extra)

    # ---- undo -----------------------------------------------------------------------------------
    def undo_last(self, segmentation_node) -> UndoStep | None:
        """Main thread: put back the slices the last AI action on this segmentation
        replaced; returns that action's step (None when there is nothing to undo)."""
        node_id = segmentation_node.GetID()
        for position in range(len(self._history) - 1, -1, -1):
            step = self._history[position]
            if step.segmentation_id != node_id:
                continue
            volume_node = segmentation_node.GetScene().GetNodeByID(step.volume_id)
            if volume_node is None:
                raise ValueError(f"cannot undo the {step.action}: its volume is no longer in the scene")
            self.slices.write_slab(segmentation_node, step.segment_id, volume_node, step.axis, step.offset,
                                   step.previous)
            del self._history[position]
            return step
        return None

    def can_undo(self, segmentation_node) -> bool:
        return any(step.segmentation_id == segmentation_node.GetID() for step in self._history)

    def accept(self) -> None:
        """Keep the results: forget the undo history."""
        self._history.clear()
        self._answers.clear()

    def _replace(self, action: str, segmentation_node, segment_id: str, volume_node, axis: str, offset: int,
                 slab: np.ndarray) -> UndoStep:
        self.slices.ensure_reference_geometry(segmentation_node, volume_node)
        previous = self.slices.read_slab(segmentation_node, segment_id, volume_node, axis, offset, slab.shape[0])
        self.slices.write_slab(segmentation_node, segment_id, volume_node, axis, offset, slab)
        step = UndoStep(action=action, segmentation_id=segmentation_node.GetID(), segment_id=segment_id,
                        volume_id=volume_node.GetID(), axis=axis, offset=int(offset), previous=previous)
        self._history.append(step)
        del self._history[:-self.max_undo]
        return step
