"""Slices of K x J x I volumes along the index axes ``k``, ``j`` and ``i``.

The axis names and their array dimensions are ``wire.AXES`` / ``wire.axis_dimension``
(shared with the Slicer-side client); this is the one slice-extraction helper of the
service, used by the batch command line and the encoding scheduler alike.
"""

from __future__ import annotations

import numpy as np

from ..wire import AXES, axis_dimension

__all__ = ["AXES", "axis_dimension", "slice_view"]


def slice_view(array: np.ndarray, axis: str, index: int) -> np.ndarray:
    """Slice ``index`` along index axis ``axis`` of a K x J x I array (a view): J x I for
    'k', K x I for 'j', K x J for 'i'."""
    return array[(slice(None),) * axis_dimension(axis) + (index,)]

