"""One training case read from the scene: a volume's voxels, its own geometry in the wire
format's LPS convention, and one segment's label on the volume's grid.

Made on the main thread by ``TrainingLogic.prepare_case``; plain data (numpy arrays,
numbers, strings), so the worker thread can upload it while the user goes on editing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from . import wire
from .DeSAMError import DeSAMError

__all__ = ["TrainingCase"]



@dataclass(frozen=True, eq=False)
class TrainingCase:
    """``array``: the volume's voxels, K x J x I; ``label``: bool K x J x I, the structure's
    voxels (not empty); ``structure``: the name the label is stored under on the service;
    ``spacing``, ``origin``, ``direction``: the volume's own geometry (without parent
    transforms) in LPS, as ``ServerClient.upload_volume`` takes it; ``name``: for display
    ("volume / segment")."""

    name: str
    structure: str
    array: np.ndarray = field(repr=False)
    label: np.ndarray = field(repr=False)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise DeSAMError(f"Training case {self.name}: the volume must be a scalar 3D volume; its voxel array "
                             f"has shape {self.array.shape}.")
        label = np.asarray(self.label).astype(bool, copy=False)
        if label.shape != self.array.shape:
            raise DeSAMError(f"Training case {self.name}: the label's shape {label.shape} differs from the volume's "
                             f"{self.array.shape} (K x J x I).")
        if not label.any():
            raise DeSAMError(f"Training case {self.name}: the segment is empty on the volume's grid. Paint the "
                             "structure in it (or choose another segment) before training.")
        object.__setattr__(self, "label", label)

    @property
    def geometry(self) -> dict:
        return {"spacing": self.spacing, "origin": self.origin, "direction": self.direction}

    @functools.cached_property
    def volume_id(self) -> str:
        """The service's id of the volume (the hash of voxels and geometry)."""
        return wire.volume_id(self.array, **self.geometry)

    @property
    def voxels(self) -> int:
        return int(self.label.sum())

    def slice_lists(self) -> dict[str, list[int]]:
        """SAM-Mix's labels of this case along k (the axis the module trains along): the
        painted slices are the segmented ones (their label trains SAM), and every slice from
        the first painted one to the last holds the structure (a structure is one run of
        slices along an axis; the slices between painted ones need no painting, only
        presence); the slices outside that run are labelled absent."""
        painted = np.flatnonzero(self.label.any(axis=(1, 2)))
        return {"segmented_slices": painted.tolist(),
                "present_slices": list(range(int(painted[0]), int(painted[-1]) + 1))}
