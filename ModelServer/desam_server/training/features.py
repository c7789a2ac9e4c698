"""Encoder features of the slices a training run uses, from a ``FeatureCache``.

Keys are the service's (``FeatureKey``: the volume's ``wire.volume_id``, axis, slice,
window, preprocessing version, encoder and its weights hash), so a slice is encoded once
per (volume, window, encoder) whatever reads it. ``precompute`` encodes what is missing
(progress per slice, cancellable between slices); ``load`` never encodes: the encoder
does not run inside the training loop, and a missing entry is an error that says to
precompute.

Precompute writes through a ``FeatureCache`` opened on the training features' directory
(its disk tier locks the directory: one writer; the serving process keeps a directory of
its own). The training loop reads with ``FeatureReader``: entry files are complete once
they exist (written atomically) and nothing is added or evicted while a run reads them,
so every process of a torchrun job reads the same directory without the lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..engine.feature_cache import FeatureCache, FeatureKey
from ..engine.feature_disk import CorruptEntryError, entry_name, read_entry
from ..engine.predictor import SlicePredictor
from ..engine.preprocess import PREPROCESSING_VERSION
from ..io.slices import slice_view
from ..modeling.desam import DeSAM, ImageFeatures
from .cases import Case

__all__ = ["TrainingFeatures", "FeatureReader", "MissingFeaturesError", "PrecomputeReport", "PrecomputeCancelled",
           "feature_key"]


class MissingFeaturesError(RuntimeError):
    """A slice's features are not in the cache (precompute first)."""


class PrecomputeCancelled(Exception):
    """``precompute`` stopped because ``should_stop`` said so."""


@dataclass
class PrecomputeReport:
    slices: int = 0
    encoded: int = 0
    already_cached: int = 0
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"slices": self.slices, "encoded": self.encoded, "already_cached": self.already_cached,
                "seconds": round(self.seconds, 3),
                "seconds_per_encoded_slice": round(self.seconds / self.encoded, 4) if self.encoded else None}


def feature_key(model: DeSAM, case: Case, axis: str, index: int) -> FeatureKey:
    """The service's key of one slice of ``case`` for ``model``'s encoder."""
    return FeatureKey(volume_id=case.volume_id, axis=axis, slice_index=int(index),
                      window_center=case.window.center, window_width=case.window.width,
                      preprocessing_version=PREPROCESSING_VERSION, encoder=model.encoder_name,
                      encoder_weights_sha256=model.encoder_weights_sha256)


class TrainingFeatures:
    """Precompute. model: the DeSAM whose encoder makes the features; cache: an open
    FeatureCache with a disk tier; precision: the encoder pass's ('auto', 'fp32', 'bf16',
    'fp16')."""

    def __init__(self, model: DeSAM, cache: FeatureCache, *, precision: str = "auto") -> None:
        self.model = model
        self.cache = cache
        self.precision = precision
        self._predictor: SlicePredictor | None = None

    def key(self, case: Case, axis: str, index: int) -> FeatureKey:
        return feature_key(self.model, case, axis, index)

    def precompute(self, items: Iterable[tuple[Case, str, int]], *,
                   progress: Callable[[int, int], None] | None = None,
                   should_stop: Callable[[], bool] | None = None) -> PrecomputeReport:
        """Encode every (case, axis, index) not cached yet. ``progress(done, total)`` after
        each slice; ``should_stop()`` is asked between slices (raises PrecomputeCancelled)."""
        items = list(dict.fromkeys((c, a, int(i)) for c, a, i in items))
        report = PrecomputeReport(slices=len(items))
        start = time.perf_counter()
        for n, (case, axis, index) in enumerate(items):
            if should_stop is not None and should_stop():
                raise PrecomputeCancelled(f"precompute cancelled after {n} of {len(items)} slices")
            key = self.key(case, axis, index)
            if self.cache.contains(key):
                report.already_cached += 1
            else:
                self.cache.put(key, self._encode(case, axis, index))
                report.encoded += 1
            if progress is not None:
                progress(n + 1, len(items))
        report.seconds = time.perf_counter() - start
        return report

    def _encode(self, case: Case, axis: str, index: int) -> ImageFeatures:
        if self._predictor is None:
            self._predictor = SlicePredictor(self.model, precision=self.precision)
        self._predictor.set_image(slice_view(case.volume.array, axis, index), case.window)
        features = self._predictor.features
        self._predictor.reset_image()
        return features



class FeatureReader:
    """Read-only access to precomputed entries in ``directory`` (see the module note).
    storage_dtype: the cache's ('float16' by default)."""

    def __init__(self, model: DeSAM, directory: Path, *, storage_dtype: str = "float16") -> None:
        self.model = model
        self.directory = Path(directory)
        self.storage_dtype = storage_dtype

    def load(self, case: Case, axis: str, index: int, device: str | torch.device | None = None) -> ImageFeatures:
        key = feature_key(self.model, case, axis, index)
        digest = key.digest()
        try:
            packed = read_entry(self.directory / entry_name(digest), digest, self.storage_dtype)
        except FileNotFoundError:
            raise MissingFeaturesError(f"no cached features for slice {index} along {axis} of case {case.case_id}: "
                                       "run precompute first") from None
        except CorruptEntryError as exc:
            raise MissingFeaturesError(f"the cached features of slice {index} along {axis} of case {case.case_id} "
                                       f"are damaged ({exc}): run precompute again") from None
        return packed.unpack(device)
