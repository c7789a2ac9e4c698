"""The slices of an automatic job (``/segment/auto``), one after another.

Modes: ``box`` / ``grid`` (DeSAM's automatic modes, a DeSAM decoder), ``roi`` (every slice
prompted by the user's box: SAM's decoder, a DeSAM decoder or an adapted-encoder model
such as DB-SAM, which is trained for box prompts) and ``cam-box`` (a SAM-Mix model: the
slice classifier decides whether the slice holds the structure and its class activation
map gives the box that prompts SAM-Mix's adapted SAM).

Each slice's features come through the scheduler (the model's own encoder for an adapted
model: ``LoadedDecoder.encoder``), and each slice's computation runs on the scheduler's
worker thread as non-urgent work, so that clicks are served between slices (and, for
DeSAM's modes, between the slice's own steps). A job holds the ``LoadedDecoder`` it
started with to its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..engine import IntensityWindow, SlicePredictor
from ..engine.sammix import locate
from ..modeling.desam import DeSAM, ImageFeatures
from .decoders import LoadedDecoder
from .jobs import AutoJob, AutoJobSpec, SliceScore

__all__ = ["SliceAccess", "run_auto"]


@dataclass(frozen=True)
class SliceAccess:
    """What a job's slices need from the service: ``features(axis, index, taps, encoder)``
    (the job's volume and window), ``on_worker(fn)`` (non-urgent work on the compute
    thread), ``serve_urgent`` (waiting clicks, from inside such work), ``predictor(model)``
    (a ``SlicePredictor`` with the service's precision and fast path) and ``slice(axis,
    index)`` (the slice's voxels, for the slice classifier)."""

    features: Callable[[str, int, bool, str | None], ImageFeatures]
    on_worker: Callable[[Callable[[], Any]], Any]
    serve_urgent: Callable[[], None]
    predictor: Callable[[DeSAM], SlicePredictor]
    slice: Callable[[str, int], np.ndarray]


def _box_mask(predictor: SlicePredictor, loaded: LoadedDecoder | None, box) -> tuple[np.ndarray, float]:
    """One box on the predictor's slice: DeSAM's decoders for a DeSAM decoder, SAM's
    single-mask answer otherwise."""
    box = np.asarray(box, dtype=np.float64)
    if loaded is not None and loaded.family == "desam":
        return predictor.predict_desam(box=box)
    masks, ious, _ = predictor.predict(box=box, multimask_output=False)
    return masks[0], float(ious[0])


def run_auto(job: AutoJob, loaded: LoadedDecoder | None, base: DeSAM, access: SliceAccess,
             slab: np.ndarray) -> None:
    """Fill ``slab`` (the job's slices, in order) and the job's scores and progress."""
    spec: AutoJobSpec = job.spec
    model = base if loaded is None else loaded.model
    encoder = None if loaded is None else loaded.encoder
    predictor = access.predictor(model)
    for n, index in enumerate(range(spec.start, spec.stop)):
        job.check_cancelled()
        if spec.mode == "cam-box":
            score, mask = _cam_box_slice(job, loaded, predictor, access, index)
        else:
            taps = spec.mode in ("box", "grid")
            features = access.features(spec.axis, index, taps, encoder)
            job.check_cancelled()
            predictor.set_features(features)
            if spec.mode == "roi":
                mask, iou = access.on_worker(lambda: _box_mask(predictor, loaded, spec.box))
            else:  # DeSAM's modes: clicks run between the slice's steps (PRIM chunks, PDMM's blocks)
                result = access.on_worker(lambda: predictor.predict_auto(
                    spec.mode, spec.grid_size, iou_threshold=spec.iou_threshold,
                    min_region_area=spec.min_region_area, between_steps=access.serve_urgent))
                mask, iou = result.mask, (result.iou if np.isfinite(result.iou) else None)
            score = SliceScore(index, iou, int(mask.sum()))
        slab[n] = mask
        job.slices_with_mask += bool(mask.any())
        job.add_slice(score)
        job.done = n + 1


def _cam_box_slice(job: AutoJob, loaded: LoadedDecoder, predictor: SlicePredictor, access: SliceAccess,
                   index: int) -> tuple[SliceScore, np.ndarray]:
    spec: AutoJobSpec = job.spec
    window = IntensityWindow(center=spec.window[0], width=spec.window[1])
    presence = access.on_worker(lambda: locate(
        loaded.classifier, access.slice(spec.axis, index), window, device=loaded.model.device,
        threshold=spec.presence_threshold, omega=spec.omega, largest_only=spec.largest_only))
    if not presence.boxes:
        shape = access.slice(spec.axis, index).shape
        return SliceScore(index, None, 0, presence=presence.probability), np.zeros(shape, dtype=bool)
    features = access.features(spec.axis, index, False, loaded.encoder)
    job.check_cancelled()
    predictor.set_features(features)

    def segment():
        answers = [_box_mask(predictor, loaded, box) for box in presence.boxes]
        return np.logical_or.reduce([m for m, _ in answers]), answers[0][1]

    mask, iou = access.on_worker(segment)
    box = tuple(float(v) for v in presence.boxes[0])
    return SliceScore(index, iou, int(mask.sum()), presence=presence.probability, box=box), mask

