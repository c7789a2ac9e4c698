"""The grid-points procedure's selection (spec item 22), shared by every decoder that
scores prompts with a predicted IoU: DeSAM's (``SlicePredictor.predict_auto``) and SAM's
own mask decoder fine-tuned (``training.sam_decoder_family``).

The procedure: drop prompts whose predicted IoU is <= the threshold, threshold the masks
at logit 0, fill holes and drop islands smaller than ``min_region_area``, drop empty masks,
box NMS at 0.7 ranked by predicted IoU, keep the top-ranked survivor (empty if none).

``choose_lazily`` computes it without decoding every mask: NMS always keeps the
top-ranked box, so the result is the highest-IoU candidate whose cleaned mask is not
empty; it decodes candidates in decreasing IoU order until one survives.
``choose_literally`` runs the procedure as written on masks all decoded beforehand (the
reference, and the naive side of the evidence's comparison): NMS by
``torchvision.ops.nms`` on ``masks_to_boxes`` boxes. With exactly equal IoUs the two may
rank differently (the lazy order keeps grid order; torchvision's sort does not promise to).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import masks_to_boxes, nms

from .postprocess import remove_small_regions

__all__ = ["GridChoice", "choose_lazily", "choose_literally", "NMS_THRESHOLD"]

NMS_THRESHOLD = 0.7


@dataclass
class GridChoice:
    """index: the chosen prompt (None when nothing survived); mask: H x W bool (empty when
    nothing survived); iou: its predicted IoU (nan when empty); passed: prompts over the
    IoU threshold; decoded: masks decoded to choose."""

    index: int | None
    mask: np.ndarray
    iou: float
    passed: int
    decoded: int


def choose_lazily(ious: torch.Tensor, decode: Callable[[Sequence[int]], np.ndarray], *, iou_threshold: float,
                  min_region_area: int, shape: tuple[int, int], decode_chunk: int = 1) -> GridChoice:
    """ious: N predicted IoUs (one per prompt, grid order). decode(indices) -> B x H x W
    bool masks (logit > 0, the slice's frame) of those prompts; it is called with at most
    ``decode_chunk`` indices at a time, in decreasing IoU order (ties in grid order), and
    only for prompts over the threshold."""
    if decode_chunk < 1:
        raise ValueError("decode_chunk must be >= 1")
    keep = (ious > iou_threshold).nonzero()[:, 0].tolist()
    order = sorted(keep, key=lambda i: -float(ious[i]))
    decoded = 0
    for start in range(0, len(order), decode_chunk):
        batch = order[start : start + decode_chunk]
        masks = decode(batch)
        decoded += len(batch)
        for index, mask in zip(batch, masks, strict=True):
            cleaned = remove_small_regions(mask, min_region_area)
            if cleaned.any():
                return GridChoice(index, cleaned, float(ious[index]), len(order), decoded)
    return GridChoice(None, np.zeros(shape, bool), float("nan"), len(order), decoded)


def choose_literally(ious: torch.Tensor, masks: np.ndarray, *, iou_threshold: float, min_region_area: int,
                     nms_threshold: float = NMS_THRESHOLD) -> GridChoice:
    """The procedure as written on all N masks (N x H x W bool, logit > 0) and their IoUs."""
    ious = torch.as_tensor(ious).float().cpu()
    passed = (ious > iou_threshold).nonzero()[:, 0].tolist()
    kept, cleaned = [], []
    for i in passed:
        mask = remove_small_regions(masks[i], min_region_area)
        if mask.any():
            kept.append(i)
            cleaned.append(mask)
    if not kept:
        return GridChoice(None, np.zeros(masks.shape[1:], bool), float("nan"), len(passed), len(masks))
    boxes = masks_to_boxes(torch.from_numpy(np.stack(cleaned))).float()
    boxes[:, 2:] += 1  # inclusive pixel extents -> half-open, so a one-pixel box has an area
    best = int(nms(boxes, ious[kept], nms_threshold)[0])
    return GridChoice(kept[best], cleaned[best], float(ious[kept[best]]), len(passed), len(masks))
