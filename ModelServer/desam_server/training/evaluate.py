"""Whole-volume evaluation of a family's prompt-free prediction (spec item 24: every slice,
empty slices included; no border zeroing).

Per volume: Dice and normalised surface distance (NSD, MONAI's ``compute_surface_dice``
with the volume's spacing) at a tolerance in mm, in 3-D over the whole volume, plus the
slices' own Dice; overall: mean of the volumes' values and the pooled Dice. Outputs:
``evaluation.json``, ``evaluation.csv`` (one row per volume, ids only) and
``worst_slices.png`` (the slices with the lowest Dice: prediction and truth drawn).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice

from ..atomic import atomic_write_bytes
from ..io.overlay import write_overlay_montage
from ..io.slices import slice_view
from ..wire import axis_dimension
from .cases import Case
from .family import ModelFamily
from .slice_images import SliceReader, check_reader

__all__ = ["VolumeScore", "evaluate_cases", "write_evaluation", "dice_and_nsd", "volume_dice"]


@dataclass
class VolumeScore:
    case_id: str
    dice: float
    nsd: float
    voxels_truth: int
    voxels_predicted: int
    slice_dice: dict[int, float] = field(default_factory=dict)
    prediction: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {"case_id": self.case_id, "dice": self.dice, "nsd": self.nsd, "voxels_truth": self.voxels_truth,
                "voxels_predicted": self.voxels_predicted}


def volume_dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """3-D Dice (MONAI's ``compute_dice``) of two bool arrays; both empty: 1."""
    if not predicted.any() and not truth.any():
        return 1.0
    y_pred = torch.as_tensor(predicted, dtype=torch.float32)[None, None]
    y = torch.as_tensor(truth, dtype=torch.float32)[None, None]
    return float(compute_dice(y_pred, y, include_background=True)[0, 0])


def dice_and_nsd(predicted: np.ndarray, truth: np.ndarray, spacing: Sequence[float], tolerance_mm: float,
                 ) -> tuple[float, float]:
    """3-D Dice and NSD of bool K x J x I arrays; spacing in the array's axis order. Both
    empty: 1 and 1; one empty: 0 and 0 (MONAI leaves these undefined)."""
    p, t = predicted.any(), truth.any()
    if not p and not t:
        return 1.0, 1.0
    if not p or not t:
        return 0.0, 0.0
    dice = volume_dice(predicted, truth)
    y_pred = torch.as_tensor(predicted, dtype=torch.float32)[None, None]
    y = torch.as_tensor(truth, dtype=torch.float32)[None, None]
    nsd = float(compute_surface_dice(torch.cat([1 - y_pred, y_pred], 1), torch.cat([1 - y, y], 1),
                                     class_thresholds=[float(tolerance_mm)], spacing=list(spacing))[0, 0])
    return dice, nsd


def evaluate_cases(model, family: ModelFamily, cases: Sequence[Case], reader: SliceReader, *, axis: str,
                   mode: str, options: dict, tolerance_mm: float = 2.0,
                   progress: Callable[[int, int], None] | None = None) -> list[VolumeScore]:
    """Per-volume Dice / NSD of ``family.predict`` over every slice along ``axis``;
    ``reader`` gives what the family reads (``check_reader``)."""
    check_reader(family, reader)
    dim = axis_dimension(axis)
    total = sum(c.volume.shape[dim] for c in cases)
    done = 0
    scores = []
    for case in cases:
        predicted = np.zeros(case.mask.shape, bool)
        slice_dice = {}
        for index in range(case.volume.shape[dim]):
            source = reader.load(case, axis, index, model.device)
            mask = family.predict(model, source, mode, options)
            slice_view(predicted, axis, index)[...] = mask
            truth = slice_view(case.mask, axis, index)
            denom = int(mask.sum() + truth.sum())
            if denom:
                slice_dice[index] = 2.0 * int(np.logical_and(mask, truth).sum()) / denom
            done += 1
            if progress is not None:
                progress(done, total)
        # Geometry spacing is (i, j, k); the array is [k, j, i].
        spacing = tuple(float(s) for s in case.volume.geometry.spacing)[::-1]
        dice, nsd = dice_and_nsd(predicted, case.mask, spacing, tolerance_mm)
        scores.append(VolumeScore(case.case_id, dice, nsd, int(case.mask.sum()), int(predicted.sum()),
                                  slice_dice, predicted))
    return scores


def summary(scores: Sequence[VolumeScore], *, tolerance_mm: float, mode: str, axis: str) -> dict:
    return {"mode": mode, "axis": axis, "tolerance_mm": tolerance_mm, "volumes": len(scores),
            "mean_dice": float(np.mean([s.dice for s in scores])) if scores else math.nan,
            "mean_nsd": float(np.mean([s.nsd for s in scores])) if scores else math.nan,
            "per_volume": [s.to_json() for s in scores]}


def write_evaluation(output_dir: Path, cases: Sequence[Case], scores: Sequence[VolumeScore], *, axis: str,
                     mode: str, tolerance_mm: float, worst: int = 12, extra: dict | None = None) -> dict:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {**summary(scores, tolerance_mm=tolerance_mm, mode=mode, axis=axis),
              "worst_slices": worst_slices(scores, worst), **(extra or {})}
    atomic_write_bytes(output_dir / "evaluation.json", json.dumps(report, indent=1).encode())
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["case_id", "dice", "nsd", "voxels_truth", "voxels_predicted"])
    for s in scores:
        writer.writerow([s.case_id, f"{s.dice:.5f}", f"{s.nsd:.5f}", s.voxels_truth, s.voxels_predicted])
    atomic_write_bytes(output_dir / "evaluation.csv", text.getvalue().encode())
    _worst_montage(output_dir / "worst_slices.png", cases, scores, axis=axis, worst=worst)
    return report


def _worst_montage(path: Path, cases: Sequence[Case], scores: Sequence[VolumeScore], *, axis: str,
                   worst: int) -> None:
    """The ``worst`` slices by Dice over all volumes, one tile each: truth label 1 (green),
    prediction label 2 (blue), both 3."""
    ranked = [(w["dice"], next(n for n, s in enumerate(scores) if s.case_id == w["case_id"]), w["slice"])
              for w in worst_slices(scores, worst)]
    if not ranked:
        return
    tiles, labels = [], []
    for _, n, index in ranked:
        case = cases[n]
        tiles.append(np.asarray(slice_view(case.volume.array, axis, index), np.float32))
        truth = np.asarray(slice_view(case.mask, axis, index))
        pred = np.asarray(slice_view(scores[n].prediction, axis, index))
        labels.append(truth.astype(np.uint8) + 2 * pred.astype(np.uint8))
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    stack = np.zeros((len(tiles), h, w), np.float32)
    label_stack = np.zeros((len(tiles), h, w), np.uint8)
    for n, (t, lab) in enumerate(zip(tiles, labels, strict=True)):
        stack[n, : t.shape[0], : t.shape[1]] = t
        label_stack[n, : t.shape[0], : t.shape[1]] = lab
    window = cases[ranked[0][1]].window
    write_overlay_montage(path, stack, label_stack, slice_indices=list(range(len(tiles))),
                          window=(window.center, window.width))


def worst_slices(scores: Sequence[VolumeScore], worst: int) -> list[dict]:
    """The montage's tiles in order: (case_id, slice index, Dice)."""
    ranked = sorted(((d, n, i) for n, s in enumerate(scores) for i, d in s.slice_dice.items()))[:worst]
    return [{"tile": t, "case_id": scores[n].case_id, "slice": i, "dice": d} for t, (d, n, i) in enumerate(ranked)]
