"""Voxel grids in patient space: ``Geometry`` (LPS, as in DICOM, ITK and Slicer files) and
``Volume`` (a K x J x I array on a geometry). See ``volume.py`` for the conventions."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry", "Volume", "LPS_TO_RAS"]

#: Multiply an LPS point (or a 4x4 LPS matrix, from the left) by this to get RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class Geometry:
    """Voxel grid placement in LPS millimetres (see the module docstring)."""

    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in np.asarray(self.spacing, dtype=np.float64).reshape(-1))
        origin = tuple(float(o) for o in np.asarray(self.origin, dtype=np.float64).reshape(-1))
        direction = np.array(self.direction, dtype=np.float64, copy=True)
        if len(spacing) != 3 or len(origin) != 3 or direction.shape not in ((3, 3), (9,)):
            raise ValueError("a Geometry needs 3 spacings, 3 origin coordinates and a 3x3 direction matrix")
        direction = direction.reshape(3, 3)
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(f"spacing must be finite and positive, got {spacing}")
        if not all(math.isfinite(o) for o in origin) or not np.all(np.isfinite(direction)):
            raise ValueError("origin and direction must be finite")
        if abs(np.linalg.det(direction)) < 1e-6:
            raise ValueError("the direction matrix is singular")
        direction.setflags(write=False)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # construction -------------------------------------------------------------------
    @classmethod
    def identity(cls, spacing: Iterable[float] = (1.0, 1.0, 1.0),
                 origin: Iterable[float] = (0.0, 0.0, 0.0)) -> Geometry:
        return cls(spacing=tuple(spacing), origin=tuple(origin), direction=np.eye(3))

    @classmethod
    def from_ijk_to_lps(cls, matrix: np.ndarray) -> Geometry:
        """Split a 4x4 (or 3x4) IJK -> LPS matrix into spacing, direction and origin."""
        m = np.asarray(matrix, dtype=np.float64)
        linear = m[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        if np.any(spacing <= 0):
            raise ValueError("the IJK -> LPS matrix has a zero column")
        return cls(spacing=tuple(spacing), origin=tuple(m[:3, 3]), direction=linear / spacing)

    @classmethod
    def from_ijk_to_ras(cls, matrix: np.ndarray) -> Geometry:
        return cls.from_ijk_to_lps(LPS_TO_RAS @ _as_4x4(matrix))

    # matrices ---------------------------------------------------------------------------
    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix taking homogeneous (i, j, k, 1) to (L, P, S, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction * np.asarray(self.spacing)
        m[:3, 3] = self.origin
        return m

    def lps_to_ijk(self) -> np.ndarray:
        return np.linalg.inv(self.ijk_to_lps())

    def ijk_to_ras(self) -> np.ndarray:
        return LPS_TO_RAS @ self.ijk_to_lps()

    # comparison -------------------------------------------------------------------------
    def is_close(self, other: Geometry, tol: float = 1e-6) -> bool:
        """True when every spacing, origin and direction element agrees within ``tol``
        (absolute for values up to 1, relative above: ``|a - b| <= tol * max(1, |b|)``)."""
        if not isinstance(other, Geometry):
            return False
        for a, b in ((self.spacing, other.spacing), (self.origin, other.origin),
                     (self.direction, other.direction)):
            a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
            if np.any(np.abs(a - b) > tol * np.maximum(1.0, np.abs(b))):
                return False
        return True

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (self.spacing == other.spacing and self.origin == other.origin
                and bool(np.array_equal(self.direction, other.direction)))

    def __hash__(self) -> int:
        return hash((self.spacing, self.origin, self.direction.tobytes()))

    def __repr__(self) -> str:
        rows = ", ".join("(" + ", ".join(f"{v:.6g}" for v in row) + ")" for row in self.direction)
        return (f"Geometry(spacing={tuple(round(s, 9) for s in self.spacing)}, "
                f"origin={tuple(round(o, 9) for o in self.origin)}, direction=({rows}))")

    def to_dict(self) -> dict:
        """JSON-friendly form: spacing, origin, direction (row-major, LPS)."""
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": self.direction.tolist(), "space": "LPS"}


def _as_4x4(matrix: np.ndarray) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape == (4, 4):
        return m
    if m.shape == (3, 4):
        return np.vstack([m, [0.0, 0.0, 0.0, 1.0]])
    raise ValueError(f"expected a 4x4 or 3x4 matrix, got shape {m.shape}")


@dataclass(eq=False)
class Volume:
    """A scalar 3D image: ``array`` indexed [k, j, i] and its LPS ``geometry``."""

    array: np.ndarray
    geometry: Geometry

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"a Volume array must be 3-D (K x J x I), got shape {self.array.shape}")
        if not isinstance(self.geometry, Geometry):
            raise TypeError("geometry must be a Geometry")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]
