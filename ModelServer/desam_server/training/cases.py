"""Training cases: a volume and the label mask of one structure on the volume's grid.

A case is refused with ``CaseError`` when its mask does not have the volume's shape and
geometry or is empty, or when a segmentation file does not hold the named segment; a case
set is refused when the structure is absent from every case. Cases are named by an opaque
``case_id`` (the first 12 hex digits of the volume's ``wire.volume_id``), never by a path,
so that no patient name reaches a log, a report or a decoder file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..engine.preprocess import IntensityWindow
from ..io import Geometry, Volume, read_segmentation, read_volume
from ..wire import volume_id as wire_volume_id

__all__ = ["Case", "CaseError", "case_from_arrays", "load_case", "check_cases", "GEOMETRY_TOLERANCE"]

#: Tolerance (mm, and direction cosines) when comparing a mask's geometry with its volume's.
GEOMETRY_TOLERANCE = 1e-4


class CaseError(ValueError):
    """A training case (or set of cases) that cannot be used, with the reason."""


def volume_id_of(volume: Volume) -> str:
    g = volume.geometry
    return wire_volume_id(np.ascontiguousarray(volume.array), spacing=g.spacing, origin=g.origin,
                          direction=g.direction)


@dataclass(eq=False)
class Case:
    """volume: the image; mask: bool K x J x I on the volume's grid; structure: its name;
    window: the intensity window its slices are encoded with; group: cases of one group
    are one subject for the split (e.g. augmented or synthetic variants of one
    anatomy) and default to their own ``case_id``."""

    volume: Volume
    mask: np.ndarray
    structure: str
    window: IntensityWindow
    group: str | None = None
    volume_id: str = field(init=False)

    def __post_init__(self) -> None:
        self.mask = np.asarray(self.mask)
        if self.mask.dtype != np.bool_:
            raise CaseError(f"a case mask must be boolean, got {self.mask.dtype}")
        if self.mask.shape != self.volume.shape:
            raise CaseError(f"the mask's shape {self.mask.shape} does not match the volume's {self.volume.shape}")
        if not self.structure or not self.structure.strip():
            raise CaseError("a case needs a structure name")
        self.volume_id = volume_id_of(self.volume)
        if self.group is None:
            self.group = self.case_id

    @property
    def case_id(self) -> str:
        return self.volume_id[:12]

    def slices_with_structure(self, axis_dimension: int) -> np.ndarray:
        """Indices along an array dimension whose slice holds at least one mask voxel."""
        other = tuple(d for d in range(3) if d != axis_dimension)
        return np.flatnonzero(self.mask.any(axis=other))


def case_from_arrays(volume: Volume, mask: np.ndarray, mask_geometry: Geometry | None, *, structure: str,
                     window: IntensityWindow | None = None, group: str | None = None,
                     modality: str = "auto", what: str = "mask") -> Case:
    """A checked case: the mask must have the volume's shape and (given) geometry and at
    least one voxel. ``window`` defaults to ``IntensityWindow.default_for(volume)``."""
    mask = np.asarray(mask)
    if mask.shape != volume.shape:
        raise CaseError(f"the {what}'s shape {mask.shape} does not match its volume's {volume.shape}")
    if mask_geometry is not None and not mask_geometry.is_close(volume.geometry, GEOMETRY_TOLERANCE):
        raise CaseError(f"the {what}'s geometry does not match its volume's: {mask_geometry!r} vs "
                        f"{volume.geometry!r} (resample the label onto the volume's grid)")
    mask = mask != 0 if mask.dtype != np.bool_ else mask
    if not mask.any():
        raise CaseError(f"the {what} of {structure!r} is empty")
    window = window or IntensityWindow.default_for(volume.array, modality)
    return Case(volume=volume, mask=mask, structure=structure, window=window, group=group)


def load_case(volume_path: str | os.PathLike, mask_path: str | os.PathLike, *, structure: str,
              segment: str | None = None, window: IntensityWindow | None = None,
              modality: str = "auto") -> Case:
    """A case from files: a volume (NRRD, NIfTI, MHA, DICOM file or folder) and its label:
    a Slicer ``.seg.nrrd`` (the segment named ``segment``, default the structure's name;
    a file with one segment needs no name) or a labelmap image (every non-zero voxel)."""
    volume = read_volume(volume_path)
    labelmap, geometry, segments = read_segmentation(mask_path)
    if str(mask_path).endswith(".seg.nrrd"):
        wanted = segment or structure
        found = [s for s in segments if s.name == wanted]
        if not found and segment is None and len(segments) == 1:
            found = segments
        if not found:
            names = ", ".join(repr(s.name) for s in segments) or "none"
            raise CaseError(f"the segmentation has no segment named {wanted!r} (segments: {names})")
        mask = np.asarray(labelmap) == found[0].label_value
    else:
        if segment is not None:
            raise CaseError("a segment name applies to .seg.nrrd labels only")
        mask = np.asarray(labelmap) != 0
    return case_from_arrays(volume, mask, geometry, structure=structure, window=window, modality=modality,
                            what="label")


def check_cases(cases: Sequence[Case]) -> str:
    """The structure shared by ``cases``; CaseError for no cases, several structures,
    a structure absent from every case, or the same volume twice."""
    if not cases:
        raise CaseError("no training cases")
    structures = sorted({c.structure for c in cases})
    if len(structures) != 1:
        raise CaseError(f"the cases name several structures ({', '.join(structures)}): train one at a time")
    if not any(c.mask.any() for c in cases):
        raise CaseError(f"the structure {structures[0]!r} is absent from every case")
    seen: dict[str, int] = {}
    for n, c in enumerate(cases):
        if c.volume_id in seen:
            raise CaseError(f"cases {seen[c.volume_id]} and {n} are the same volume ({c.case_id})")
        seen[c.volume_id] = n
    return structures[0]

