"""SAM-Mix's first step on one slice, apart from SAM: does the slice hold the structure,
and where (the boxes of its class activation map).

The service runs this on its compute thread and then prompts SAM-Mix's adapted SAM with
the boxes through the scheduler's cached features (``engine.adapted_sam``); ``SamMix.
predict_slice`` does both in one call for training and evaluation. Same windowing, input
and map as there: the engine's ``to_rgb``, the classifier at the slice's own size,
``class_activation_map`` upsampled to the slice, ``cam_boxes``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..modeling.cam import cam_boxes
from ..modeling.slice_classifier import SliceClassifier
from .preprocess import IntensityWindow, to_rgb

__all__ = ["SlicePresence", "slice_presence"]

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class SlicePresence:
    """probability: the classifier's sigmoid; boxes: x0, y0, x1, y1 in slice pixels, the
    largest region's first; empty when the slice counts as absent (probability below the
    threshold, or no region in the map)."""

    probability: float
    boxes: tuple[Box, ...]

    @property
    def present(self) -> bool:
        return bool(self.boxes)


@torch.no_grad()
def slice_presence(classifier: SliceClassifier, slice_hw: np.ndarray, window: IntensityWindow | None, *,
                   threshold: float = 0.5, omega: float = 0.5, largest_only: bool = True) -> SlicePresence:
    """Classify one H x W slice (intensities with ``window``, or uint8 with None) and, when
    present, the boxes of its class activation map at ``omega`` x its maximum (the largest
    region's only with ``largest_only``). The classifier must be in eval mode (its batch
    norm would otherwise normalise by this slice and move its statistics)."""
    if classifier.training:
        raise RuntimeError("slice_presence needs the classifier in eval mode")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    image = np.asarray(slice_hw)
    if image.ndim != 2:
        raise ValueError(f"expected an H x W slice, got shape {image.shape}")
    gray = to_rgb(image, window)[:, :, 0]
    first = next(classifier.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    x = torch.as_tensor(np.ascontiguousarray(gray), device=device).float()[None, None] / 255.0
    out = classifier(x)
    probability = float(torch.sigmoid(out.logits[0]))
    if probability < threshold:
        return SlicePresence(probability, ())
    cam = classifier.class_activation_map(out.features, size=gray.shape)[0]
    regions = cam_boxes(cam, omega, largest_only=largest_only)
    return SlicePresence(probability, tuple(tuple(float(v) for v in r.xyxy()) for r in regions))
