"""Headless batch segmentation of a volume, slice by slice along one axis.

Modes: 'box' and 'grid' are DeSAM's automatic modes (they need a trained decoder);
'prompt' runs SAM's pretrained prompted decoder with prompts from a documented rule that
stands in for the user's box or click: the bounding box of a reference mask on each
slice (``--prompt-from-mask``), or one fixed box or point for every slice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from .engine.postprocess import largest_component
from .engine.predictor import SlicePredictor
from .engine.preprocess import IntensityWindow, apply_window
from .io.slices import axis_dimension, slice_view


def parse_slice_range(text: str | None, count: int) -> range:
    """'a:b' (half-open, Python-style, negatives allowed), 'a' or None (all)."""
    if text is None or text == "":
        return range(count)
    try:
        if ":" in text:
            start, stop = text.split(":", 1)
            return range(count)[slice(int(start) if start else None, int(stop) if stop else None)]
        index = int(text)
    except ValueError:
        raise ValueError(f"invalid slice range {text!r}: use 'start:stop' or one index") from None
    if not -count <= index < count:
        raise ValueError(f"slice {index} is outside 0..{count - 1}")
    return range(count)[index : index + 1 if index != -1 else None]


@dataclass(frozen=True)
class PromptRule:
    """Where prompted mode gets its prompt on each slice.

    reference: a K x J x I mask; the bounding box of its largest connected component on
      the slice (grown by ``margin`` pixels) is the box, as a user boxes the structure and
      not stray islands of a threshold-made mask; slices where it is empty stay empty.
    box: x0, y0, x1, y1 used on every slice; point: x, y (foreground) on every slice.
    """

    reference: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    point: tuple[float, float] | None = None
    margin: int = 0

    def describe(self) -> str:
        if self.reference is not None:
            return f"bounding box of the reference mask's largest component on each slice (margin {self.margin} px)"
        if self.box is not None:
            return f"fixed box {self.box} on every slice"
        return f"fixed foreground point {self.point} on every slice"

    def prompt_for(self, axis: str, index: int, shape: tuple[int, int]) -> dict | None:
        h, w = shape
        if self.reference is not None:
            ref = largest_component(slice_view(self.reference, axis, index))
            ys, xs = np.nonzero(ref)
            if ys.size == 0:
                return None
            m = self.margin
            box = [max(0, xs.min() - m), max(0, ys.min() - m), min(w, xs.max() + 1 + m), min(h, ys.max() + 1 + m)]
            return {"box": np.array(box, dtype=np.float64)}
        if self.box is not None:
            return {"box": np.array(self.box, dtype=np.float64)}
        if self.point is not None:
            return {"point_coords": np.array([self.point], dtype=np.float64), "point_labels": np.array([1])}
        raise ValueError("prompted mode needs a reference mask, a box or a point")


@dataclass
class SegmentationReport:
    mode: str
    axis: str
    slices: list[int]
    encode_seconds: list[float] = field(default_factory=list)
    decode_seconds: list[float] = field(default_factory=list)
    ious: list[float] = field(default_factory=list)
    skipped: int = 0

    def summary(self) -> dict:
        def stats(values: list[float]) -> dict:
            if not values:
                return {"count": 0}
            arr = np.asarray(values)
            return {"count": int(arr.size), "mean_ms": float(arr.mean() * 1e3),
                    "median_ms": float(np.median(arr) * 1e3), "total_s": float(arr.sum())}

        finite = [v for v in self.ious if np.isfinite(v)]
        return {
            "mode": self.mode, "axis": self.axis, "slices": len(self.slices),
            "slices_without_prompt": self.skipped,
            "encode": stats(self.encode_seconds), "decode": stats(self.decode_seconds),
            "mean_predicted_iou": float(np.mean(finite)) if finite else None,
        }


def segment_volume(
    predictor: SlicePredictor,
    volume: np.ndarray,
    *,
    mode: str,
    axis: str = "k",
    window: IntensityWindow,
    slices: Iterable[int] | None = None,
    prompt: PromptRule | None = None,
    grid_size: int = 9,
    min_region_area: int = 64,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> tuple[np.ndarray, SegmentationReport]:
    """Segment ``volume`` (K x J x I) slice by slice. Returns (uint8 labelmap with 1
    inside, same shape; a timing/quality report). Slices outside ``slices`` stay 0."""
    dimension = axis_dimension(axis)
    if mode not in ("box", "grid", "prompt"):
        raise ValueError(f"mode must be box, grid or prompt, not {mode!r}")
    if mode == "prompt" and prompt is None:
        raise ValueError("prompted mode needs a prompt rule (reference mask, box or point)")
    if volume.ndim != 3 or min(volume.shape) < 1:
        raise ValueError(f"expected a non-empty 3D volume, got shape {volume.shape}")
    indices = list(range(volume.shape[dimension]) if slices is None else slices)
    labelmap = np.zeros(volume.shape, np.uint8)
    report = SegmentationReport(mode=mode, axis=axis, slices=indices)
    iterator = progress(indices) if progress else indices
    for index in iterator:
        image = slice_view(volume, axis, index)
        request = prompt.prompt_for(axis, index, image.shape) if mode == "prompt" else None
        if mode == "prompt" and request is None:
            report.skipped += 1
            continue
        t0 = time.perf_counter()
        predictor.set_image(apply_window(image, window))
        t1 = time.perf_counter()
        if mode == "prompt":
            masks, scores, _ = predictor.predict(**request, multimask_output=False)
            mask, iou = masks[0], float(scores[0])
        else:
            result = predictor.predict_auto(mode, grid_size=grid_size, min_region_area=min_region_area)
            mask, iou = result.mask, result.iou
        t2 = time.perf_counter()
        report.encode_seconds.append(t1 - t0)
        report.decode_seconds.append(t2 - t1)
        report.ious.append(iou)
        out = slice_view(labelmap, axis, index)  # a view: writing into it fills the labelmap
        out[mask] = 1
    return labelmap, report


def dice_score(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
