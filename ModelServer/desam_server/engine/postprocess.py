"""Mask post-processing for DeSAM's automatic modes: grid prompts, box NMS, and removal
of small holes and islands."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from torchvision.ops import nms


def grid_points(grid_size: int, height: int, width: int) -> np.ndarray:
    """n x n prompt points at ((i + 0.5) / n * width, (j + 0.5) / n * height): an
    (n*n) x 2 array of x, y in the slice's pixel frame, row-major (y outer)."""
    if grid_size < 1:
        raise ValueError("grid_size must be >= 1")
    steps = (np.arange(grid_size) + 0.5) / grid_size
    ys, xs = np.meshgrid(steps * height, steps * width, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """B x H x W bool -> B x 4 XYXY boxes (inclusive pixel extents; zeros for empty)."""
    b, h, w = masks.shape
    if b == 0:
        return torch.zeros((0, 4), device=masks.device)
    rows = masks.any(dim=2)
    cols = masks.any(dim=1)
    ar_h = torch.arange(h, device=masks.device)[None].expand(b, -1)
    ar_w = torch.arange(w, device=masks.device)[None].expand(b, -1)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    y1 = torch.where(rows, ar_h, -1).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    x1 = torch.where(cols, ar_w, -1).amax(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    empty = ~rows.any(dim=1)
    boxes[empty] = 0
    return boxes


def nms_keep(masks: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of masks surviving box NMS, ordered by decreasing score."""
    if masks.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=masks.device)
    boxes = masks_to_boxes(masks)
    # Inclusive extents -> half-open so a one-pixel box has non-zero area.
    boxes[:, 2:] += 1
    return nms(boxes.float().cpu(), scores.float().cpu(), iou_threshold).to(masks.device)


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels = sitk.ConnectedComponent(image, True)  # 8-connectivity
    kept = sitk.RelabelComponent(labels, minimumObjectSize=int(min_area))
    return sitk.GetArrayFromImage(kept) > 0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected foreground component of an H x W mask (empty stays empty)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return sitk.GetArrayFromImage(labels) == 1


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill background regions (holes) and drop foreground islands smaller than
    ``min_area`` pixels. H x W bool -> H x W bool. ``min_area`` <= 0 changes nothing."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 0 or not mask.any():
        return mask
    filled = ~_drop_small_components(~mask, min_area)
    if not filled.any():  # the whole slice was one small background region
        filled = mask
    return _drop_small_components(filled, min_area)
