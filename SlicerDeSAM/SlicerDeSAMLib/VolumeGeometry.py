"""Where a volume's voxels are in Slicer's world, and how world points map into the
service's slice pixel frame.

Standard library and numpy only (no slicer, vtk or qt), so it is tested without Slicer.

Frames:
- IJK: continuous voxel indices (i, j, k), voxel centres at integers; arrays are indexed
  [k, j, i] (K x J x I), as ``slicer.util.arrayFromVolume`` returns them.
- local RAS: the volume node's own frame (``GetIJKToRASMatrix``).
- world RAS: after the node's parent transforms (linear only: a non-linear parent must be
  hardened or removed first).
- the service's slice frame (docs/API.md): along axis 'k' a slice is J x I (x = i,
  y = j), along 'j' K x I (x = i, y = k), along 'i' K x J (x = j, y = k); x is the
  column, y the row, and the centre of pixel (r, c) is (c + 0.5, r + 0.5) (SAM's
  convention). The same names as ``wire.AXES``.
- the wire format's LPS geometry (docs/WIRE_FORMAT.md): the volume's local geometry with
  RAS turned into LPS (x and y negated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .wire import AXES, axis_dimension

__all__ = ["VolumeGeometry"]

#: For each axis, the IJK components that give the slice's (x, y) pixel coordinates.
_IN_PLANE = {"k": (0, 1), "j": (0, 2), "i": (1, 2)}
#: For each axis, its IJK component (i = 0, j = 1, k = 2).
_NORMAL = {"k": 2, "j": 1, "i": 0}
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _matrix(value, name: str) -> np.ndarray:
    m = np.array(value, dtype=np.float64)
    if m.shape != (4, 4) or not np.all(np.isfinite(m)):
        raise ValueError(f"{name} must be a finite 4 x 4 matrix, got shape {m.shape}")
    if not np.allclose(m[3], (0.0, 0.0, 0.0, 1.0)):
        raise ValueError(f"{name} must be affine (last row 0 0 0 1), got {m[3].tolist()}")
    if abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise ValueError(f"{name} is singular")
    return m


@dataclass(frozen=True, eq=False)
class VolumeGeometry:
    """``shape``: (K, J, I); ``ijk_to_world``: 4 x 4, (parent transform to world) @ (the
    volume's IJKToRAS); ``local_ijk_to_ras``: the volume's own IJKToRAS (what the service
    gets, in LPS, through ``lps_geometry``). Build it with ``from_matrices``."""

    shape: tuple[int, int, int]
    ijk_to_world_matrix: np.ndarray
    local_ijk_to_ras: np.ndarray
    _world_to_ijk: np.ndarray = field(repr=False)

    @classmethod
    def from_matrices(cls, shape, ijk_to_ras, parent_to_world=None) -> VolumeGeometry:
        """``shape``: (K, J, I); ``ijk_to_ras``: the node's IJKToRAS (4 x 4, oblique and
        anisotropic allowed); ``parent_to_world``: its parent transform's matrix to world
        (4 x 4, linear), None without a parent."""
        dims = tuple(int(n) for n in shape)
        if len(dims) != 3 or any(n < 1 for n in dims):
            raise ValueError(f"shape must be (K, J, I) with positive sizes, got {tuple(shape)}")
        local = _matrix(ijk_to_ras, "ijk_to_ras")
        parent = np.eye(4) if parent_to_world is None else _matrix(parent_to_world, "parent_to_world")
        world = parent @ local
        local.setflags(write=False)
        world.setflags(write=False)
        inverse = np.linalg.inv(world)
        inverse.setflags(write=False)
        return cls(dims, world, local, inverse)

    # ---- points --------------------------------------------------------------------------------
    def world_to_ijk(self, ras) -> np.ndarray:
        """World RAS point(s) (..., 3) -> continuous (i, j, k) (..., 3); voxel centres at integers."""
        p = np.asarray(ras, dtype=np.float64)
        if p.shape[-1:] != (3,):
            raise ValueError(f"points must be (..., 3) RAS coordinates, got shape {p.shape}")
        return p @ self._world_to_ijk[:3, :3].T + self._world_to_ijk[:3, 3]

    def ijk_to_world(self, ijk) -> np.ndarray:
        """Continuous (i, j, k) point(s) (..., 3) -> world RAS (..., 3)."""
        p = np.asarray(ijk, dtype=np.float64)
        if p.shape[-1:] != (3,):
            raise ValueError(f"points must be (..., 3) IJK coordinates, got shape {p.shape}")
        return p @ self.ijk_to_world_matrix[:3, :3].T + self.ijk_to_world_matrix[:3, 3]

    def slice_shape(self, axis: str) -> tuple[int, int]:
        """(H, W) of a slice along ``axis``."""
        k, j, i = self.shape
        return {"k": (j, i), "j": (k, i), "i": (k, j)}[AXES[axis_dimension(axis)]]

    def axis_length(self, axis: str) -> int:
        """How many slices there are along ``axis``."""
        return self.shape[axis_dimension(axis)]

    def slice_index(self, ras, axis: str) -> int:
        """The index (rounded) of the slice along ``axis`` that holds the world point ``ras``;
        ValueError when the point is outside the volume along that axis."""
        axis_dimension(axis)
        coordinate = float(self.world_to_ijk(ras)[_NORMAL[axis]])
        index = int(np.floor(coordinate + 0.5))
        count = self.axis_length(axis)
        if not 0 <= index < count:
            raise ValueError(f"the point is outside the volume along axis {axis}: slice {coordinate:.2f} is not in "
                             f"0 .. {count - 1}")
        return index

    def slice_point(self, ras, axis: str, index: int | None = None) -> tuple[float, float]:
        """(x, y) of the world point ``ras`` in the pixel frame of slice ``index`` along
        ``axis`` (the point projected along the axis; ``index`` only checked). ValueError
        when it falls outside the slice (0 <= x <= W, 0 <= y <= H)."""
        axis_dimension(axis)
        ijk = self.world_to_ijk(ras)
        if index is not None and not 0 <= int(index) < self.axis_length(axis):
            raise ValueError(f"slice {index} is outside 0 .. {self.axis_length(axis) - 1} along axis {axis}")
        cx, cy = _IN_PLANE[axis]
        x, y = float(ijk[cx]) + 0.5, float(ijk[cy]) + 0.5
        h, w = self.slice_shape(axis)
        if not (0.0 <= x <= w and 0.0 <= y <= h):
            raise ValueError(f"the point is outside the slice along axis {axis}: ({x:.1f}, {y:.1f}) is not within "
                             f"{w} x {h} pixels")
        return x, y

    def slice_box(self, ras_a, ras_b, axis: str, index: int | None = None) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in the slice frame of the box with opposite corners ``ras_a``
        and ``ras_b`` (world), both projected along ``axis``; clipped to the slice.
        ValueError when the box has no area inside the slice."""
        axis_dimension(axis)
        if index is not None and not 0 <= int(index) < self.axis_length(axis):
            raise ValueError(f"slice {index} is outside 0 .. {self.axis_length(axis) - 1} along axis {axis}")
        cx, cy = _IN_PLANE[axis]
        corners = self.world_to_ijk(np.array([ras_a, ras_b], dtype=np.float64))
        h, w = self.slice_shape(axis)
        xs = np.clip(corners[:, cx] + 0.5, 0.0, w)
        ys = np.clip(corners[:, cy] + 0.5, 0.0, h)
        x0, x1, y0, y1 = float(xs.min()), float(xs.max()), float(ys.min()), float(ys.max())
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"the box has no area inside slice along axis {axis} (x {x0:.1f} .. {x1:.1f}, "
                             f"y {y0:.1f} .. {y1:.1f} within {w} x {h} pixels)")
        return x0, y0, x1, y1

    def region_box(self, corners_world, axis: str) -> tuple[tuple[float, float, float, float], int, int]:
        """A 3-D region (its corner points in world RAS, e.g. a markups ROI's 8 corners) as
        the service's 'roi' mode takes it along ``axis``: ((x0, y0, x1, y1) in the slice
        frame, the corners projected along the axis and clipped to the slice; start, stop:
        the slices whose centres lie inside the region's extent along the axis). ValueError
        when the region misses the volume."""
        axis_dimension(axis)
        corners = np.asarray(corners_world, dtype=np.float64).reshape(-1, 3)
        if not np.isfinite(corners).all():
            raise ValueError("the region's corners must be finite")
        ijk = self.world_to_ijk(corners)
        cx, cy = _IN_PLANE[axis]
        h, w = self.slice_shape(axis)
        xs = np.clip(ijk[:, cx] + 0.5, 0.0, w)
        ys = np.clip(ijk[:, cy] + 0.5, 0.0, h)
        normal = ijk[:, _NORMAL[axis]]
        # A slice centre on the region's face counts as inside (1e-4 voxel: a ROI snapped to
        # voxel centres comes back through float32 matrices a hair off).
        start = max(0, int(np.ceil(normal.min() - 1e-4)))
        stop = min(self.axis_length(axis), int(np.floor(normal.max() + 1e-4)) + 1)
        box = (float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max()))
        if box[2] <= box[0] or box[3] <= box[1] or stop <= start:
            raise ValueError(f"the region misses the volume along axis {axis}: put the ROI over the structure")
        return box, start, stop

    def slice_pixel_to_world(self, x: float, y: float, axis: str, index: int) -> np.ndarray:
        """World RAS of the slice-frame point (x, y) on slice ``index`` along ``axis``
        (the inverse of ``slice_point``)."""
        ijk = np.zeros(3)
        cx, cy = _IN_PLANE[axis]
        ijk[cx], ijk[cy], ijk[_NORMAL[axis]] = x - 0.5, y - 0.5, index
        return self.ijk_to_world(ijk)

    def slice_center(self, axis: str, index: int) -> np.ndarray:
        """World RAS of the centre of slice ``index`` along ``axis`` (where to jump the
        slice views to show it, e.g. from the review list)."""
        if not 0 <= int(index) < self.axis_length(axis):
            raise ValueError(f"slice {index} is outside 0 .. {self.axis_length(axis) - 1} along axis {axis}")
        h, w = self.slice_shape(axis)
        return self.slice_pixel_to_world(w / 2, h / 2, axis, int(index))

    # ---- axes -----------------------------------------------------------------------------------
    def axis_for_normal(self, normal_world) -> str:
        """The index axis ('k', 'j' or 'i') most parallel to a slice view's normal (world
        RAS; its sign does not matter)."""
        n = np.asarray(normal_world, dtype=np.float64).reshape(3)
        norm = np.linalg.norm(n)
        if not np.isfinite(norm) or norm == 0:
            raise ValueError(f"the normal must be a finite non-zero vector, got {n.tolist()}")
        columns = self.ijk_to_world_matrix[:3, :3]
        cosines = np.abs(n @ columns) / (np.linalg.norm(columns, axis=0) * norm)
        return ("i", "j", "k")[int(np.argmax(cosines))]

    # ---- the service's upload geometry ------------------------------------------------------------
    def lps_geometry(self) -> dict:
        """``{"spacing", "origin", "direction"}`` of the volume's own (local) geometry in the
        wire format's LPS convention, for ``ServerClient.upload_volume``: spacing along
        (i, j, k), origin = LPS of voxel (0, 0, 0), direction = 3 x 3 whose column c is the
        LPS unit vector of index axis c."""
        a = self.local_ijk_to_ras[:3, :3]
        spacing = np.linalg.norm(a, axis=0)
        direction = _RAS_TO_LPS @ (a / spacing)
        origin = _RAS_TO_LPS @ self.local_ijk_to_ras[:3, 3]
        return {"spacing": tuple(float(s) for s in spacing), "origin": tuple(float(o) for o in origin),
                "direction": direction}
