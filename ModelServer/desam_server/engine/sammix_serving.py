"""SAM-Mix's serving form: a model the engine's ``SlicePredictor`` serves for box prompts
unchanged, plus the slice classifier that gives those boxes.

``load_servable(base_model, path)`` reads a SAM-Mix file (``sammix_file``), builds the
SamMix on the base DeSAM's encoder and **merges the LoRA adapters into the encoder's
weights** (``merge_lora``: W + (alpha / r) B A, no adapter left), so that serving costs
what the base encoder costs. The result, ``SamMixServable``, is a ``DeSAM`` whose

- ``image_encoder`` is the merged encoder (returning the embedding only:
  ``adapted_sam.EmbeddingOnlyEncoder``), ``mask_decoder`` the trained one and
  ``prompt_encoder`` SAM's (frozen in training, a copy);
- ``encoder_name`` is ``<base>+sammix`` and ``encoder_weights_sha256`` the sha256 of the
  base weights' hash and the adapters (``adapted_encoder_sha256``): its features differ
  from the base encoder's, so a feature cache keyed by these never mixes the two, and
  two files with other adapters get other keys;
- PRIM and PDMM are the base model's, unused: the servable has no DeSAM decoder trained
  on its features (``has_trained_decoder`` False), so DeSAM's automatic modes refuse it;
- ``classifier`` (eval mode) with ``locate(slice, window)``: presence probability and
  CAM boxes, the file's threshold, omega and largest-region option by default.

A slice's SAM-Mix answer is then ``locate`` followed by ``SlicePredictor.predict(box=...,
multimask_output=False)`` on the servable, equal to ``SamMix.predict_slice`` up to float
rounding (the merge; tested).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..modeling.desam import DeSAM
from .adapted_sam import EmbeddingOnlyEncoder
from .preprocess import IntensityWindow
from .sammix import Location, SamMix, locate
from .sammix_file import build_from_file

__all__ = ["SamMixServable", "load_servable", "adapted_encoder_sha256", "SERVABLE_SUFFIX"]

SERVABLE_SUFFIX = "+sammix"


def adapted_encoder_sha256(base_sha256: str | None, meta: dict[str, Any]) -> str:
    """The adapted encoder's identity: sha256 of the base weights' hash ('random' for
    none), the adapters' layout (rank, alpha, targets) and their tensors' hash."""
    payload = json.dumps({"base": base_sha256 or "random", "lora": meta["lora"], "lora_sha256": meta["lora_sha256"]},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class SamMixServable(DeSAM):
    """Built by ``load_servable`` (module docstring). Extra attributes: ``classifier``,
    ``structure``, ``inference`` (threshold, omega, largest_only), ``sammix_metadata``
    (the file's metadata), ``base_encoder_name``."""

    def __init__(self, base: DeSAM, merged: SamMix, meta: dict[str, Any]) -> None:
        if not merged.is_merged:
            raise ValueError("the servable takes a merged SamMix (SamMix.merged())")
        # Embedding only: nothing reads the taps of SAM-Mix's features (SAM's prompted decoder
        # is all it serves), so its cache entries hold one tensor, not four.
        encoder = EmbeddingOnlyEncoder(merged.image_encoder, passes_steps=True)
        super().__init__(encoder_name=base.encoder_name + SERVABLE_SUFFIX, image_encoder=encoder,
                         prompt_encoder=merged.prompt_encoder, mask_decoder=merged.mask_decoder, prim=base.prim,
                         pdmm=base.pdmm, convention=base.convention, tap_indices=base.tap_indices)
        self.classifier = merged.classifier
        self.base_encoder_name = base.encoder_name
        self.encoder_weights_sha256 = adapted_encoder_sha256(base.encoder_weights_sha256, meta)
        self.structure = meta["structure"]
        self.inference = dict(meta["inference"])
        self.sammix_metadata = meta

    def locate(self, slice_hw: np.ndarray, window: IntensityWindow | None, *, threshold: float | None = None,
               omega: float | None = None, largest_only: bool | None = None) -> Location:
        """Presence probability and CAM boxes of one slice (``sammix.locate``); options
        default to the file's."""
        o = self.inference
        return locate(self.classifier, slice_hw, window, device=self.device,
                      threshold=o["threshold"] if threshold is None else threshold,
                      omega=o["omega"] if omega is None else omega,
                      largest_only=o["largest_only"] if largest_only is None else largest_only)


def load_servable(base_model: DeSAM, path: str | os.PathLike) -> SamMixServable:
    """The serving form of the SAM-Mix file at ``path`` on ``base_model`` (the service's
    DeSAM, which is not changed: the encoder, prompt encoder and mask decoder are copies;
    PRIM and PDMM are shared and unused). ``CheckpointError`` for a file that is not a
    SAM-Mix file or was trained on another encoder. Its own parts are in eval mode and
    frozen; the base model's modes and flags are left as they are."""
    sammix, meta = build_from_file(base_model, Path(path))
    servable = SamMixServable(base_model, sammix.merged(), meta)  # merged(): frozen, eval mode
    # Not ``servable.eval()``: that would reach the base model's shared PRIM and PDMM.
    servable.training = False
    return servable
