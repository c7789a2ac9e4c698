"""The plain values that cross between the main thread and the worker thread.

Frozen dataclasses of numbers, strings, tuples and read-only numpy arrays: no MRML node,
no Qt object, so a worker may read them while the main thread goes on (see the threading
rule in ``SegmentationLogic``). Standard library and numpy only. One file for all of them
because each is a few lines of fields: ``VolumeInput``, ``AutoOptions``, ``AutoOutcome``,
``PromptInput``, ``PromptOutcome``, ``PropagationOptions``, ``PropagationInput`` and the
logic's ``UndoStep``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .VolumeGeometry import VolumeGeometry

__all__ = ["VolumeInput", "AutoOptions", "AutoOutcome", "PromptInput", "PromptOutcome", "PropagationOptions",
           "PropagationInput", "UndoStep"]

Window = tuple[float, float]          # (center, width), as the service takes it


def _frozen(array, dtype=None) -> np.ndarray | None:
    if array is None:
        return None
    out = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class VolumeInput:
    """A volume as the service gets it: ``array`` K x J x I (a read-only copy),
    ``geometry`` (world and local), ``window`` from the display node (None: the
    service's default), ``key`` (the node's id, its image's modification time and its
    matrix: the same key means the same content) and the node's ``name`` for messages."""

    array: np.ndarray
    geometry: VolumeGeometry
    window: Window | None
    key: tuple
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "array", _frozen(self.array))


@dataclass(frozen=True)
class AutoOptions:
    """An automatic run (``POST /segment/auto``): slices [start, stop) along ``axis``
    (None: all), ``mode`` 'box' (whole box), 'grid' (grid points), 'roi' (``box``, x0 y0
    x1 y1 in the slice frame, on every slice: from a markups ROI, ``prepare_roi``) or
    'cam-box' (a SAM-Mix model finds the slices and their boxes; ``presence_threshold``,
    None: the model's own),
    ``decoder`` the model's name (None: the only DeSAM decoder served; 'roi': SAM's), and
    the service's thresholds."""

    axis: str = "k"
    start: int | None = None
    stop: int | None = None
    mode: str = "box"
    decoder: str | None = None
    grid_size: int = 9
    iou_threshold: float = 0.5
    min_region_area: int = 64
    box: tuple[float, float, float, float] | None = None
    presence_threshold: float | None = None


@dataclass(frozen=True, eq=False)
class AutoOutcome:
    """A finished job's result: ``slab`` N x H x W bool (read-only) from slice ``offset``
    along ``axis``; ``slices``: (index, predicted IoU, area in pixels) of each slice the job
    reports (IoU None for a propagation's seed, whose mask the user gave); ``kind`` 'auto'
    or 'propagate'; ``reached``: the first and last slice a propagation reached (None for
    'auto'); ``presence``: (index, probability) per slice of a 'cam-box' run (empty
    otherwise) and ``presence_threshold`` its threshold."""

    job_id: str
    kind: str
    axis: str
    offset: int
    slab: np.ndarray
    slices: tuple[tuple[int, float | None, int], ...] = ()
    reached: tuple[int, int] | None = None
    presence: tuple[tuple[int, float], ...] = ()
    presence_threshold: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "slab", _frozen(self.slab, bool))

    @property
    def ious(self) -> dict[int, float | None]:
        """Predicted IoU by slice index."""
        return {index: iou for index, iou, _ in self.slices}


@dataclass(frozen=True, eq=False)
class PromptInput:
    """One prompt on slice ``index`` along ``axis``, in the service's slice frame:
    ``points`` P x 2 (x, y) with ``labels`` (1 foreground, 0 background), ``box`` (x0, y0,
    x1, y1), ``mask`` the segment's current H x W mask on that slice to refine (None when
    empty), ``logits_id`` the service's logits of that mask when it is still the answer
    this logic wrote there (SAM's own refinement input; ``mask`` is the fallback),
    ``shape`` (H, W), ``window`` and ``decoder``."""

    axis: str
    index: int
    shape: tuple[int, int]
    points: np.ndarray | None = None
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    window: Window | None = None
    decoder: str = "sam"
    logits_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", _frozen(self.points, np.float64))
        object.__setattr__(self, "mask", _frozen(self.mask, bool))


@dataclass(frozen=True, eq=False)
class PromptOutcome:
    """The service's chosen mask (its ``best``) for one slice: ``mask`` H x W bool, its
    predicted ``iou`` and ``area``, ``logits_id`` (to refine it further), the service's
    ``timing`` and the measured ``round_trip_s`` of the request."""

    axis: str
    index: int
    mask: np.ndarray
    iou: float
    area: int
    logits_id: str | None = None
    decoder: str = "sam"
    timing: dict = field(default_factory=dict)
    round_trip_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", _frozen(self.mask, bool))


@dataclass(frozen=True)
class PropagationOptions:
    """Propagation from a seed slice (``POST /segment/propagate``): stop where the
    predicted IoU falls below ``iou_threshold``, the area below ``min_area`` pixels, the
    area relative to the neighbour's below ``min_area_ratio`` or above ``max_area_ratio``
    (None: the service's defaults), or at [start, stop) (None: the volume's ends)."""

    decoder: str = "sam"
    start: int | None = None
    stop: int | None = None
    iou_threshold: float = 0.5
    min_area: int | None = None
    min_area_ratio: float | None = None
    max_area_ratio: float | None = None


@dataclass(frozen=True, eq=False)
class PropagationInput:
    """The seed: slice ``index`` along ``axis`` with the segment's ``mask`` there (H x W)."""

    axis: str
    index: int
    mask: np.ndarray
    options: PropagationOptions = PropagationOptions()
    window: Window | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mask", _frozen(self.mask, bool))


@dataclass(frozen=True, eq=False)
class UndoStep:
    """What one AI action replaced: slices ``offset`` .. ``offset + N - 1`` along ``axis``
    of segment ``segment_id`` (segmentation node ``segmentation_id``) on the grid of volume
    node ``volume_id``, and their content before (``previous``, N x H x W bool)."""

    action: str
    segmentation_id: str
    segment_id: str
    volume_id: str
    axis: str
    offset: int
    previous: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "previous", _frozen(self.previous, bool))
