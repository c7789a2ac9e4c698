"""The encoding scheduler's queue: priorities, reasons, lazy-deletion heap.

An ``EncodeRequest`` is one slice to encode, named by its ``FeatureKey``. It is wanted
for one or more *reasons*: prompt waiters (a thread blocked in ``features()``), a place
in the current view's neighbourhood (rank 0 is the viewed slice itself, rank r > 0 the
r-th neighbour in outward order v+1, v-1, v+2, v-2, ...), and a background precompute.
Its priority is that of its strongest reason; a request without reasons is cancelled.

The heap holds ``(priority, rank, seq, request)`` entries. A request that changes
priority gets a fresh entry and its old one goes stale (``request.entry`` no longer points
at it); stale and finished entries are dropped when they reach the top. ``seq`` grows
with every push, so equal (priority, rank) pop first-in, first-out. Not thread-safe: the
scheduler calls every method under its own lock.

Also here: the registration record of a volume (``RegisteredVolume``), argument checks,
and which requests may share an encoder pass (cache keys: ``encoder_set``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum, IntEnum

import numpy as np

from ..io.slices import axis_dimension
from .feature_config import FeatureKey
from .preprocess import IntensityWindow

__all__ = ["Priority", "RequestState", "EncodeRequest", "RequestQueue", "RegisteredVolume", "outward", "where",
           "same_pass"]


class Priority(IntEnum):
    """Lower value runs first."""

    PROMPT = 0      # a click needs this slice now
    VIEW = 1        # the slice the user is looking at
    NEIGHBOUR = 2   # slices around the view, nearest first
    BACKGROUND = 3  # precompute of a whole volume


class RequestState(Enum):
    QUEUED = "queued"     # in the heap, waiting for the encoder
    RUNNING = "running"   # in the encoder pass now
    DONE = "done"         # settled, cancelled or dropped; no longer in the queue


@dataclass(eq=False)
class RegisteredVolume:
    """A volume registered with the scheduler: K x J x I voxels (by reference), window,
    encoder weights."""

    volume_id: str
    array: np.ndarray
    window: IntensityWindow
    weights_sha256: str | None
    view: tuple[int, int] | None = None                 # (axis number, index)
    view_requests: set = field(default_factory=set)     # queued requests holding a view rank
    background_axes: set = field(default_factory=set)

    @classmethod
    def create(cls, volume_id: str, array, window: IntensityWindow, weights_sha256: str | None,
               ) -> RegisteredVolume:
        if not isinstance(volume_id, str) or not volume_id:
            raise ValueError("volume_id must be a non-empty string")
        array = np.asarray(array)
        if array.ndim != 3 or min(array.shape) < 1:
            raise ValueError(f"expected a non-empty K x J x I array, got shape {array.shape}")
        if not isinstance(window, IntensityWindow):
            raise TypeError("window must be an IntensityWindow")
        return cls(volume_id, array, window, weights_sha256)

    @property
    def tag(self) -> str:
        """What logs may show of the id."""
        return self.volume_id[:12]


def where(volume: RegisteredVolume, axis: str, index) -> tuple[int, int]:
    """Checked (array dimension of ``axis``, index); axis 'k', 'j' or 'i'."""
    a = axis_dimension(axis)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"slice index must be an integer, got {type(index).__name__}")
    count = volume.array.shape[a]
    if not 0 <= index < count:
        raise IndexError(f"slice {index} is outside 0..{count - 1} along axis {axis}")
    return a, int(index)


@dataclass(eq=False)
class EncodeRequest:
    """One slice to encode and why (see the module docstring); ``future`` gets its
    ``ImageFeatures``."""

    key: FeatureKey
    volume: RegisteredVolume       # the registration the request was created under
    dimension: int                 # array dimension of the slicing axis (0, 1, 2 for k, j, i)
    future: Future = field(default_factory=Future)
    state: RequestState = RequestState.QUEUED
    waiters: int = 0               # threads blocked in features() on this request
    view_rank: int | None = None   # 0: the viewed slice; r > 0: r-th neighbour
    background: bool = False
    entry: list | None = None      # the request's live heap entry
    encoder: str | None = None     # the encoder's name in the scheduler's EncoderSet (None: the base)

    @property
    def index(self) -> int:
        return self.key.slice_index

    def priority(self) -> tuple[Priority, int] | None:
        """(priority, rank within it) from the strongest reason, None when unwanted."""
        if self.waiters > 0:
            return Priority.PROMPT, 0
        if self.view_rank is not None:
            return (Priority.VIEW, 0) if self.view_rank == 0 else (Priority.NEIGHBOUR, self.view_rank)
        if self.background:
            return Priority.BACKGROUND, 0
        return None


def outward(view: int, neighbours: int, count: int) -> Iterator[tuple[int, int]]:
    """(rank, index) of the view and its neighbours, nearest first, alternating outward
    (v, v+1, v-1, v+2, v-2, ...), skipping indices outside 0..count-1. Ranks are
    consecutive, so a clipped side does not leave a gap."""
    yield 0, view
    rank = 0
    for d in range(1, neighbours + 1):
        for index in (view + d, view - d):
            if 0 <= index < count:
                rank += 1
                yield rank, index


class RequestQueue:
    """Requests by key (queued and running ones) and the priority heap of queued ones."""

    def __init__(self) -> None:
        self.requests: dict[FeatureKey, EncodeRequest] = {}
        self._heap: list[list] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(1 for request in self.requests.values() if request.state is RequestState.QUEUED)

    def get(self, key: FeatureKey) -> EncodeRequest | None:
        return self.requests.get(key)

    def add(self, request: EncodeRequest) -> None:
        """Register a new request (with at least one reason set) and queue it."""
        self.requests[request.key] = request
        self._push(request)

    def reschedule(self, request: EncodeRequest) -> bool:
        """Re-rank a queued request after its reasons changed. Returns False when it has no
        reason left: it is then removed (the caller completes its future)."""
        if request.state is not RequestState.QUEUED:
            return True
        prio = request.priority()
        if prio is None:
            request.state = RequestState.DONE
            request.entry = None
            self.requests.pop(request.key, None)
            return False
        if request.entry is None or tuple(request.entry[:2]) != prio:
            self._push(request)
        return True

    def _push(self, request: EncodeRequest) -> None:
        prio, rank = request.priority()
        request.entry = [prio, rank, next(self._seq), request]
        heapq.heappush(self._heap, request.entry)

    def _prune(self) -> None:
        heap = self._heap
        while heap and (heap[0][3].entry is not heap[0] or heap[0][3].state is not RequestState.QUEUED):
            heapq.heappop(heap)

    def has_work(self) -> bool:
        self._prune()
        return bool(self._heap)

    def pop_batch(self, limit: int, compatible: Callable[[EncodeRequest, EncodeRequest], bool]) -> list[EncodeRequest]:
        """The best queued request plus up to ``limit - 1`` more, in priority order, for
        which ``compatible(first, other)`` holds. Returned requests are marked running."""
        self._prune()
        if not self._heap:
            return []
        first = heapq.heappop(self._heap)[3]
        batch, skipped = [first], []
        while len(batch) < limit and self._heap:
            entry = heapq.heappop(self._heap)
            request = entry[3]
            if request.entry is not entry or request.state is not RequestState.QUEUED:
                continue
            if compatible(first, request):
                batch.append(request)
            else:
                skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        for request in batch:
            request.state = RequestState.RUNNING
            request.entry = None
        return batch

    def finish(self, request: EncodeRequest) -> None:
        request.state = RequestState.DONE
        self.requests.pop(request.key, None)

    def queued(self) -> list[EncodeRequest]:
        return [request for request in self.requests.values() if request.state is RequestState.QUEUED]

    def drain(self) -> list[EncodeRequest]:
        """Remove every queued request (running ones stay); returns the removed ones."""
        removed = self.queued()
        for request in removed:
            request.state = RequestState.DONE
            request.entry = None
            del self.requests[request.key]
        self._heap.clear()
        return removed


def same_pass(first: EncodeRequest, other: EncodeRequest) -> bool:
    """Whether ``other`` may join ``first``'s encoder pass: same volume, axis and encoder,
    and a PROMPT request takes only PROMPT requests along (a click never waits for
    background work)."""
    if other.volume is not first.volume or other.dimension != first.dimension or other.encoder != first.encoder:
        return False
    return first.priority()[0] != Priority.PROMPT or other.priority()[0] == Priority.PROMPT
