"""SAM-Mix's training data: volumes with a presence label on every slice along one axis
plus segmentations of a few slices.

A ``SamMixCase`` is a ``Case`` whose ``mask`` holds only the segmented slices' labels,
with ``presence`` (bool per slice along ``axis``: does the slice hold the structure?) and
``segmented`` (the indices of the slices whose mask is a label). Presence labels come
from a whole-volume segmentation (``presence_from_mask``) or from a list of the slice
indices holding the structure (``sammix_case(..., present_slices=...)``). A slice labelled
absent is known to be empty; a segmented slice is known; a slice labelled present and not
segmented has an unknown mask.

Refused with ``CaseError`` (clear messages): no presence labels, labels of the wrong
length, a segmented index outside the volume or listed twice, and labels that contradict
the segmentation: a segmented slice with mask voxels labelled absent, a segmented slice
without any labelled present, mask voxels on a slice not listed as segmented. Over a set
of cases (``build_sammix_data``): no segmented slice, no segmented slice holding the
structure left for training, training slices of one presence class only, cases labelled
along another axis than the run's, augmentations (not supported for SAM-Mix).

What a run reads (``build_sammix_data``): the split is ``split_cases``'s (held-out slabs
for a single anatomy, as every family); training: every ``slice_step``-th labelled slice
of the training portions plus every segmented one, the segmented slices holding the
structure ``segmented_repeat`` times (SliceRef ``segmented`` True; the others False: the
classifier alone learns from them); validation: the slices of the validation portions
whose truth is known (segmented or labelled absent), empty slices included; the summary
counts the validation slices left out because their mask is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine.preprocess import IntensityWindow
from ..io import Volume
from ..wire import AXES, axis_dimension
from .cases import Case, CaseError, check_cases
from .samples import SliceRef, TrainingData
from .split import Portion, split_cases

__all__ = ["SamMixCase", "SamMixTrainingData", "sammix_case", "sammix_case_from_case", "presence_from_mask",
           "keep_slices", "build_sammix_data"]


def presence_from_mask(mask: np.ndarray, axis: str) -> np.ndarray:
    """Presence labels from a whole-volume segmentation: bool per slice along ``axis``."""
    dim = axis_dimension(axis)
    return np.asarray(mask).astype(bool).any(axis=tuple(d for d in range(3) if d != dim))


def keep_slices(mask: np.ndarray, axis: str, indices: Sequence[int]) -> np.ndarray:
    """A copy of ``mask`` (bool) with every slice along ``axis`` outside ``indices`` emptied."""
    dim = axis_dimension(axis)
    out = np.zeros(np.shape(mask), dtype=bool)
    where = [slice(None)] * 3
    where[dim] = list(indices)
    out[tuple(where)] = np.asarray(mask).astype(bool)[tuple(where)]
    return out


@dataclass(eq=False)
class SamMixCase(Case):
    """A ``Case`` with ``axis``, ``presence`` (bool, one per slice along ``axis``) and
    ``segmented`` (the slice indices whose ``mask`` is a label); checked on construction
    (see the module docstring)."""

    axis: str = "k"
    presence: np.ndarray | None = None
    segmented: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.axis not in AXES:
            raise CaseError(f"unknown axis {self.axis!r}; use one of {', '.join(AXES)}")
        dim = axis_dimension(self.axis)
        count = self.volume.shape[dim]
        if self.presence is None or np.size(self.presence) == 0:
            raise CaseError("no presence labels: give one per slice (presence_from_mask of a segmentation) or the "
                            "indices of the slices holding the structure (present_slices)")
        presence = np.asarray(self.presence)
        if presence.dtype != np.bool_ or presence.shape != (count,):
            raise CaseError(f"presence labels must be {count} booleans (one per slice along {self.axis}), got "
                            f"{presence.dtype} of shape {presence.shape}")
        self.presence = presence
        indices = [int(i) for i in self.segmented]
        if len(set(indices)) != len(indices):
            raise CaseError("a segmented slice is listed twice")
        outside = [i for i in indices if not 0 <= i < count]
        if outside:
            raise CaseError(f"segmented slice {outside[0]} is outside the volume's {count} slices along {self.axis}")
        self.segmented = tuple(sorted(indices))
        voxels = self.mask.sum(axis=tuple(d for d in range(3) if d != dim))
        listed = set(self.segmented)
        stray = [i for i in np.flatnonzero(voxels) if i not in listed]
        if stray:
            raise CaseError(f"slice {stray[0]} holds segmentation voxels but is not listed as segmented "
                            f"({len(stray)} such slices)")
        for i in self.segmented:
            if voxels[i] and not presence[i]:
                raise CaseError(f"slice {i} is segmented with {int(voxels[i])} voxels of {self.structure!r} but "
                                "labelled absent")
            if not voxels[i] and presence[i]:
                raise CaseError(f"slice {i} is labelled present but its segmentation is empty")

    def known(self, index: int) -> bool:
        """Whether the slice's mask is known: segmented, or labelled absent."""
        return index in set(self.segmented) or not bool(self.presence[index])


def sammix_case(volume: Volume, *, structure: str, segmentation: np.ndarray, segmented: Sequence[int],
                axis: str = "k", presence: np.ndarray | None = None, present_slices: Sequence[int] | None = None,
                window: IntensityWindow | None = None, group: str | None = None, modality: str = "auto",
                ) -> SamMixCase:
    """A checked SAM-Mix case. segmentation: the volume's grid, non-zero on the segmented
    slices only; segmented: their indices along ``axis``; presence labels either as
    ``presence`` (bool per slice) or ``present_slices`` (the indices holding the
    structure; every other slice is absent). ``window`` defaults as for every case."""
    if presence is not None and present_slices is not None:
        raise CaseError("give presence labels once: presence or present_slices, not both")
    if axis not in AXES:
        raise CaseError(f"unknown axis {axis!r}; use one of {', '.join(AXES)}")
    mask = np.asarray(segmentation)
    if mask.shape != volume.shape:
        raise CaseError(f"the segmentation's shape {mask.shape} does not match its volume's {volume.shape}")
    if present_slices is not None:
        count = volume.shape[axis_dimension(axis)]
        idx = [int(i) for i in present_slices]
        if any(not 0 <= i < count for i in idx):
            raise CaseError(f"a present slice index is outside the volume's {count} slices along {axis}")
        presence = np.zeros(count, dtype=bool)
        presence[idx] = True
    window = window or IntensityWindow.default_for(volume.array, modality)
    return SamMixCase(volume=volume, mask=mask != 0 if mask.dtype != np.bool_ else mask, structure=structure,
                      window=window, group=group, axis=axis, presence=presence, segmented=tuple(segmented))


def sammix_case_from_case(case: Case, *, axis: str, segmented: Sequence[int],
                          present_slices: Sequence[int] | None = None) -> SamMixCase:
    """A SAM-Mix case from a case: its label kept on the ``segmented`` slices only;
    presence labels from ``present_slices`` (the slices holding the structure, every other
    one absent) or, by default, derived from the label as a whole-volume segmentation
    (``presence_from_mask``). The same volume, window and group. ``CaseError`` for an
    index outside the volume or lists that contradict the label."""
    if axis not in AXES:
        raise CaseError(f"unknown axis {axis!r}; use one of {', '.join(AXES)}")
    segmented = [int(i) for i in segmented]
    count = case.volume.shape[axis_dimension(axis)]
    outside = [i for i in segmented if not 0 <= i < count]
    if outside:
        raise CaseError(f"segmented slice {outside[0]} is outside the volume's {count} slices along {axis}")
    presence = None if present_slices is not None else presence_from_mask(case.mask, axis)
    return sammix_case(case.volume, structure=case.structure, segmentation=keep_slices(case.mask, axis, segmented),
                       segmented=segmented, axis=axis, presence=presence, present_slices=present_slices,
                       window=case.window, group=case.group)


@dataclass
class SamMixTrainingData(TrainingData):
    """``TrainingData`` with SAM-Mix's counts: refs with ``segmented`` False are
    labelled-only slices; ``validation`` holds the known slices only."""

    segmented_repeat: int = 1
    validation_unknown: int = 0

    def summary(self) -> dict:
        out = super().summary()
        segmented = {(r.case, r.index) for r in self.train if r.segmented}
        labelled = {(r.case, r.index): r.positive for r in self.train}
        out.update({"family_data": "sammix", "train_labelled_present": sum(labelled.values()),
                    "train_labelled_absent": sum(not v for v in labelled.values()),
                    "train_segmented": len(segmented),
                    "train_segmented_with_structure": sum(labelled[k] for k in segmented),
                    "segmented_repeat": self.segmented_repeat,
                    "validation_slices_unknown": self.validation_unknown})
        return out


def build_sammix_data(cases: Sequence[Case], *, axis: str, validation_fraction: float, slabs: int,
                      gap: int | None, seed: int, slice_step: int = 1, segmented_repeat: int = 1,
                      augmentations: Sequence[str] = ()) -> SamMixTrainingData:
    """The run's data (module docstring); CaseError / ValueError with the reason."""
    if augmentations:
        raise CaseError("augmentations are not supported for SAM-Mix training (its cases carry presence labels and "
                        "segmented slices per volume): leave them out")
    if isinstance(slice_step, bool) or not isinstance(slice_step, int) or slice_step < 1:
        raise ValueError(f"slice_step must be a positive integer, got {slice_step!r}")
    if isinstance(segmented_repeat, bool) or not isinstance(segmented_repeat, int) or segmented_repeat < 1:
        raise ValueError(f"segmented_repeat must be a positive integer, got {segmented_repeat!r}")
    if not cases:
        raise CaseError("no training cases")
    wrong = [n for n, c in enumerate(cases) if not isinstance(c, SamMixCase)]
    if wrong:
        raise CaseError(f"case {wrong[0]} has no presence labels: SAM-Mix trains on SamMixCase cases (presence "
                        "labels per slice plus a few segmented slices; training/sammix_data.py)")
    other_axis = [c.axis for c in cases if c.axis != axis]
    if other_axis:
        raise CaseError(f"a case is labelled along axis {other_axis[0]!r}, the run slices along {axis!r}")
    if not any(c.segmented for c in cases):
        raise CaseError("no segmented slice: SAM-Mix needs segmentations of a few slices besides the presence labels")
    if not any(c.mask.any() for c in cases):
        raise CaseError("no segmented slice holds the structure: segment at least one slice where it is present")
    check_cases(cases)
    split = split_cases(cases, axis=axis, validation_fraction=validation_fraction, seed=seed, slabs=slabs, gap=gap)
    train: list[SliceRef] = []
    for portion in split.train:
        case: SamMixCase = cases[portion.case]
        segmented = set(case.segmented)
        chosen = sorted(set(portion.indices[::slice_step]) | (segmented & set(portion.indices)))
        for i in chosen:
            positive, seg = bool(case.presence[i]), i in segmented
            copies = segmented_repeat if seg and positive else 1
            train.extend(SliceRef(portion.case, axis, i, positive, segmented=seg) for _ in range(copies))
    if not any(r.segmented and r.positive for r in train):
        raise CaseError("no segmented slice holding the structure is left for training: the split gave them all to "
                        "validation (segment slices outside the validation slabs, or change the seed)")
    classes = {r.positive for r in train}
    if classes != {True, False}:
        which = "present" if True in classes else "absent"
        raise CaseError(f"every training slice is labelled {which}: the classifier needs slices of both kinds")
    validation, unknown = [], 0
    for portion in split.validation:
        case = cases[portion.case]
        known = tuple(i for i in portion.indices if case.known(i))
        unknown += len(portion.indices) - len(known)
        if known:
            validation.append(Portion(portion.case, known))
    if not validation:
        raise CaseError("no validation slice has a known mask (segmented or labelled absent): segment the slices "
                        "of the validation slabs, or label them")
    return SamMixTrainingData(list(cases), train, validation, split, (), 0.0, slice_step,
                              segmented_repeat=segmented_repeat, validation_unknown=unknown)

