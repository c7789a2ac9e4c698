"""The slices a training run uses.

Training: every ``slice_step``-th training slice that holds the structure, plus slices
without it at ``empty_ratio`` (empty slices per slice with the structure, drawn once with
the seed from every ``slice_step``-th empty slice), in every variant. A step above 1 trades
near-duplicate neighbours for fewer encoder passes and shorter epochs. Validation and
evaluation: every slice of the validation portions (whole volumes, empty slices included;
spec item 24), original cases only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..wire import axis_dimension
from .cases import Case
from .split import Portion, Split
from .variants import Variant, apply_variant

__all__ = ["SliceRef", "TrainingData", "build_training_data"]


@dataclass(frozen=True)
class SliceRef:
    """Slice ``index`` along ``axis`` of ``TrainingData.cases[case]``; ``segmented`` False:
    a slice with a presence label only (SAM-Mix, ``sammix_data``), its mask unknown."""

    case: int
    axis: str
    index: int
    positive: bool
    segmented: bool = True


@dataclass
class TrainingData:
    cases: list[Case]                      # originals first, then training variants
    train: list[SliceRef]
    validation: list[Portion]              # into ``cases`` (originals)
    split: Split
    variants: tuple[Variant, ...]
    empty_ratio: float
    slice_step: int = 1

    @property
    def structure(self) -> str:
        return self.cases[0].structure

    def validation_refs(self) -> list[SliceRef]:
        dim = axis_dimension(self.split.axis)
        out = []
        for p in self.validation:
            present = self.cases[p.case].mask.any(axis=tuple(d for d in range(3) if d != dim))
            out.extend(SliceRef(p.case, self.split.axis, i, bool(present[i])) for i in p.indices)
        return out

    def summary(self) -> dict:
        """Counts only: no names, no paths."""
        val = self.validation_refs()
        return {
            "structure": self.structure,
            "cases": len({c.group for c in self.cases}),
            "volumes": len(self.split.train) + len(self.split.validation),
            "split": self.split.to_json(),
            "augmentations": [v.name for v in self.variants],
            "empty_ratio": self.empty_ratio,
            "slice_step": self.slice_step,
            "train_slices_with_structure": sum(r.positive for r in self.train),
            "train_slices_empty": sum(not r.positive for r in self.train),
            "validation_slices_with_structure": sum(r.positive for r in val),
            "validation_slices_empty": sum(not r.positive for r in val),
        }


def build_training_data(cases: Sequence[Case], split: Split, *, variants: Sequence[Variant] = (),
                        empty_ratio: float = 0.3, seed: int = 0, slice_step: int = 1) -> TrainingData:
    if isinstance(slice_step, bool) or not isinstance(slice_step, int) or slice_step < 1:
        raise ValueError(f"slice_step must be a positive integer, got {slice_step!r}")
    if empty_ratio < 0 or not math.isfinite(empty_ratio):
        raise ValueError(f"empty_ratio must be a non-negative number, got {empty_ratio}")
    axis, dim = split.axis, axis_dimension(split.axis)
    rng = np.random.default_rng(seed + 7919)
    for variant in variants:
        if variant.flip_dimension == dim:
            # Mirroring along the slicing axis would move training slices into validation slabs.
            raise ValueError(f"augmentation {variant.name!r} mirrors along the slicing axis {axis}: "
                             "choose another axis or leave it out")
    all_cases = list(cases)
    train: list[SliceRef] = []
    for portion in split.train:
        case = cases[portion.case]
        present = case.mask.any(axis=tuple(d for d in range(3) if d != dim))
        positives = [i for i in portion.indices if present[i]][::slice_step]
        empties = [i for i in portion.indices if not present[i]][::slice_step]
        n_empty = min(len(empties), math.ceil(empty_ratio * len(positives)))
        chosen = sorted(rng.choice(empties, size=n_empty, replace=False).tolist()) if n_empty else []
        indices = sorted(positives + chosen)
        numbers = [portion.case]
        for variant in variants:
            all_cases.append(apply_variant(case, variant))
            numbers.append(len(all_cases) - 1)
        for number in numbers:
            train.extend(SliceRef(number, axis, i, bool(present[i])) for i in indices)
    if not any(r.positive for r in train):
        raise ValueError("no training slice holds the structure: the split left every such slice to validation")
    return TrainingData(all_cases, train, list(split.validation), split, tuple(variants), empty_ratio, slice_step)

