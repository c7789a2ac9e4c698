"""SAM-Mix's class activation map and the box prompts cut from it.

SAM-Mix (Ward and Imran, "Annotation-Efficient Task Guidance for Medical Segment
Anything", ISBI 2025) prompts SAM with boxes taken from its slice classifier's activation
map. For a classifier ending in global average pooling and one fully connected unit, the
map is ``g = sum_i w_i F_i`` over the last feature map's channels ``F_i`` weighted by the
head's weights ``w_i`` (CAM). The paper calls it GradCAM; for this head the two agree up
to a positive factor and a ReLU: GradCAM's channel weights are the spatial mean of
d(logit)/dF_i = w_i / (h * w), and the threshold below (a fraction of the maximum) does
not change under a positive factor nor, when max(g) > 0, under the ReLU.

Frames: the map and the boxes are in the slice's pixel frame (row y, column x); a box is
``(x0, y0, x1, y1)`` with edges on pixel boundaries, x1 and y1 exclusive, as the
service's ``/segment/prompt`` boxes (SAM's convention: the centre of pixel (r, c) is
(c + 0.5, r + 0.5)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

#: A map whose range (max - min) is at most this fraction of its largest magnitude is flat.
FLAT_RTOL = 1e-6


def class_activation_map(features: torch.Tensor, fc_weight: torch.Tensor, *,
                         size: tuple[int, int] | None = None) -> torch.Tensor:
    """``g = sum_i w_i F_i`` for every image of a batch.

    features: B x C x h x w, the classifier's last feature map (before pooling);
    fc_weight: C or 1 x C, the head's weights for the class (the bias is left out: it
      shifts the logit, not where the map is high; logit = mean(g) + bias);
    size: (H, W) to upsample to, the slice's size; None keeps h x w.
    Returns B x h x w, or B x H x W upsampled bilinearly with ``align_corners=False``:
    feature cell (j, i) is taken to cover the slice block of rows [j H/h, (j+1) H/h) and
    columns [i W/w, (i+1) W/w) -- right when the classifier saw the whole slice, resized
    or not, without padding. With that interpolation a cell blob of value 1 on 0
    thresholded at 0.5 gives back the pixels whose centres lie in its block (exactly the
    block when H / h and W / w are integers).
    """
    if features.dim() != 4:
        raise ValueError(f"features must be B x C x h x w, got {tuple(features.shape)}")
    weight = fc_weight.reshape(-1)
    if weight.numel() != features.shape[1]:
        raise ValueError(f"fc_weight has {weight.numel()} entries for {features.shape[1]} feature channels")
    g = torch.einsum("c,bchw->bhw", weight.to(features.dtype), features)
    if size is not None and tuple(size) != tuple(g.shape[-2:]):
        g = F.interpolate(g[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return g


@dataclass(frozen=True)
class CamBox:
    """One activated region of a map and its box.

    x0, y0, x1, y1: the region's bounding box in the slice's pixel frame (x column, y row,
      x1 and y1 exclusive: pixel boundaries), ready as a SAM box prompt;
    area: the region's pixel count (not the box's);
    peak: the largest map value inside the region.
    """

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak: float

    def xyxy(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)


def is_flat(g: np.ndarray) -> bool:
    """True when the map has no localisation: its range is within ``FLAT_RTOL`` of its
    largest magnitude (a constant map, including all zeros)."""
    lo, hi = float(g.min()), float(g.max())
    return hi - lo <= FLAT_RTOL * max(abs(lo), abs(hi))


def cam_boxes(cam: torch.Tensor | np.ndarray, omega: float = 0.5, *, largest_only: bool = False,
              min_area: int = 1) -> list[CamBox]:
    """Boxes of the connected regions where ``g >= omega * max(g)``.

    cam: H x W, one slice's map (``class_activation_map`` upsampled to the slice size);
    omega: the fraction of the map's maximum at which a pixel counts as activated,
      0 < omega <= 1 (the paper's 0.5 by default);
    largest_only: return only the region with the most pixels;
    min_area: drop regions with fewer pixels than this (1 keeps every region).

    Regions are 8-connected (pixels touching at a corner belong together). The result is
    ordered by area, largest first (ties: higher peak, then top-most, then left-most).
    No box -- an empty list -- when the map is not finite, when max(g) <= 0 (nothing
    speaks for the class anywhere) or when the map is flat (``is_flat``: the box would be
    the whole slice, which says nothing about where). Whether the slice holds the
    structure at all is the classifier's probability, the caller's decision.
    """
    g = cam.detach().float().cpu().numpy() if isinstance(cam, torch.Tensor) else np.asarray(cam, dtype=np.float64)
    if g.ndim != 2:
        raise ValueError(f"cam must be one H x W map, got shape {g.shape}")
    if not 0.0 < omega <= 1.0:
        raise ValueError(f"omega must be in (0, 1], got {omega}")
    if min_area < 1:
        raise ValueError(f"min_area must be at least 1, got {min_area}")
    if g.size == 0 or not np.isfinite(g).all():
        return []
    peak = float(g.max())
    if peak <= 0.0 or is_flat(g):
        return []
    labels, count = ndimage.label(g >= omega * peak, structure=np.ones((3, 3), dtype=bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    peaks = ndimage.maximum(g, labels=labels, index=np.arange(1, count + 1))
    boxes = []
    for index, found in enumerate(ndimage.find_objects(labels), start=1):
        if found is None or areas[index] < min_area:
            continue
        rows, cols = found
        boxes.append(CamBox(x0=int(cols.start), y0=int(rows.start), x1=int(cols.stop), y1=int(rows.stop),
                            area=int(areas[index]), peak=float(peaks[index - 1])))
    boxes.sort(key=lambda b: (-b.area, -b.peak, b.y0, b.x0))
    return boxes[:1] if largest_only else boxes
