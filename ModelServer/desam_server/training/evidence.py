"""Measurements behind the training evidence (issue #11, evidence items 2, 3 and 5), on
trained models and cached features; ``scripts/evidence_training.py`` prints and writes
them. No timing here is asserted anywhere: these are reports.

- ``grid_size_dice``: validation Dice (``trainer.validation_dice``: whole validation
  volumes, empty slices included) of a family's grid mode at several grid sizes.
- ``naive_grid``: DeSAM's grid procedure done naively: every prompt through the whole
  decoder (PRIM and all of PDMM, the modules as written, as ``desam-server bench``'s naive
  side), then the procedure as written (``grid_mode.choose_literally``: IoU filter,
  threshold, small regions, box NMS, top survivor).
- ``compare_grid_modes``: ``SlicePredictor.predict_auto(mode='grid')`` (lazy: PRIM scores
  every prompt, PDMM decodes candidates until one survives) against ``naive_grid``, side by
  side on the same slices (the order alternates per slice): times, speed-up and the
  slices whose final masks differ.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..engine.grid_mode import NMS_THRESHOLD, GridChoice, choose_literally
from ..engine.postprocess import grid_points
from ..engine.predictor import SlicePredictor
from ..engine.preprocess import to_input_frame
from ..modeling.decoder_state import SliceDecoderState
from ..modeling.desam import DeSAM, ImageFeatures
from .family import ModelFamily
from .features import FeatureReader
from .samples import TrainingData
from .trainer import validation_dice

__all__ = ["grid_size_dice", "naive_grid", "compare_grid_modes", "GridComparison", "SliceComparison"]


def grid_size_dice(model, family: ModelFamily, data: TrainingData, reader: FeatureReader, sizes: Sequence[int], *,
                   iou_threshold: float = 0.5, min_region_area: int = 64) -> dict[int, dict]:
    """Per grid size: {'dice': mean over validation volumes, 'per_volume': [...]}."""
    out = {}
    for size in sizes:
        options = {"grid_size": int(size), "iou_threshold": iou_threshold, "min_region_area": min_region_area}
        dice, per_volume = validation_dice(model, family, data, reader, "grid", options)
        out[int(size)] = {"dice": dice, "per_volume": per_volume}
    return out


@torch.no_grad()
def naive_grid(model: DeSAM, features: ImageFeatures, *, grid_size: int = 9, iou_threshold: float = 0.5,
               min_region_area: int = 64, nms_threshold: float = NMS_THRESHOLD) -> GridChoice:
    """grid_size**2 full decoder passes (one prompt each), then the procedure as written."""
    h, w = features.original_size
    pts = to_input_frame(grid_points(grid_size, h, w), features.original_size, model.img_size)
    ious, masks = [], []
    for x, y in pts:
        points = (torch.tensor([[[x, y]]], dtype=torch.float, device=model.device),
                  torch.ones(1, 1, dtype=torch.int, device=model.device))
        iou, logits = model.desam_forward(features.embedding, features.taps, points=points)
        ious.append(iou)
        masks.append((model.postprocess_logits(logits, features.input_size, features.original_size)[0, 0] > 0)
                     .cpu().numpy())
    return choose_literally(torch.cat(ious), np.stack(masks), iou_threshold=iou_threshold,
                            min_region_area=min_region_area, nms_threshold=nms_threshold)


@dataclass
class SliceComparison:
    slice_id: str
    lazy_seconds: float
    naive_seconds: float
    differing_pixels: int
    lazy_decoded: int
    passed: int
    lazy_empty: bool
    naive_empty: bool

    def to_json(self) -> dict:
        return {"slice": self.slice_id, "lazy_seconds": round(self.lazy_seconds, 4),
                "naive_seconds": round(self.naive_seconds, 4), "differing_pixels": self.differing_pixels,
                "lazy_decoded": self.lazy_decoded, "passed": self.passed, "lazy_empty": self.lazy_empty,
                "naive_empty": self.naive_empty}


@dataclass
class GridComparison:
    grid_size: int
    slices: list[SliceComparison] = field(default_factory=list)

    def summary(self) -> dict:
        lazy = [s.lazy_seconds for s in self.slices]
        naive = [s.naive_seconds for s in self.slices]
        differing = [s for s in self.slices if s.differing_pixels]
        return {"grid_size": self.grid_size, "slices": len(self.slices),
                "lazy_mean_seconds": float(np.mean(lazy)) if lazy else None,
                "naive_mean_seconds": float(np.mean(naive)) if naive else None,
                "speedup": float(np.mean(naive) / np.mean(lazy)) if lazy and np.mean(lazy) > 0 else None,
                "slices_differing": len(differing),
                "differing_pixels": [s.differing_pixels for s in differing],
                "per_slice": [s.to_json() for s in self.slices]}


def compare_grid_modes(model: DeSAM, slices: Iterable[tuple[str, ImageFeatures]], *, grid_size: int = 9,
                       iou_threshold: float = 0.5, min_region_area: int = 64) -> GridComparison:
    """Lazy grid mode against ``naive_grid`` on each (id, features) slice, alternating which
    runs first. The lazy side starts from an empty slice decoder state (its per-slice work,
    PDMM's image part included, is part of its time). ``model``: a trained DeSAM decoder
    (fp32 decoders, as the service runs them)."""
    predictor = SlicePredictor(model, precision="fp32")
    result = GridComparison(grid_size)
    for n, (slice_id, features) in enumerate(slices):

        def lazy(features=features):
            features.decoder_state = SliceDecoderState()
            predictor.set_features(features)
            t0 = time.perf_counter()
            out = predictor.predict_auto("grid", grid_size=grid_size, iou_threshold=iou_threshold,
                                         min_region_area=min_region_area, allow_untrained=True)
            return out, time.perf_counter() - t0

        def naive(features=features):
            t0 = time.perf_counter()
            out = naive_grid(model, features, grid_size=grid_size, iou_threshold=iou_threshold,
                             min_region_area=min_region_area)
            return out, time.perf_counter() - t0

        if n % 2 == 0:
            (got, t_lazy), (want, t_naive) = lazy(), naive()
        else:
            (want, t_naive), (got, t_lazy) = naive(), lazy()
        result.slices.append(SliceComparison(
            slice_id, t_lazy, t_naive, int(np.logical_xor(got.mask, want.mask).sum()), got.decoded, got.passed,
            not got.mask.any(), not want.mask.any()))
    predictor.reset_image()
    return result
