"""A volume as a worker task needs it: the service's id if it already has the volume,
otherwise the prepared upload (a plain ``VolumeInput``: arrays, geometry, window)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VolumeRef:
    """``key``: what identifies this version of the scene's volume (node ID, voxel data
    modification time, IJK-to-RAS matrix); ``volume_id``: the service's id when known;
    ``volume_input``: the prepared upload when not (``SegmentationLogic.prepare_volume``)."""

    key: tuple
    volume_id: str | None
    volume_input: Any = None
