"""The encoding scheduler's job queue: priorities, reasons, lazy-deletion heap.

A ``Job`` is one slice to encode, named by its ``FeatureKey``. It is wanted for one or
more *reasons*: prompt waiters (a thread blocked in ``features()``), a place in the
current view's neighbourhood (rank 0 is the viewed slice itself, rank r > 0 the r-th
neighbour in outward order v+1, v-1, v+2, v-2, ...), and a background precompute. Its
priority is that of its strongest reason; a job without reasons is cancelled.

The heap holds ``(priority, rank, seq, job)`` entries. A job that changes priority gets
a fresh entry and its old one goes stale (``job.entry`` no longer points at it); stale
and finished entries are dropped when they reach the top. ``seq`` grows with every push,
so equal (priority, rank) pop first-in, first-out. Not thread-safe: the scheduler calls
every method under its own lock.

Also here: the registration record of a volume, argument checks, cache keys and the
encoder pass over a batch of jobs.
"""

from __future__ import annotations

import heapq
import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterator

import numpy as np
import torch

from ..modeling.desam import DeSAM, ImageFeatures
from ..segment import slice_view
from .feature_config import FeatureKey
from .preprocess import PREPROCESSING_VERSION, IntensityWindow, prepare_input, to_rgb
from .runtime import Precision

__all__ = ["Priority", "Job", "JobQueue", "Volume", "outward", "where", "feature_key", "encode_slices",
           "same_pass", "AXIS_NAMES"]

AXIS_NAMES = ("k", "j", "i")


class Priority(IntEnum):
    """Lower value runs first."""

    PROMPT = 0      # a click needs this slice now
    VIEW = 1        # the slice the user is looking at
    NEIGHBOUR = 2   # slices around the view, nearest first
    BACKGROUND = 3  # precompute of a whole volume


QUEUED, RUNNING, DONE = "queued", "running", "done"


@dataclass(eq=False)
class Volume:
    """A registered volume: K x J x I voxels (by reference), window, encoder weights."""

    volume_id: str
    array: np.ndarray
    window: IntensityWindow
    weights_sha256: str | None
    view: tuple[int, int] | None = None                 # (axis number, index)
    view_jobs: set = field(default_factory=set)         # queued jobs holding a view rank
    background_axes: set = field(default_factory=set)

    @classmethod
    def create(cls, volume_id: str, array, window: IntensityWindow, weights_sha256: str | None) -> "Volume":
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


def where(volume: Volume, axis, index) -> tuple[int, int]:
    """Checked (axis number, index); axis 'k', 'j', 'i' or 0, 1, 2."""
    if isinstance(axis, str) and axis in AXIS_NAMES:
        a = AXIS_NAMES.index(axis)
    elif isinstance(axis, (int, np.integer)) and not isinstance(axis, bool) and 0 <= axis < 3:
        a = int(axis)
    else:
        raise ValueError(f"axis must be one of 'k', 'j', 'i' or 0, 1, 2, got {axis!r}")
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"slice index must be an integer, got {type(index).__name__}")
    count = volume.array.shape[a]
    if not 0 <= index < count:
        raise IndexError(f"slice {index} is outside 0..{count - 1} along axis {AXIS_NAMES[a]}")
    return a, int(index)


def feature_key(model: DeSAM, volume: Volume, axis_number: int, index: int) -> FeatureKey:
    return FeatureKey(
        volume_id=volume.volume_id, axis=AXIS_NAMES[axis_number], slice_index=index,
        window_center=volume.window.center, window_width=volume.window.width,
        preprocessing_version=PREPROCESSING_VERSION, encoder=model.encoder_name,
        encoder_weights_sha256=volume.weights_sha256)


@dataclass(eq=False)
class Job:
    key: FeatureKey
    volume: object  # the scheduler's registration record the job was created under
    axis_number: int
    future: Future = field(default_factory=Future)
    state: str = QUEUED
    waiters: int = 0               # threads blocked in features() on this job
    view_rank: int | None = None   # 0: the viewed slice; r > 0: r-th neighbour
    background: bool = False
    entry: list | None = None      # the job's live heap entry

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


class JobQueue:
    """Jobs by key (queued and running ones) and the priority heap of queued ones."""

    def __init__(self) -> None:
        self.jobs: dict[FeatureKey, Job] = {}
        self._heap: list[list] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return sum(1 for job in self.jobs.values() if job.state == QUEUED)

    def get(self, key: FeatureKey) -> Job | None:
        return self.jobs.get(key)

    def add(self, job: Job) -> None:
        """Register a new job (with at least one reason set) and queue it."""
        self.jobs[job.key] = job
        self._push(job)

    def reschedule(self, job: Job) -> bool:
        """Re-rank a queued job after its reasons changed. Returns False when it has no
        reason left: it is then removed (the caller completes its future)."""
        if job.state != QUEUED:
            return True
        prio = job.priority()
        if prio is None:
            job.state = DONE
            job.entry = None
            self.jobs.pop(job.key, None)
            return False
        if job.entry is None or tuple(job.entry[:2]) != prio:
            self._push(job)
        return True

    def _push(self, job: Job) -> None:
        prio, rank = job.priority()
        job.entry = [prio, rank, next(self._seq), job]
        heapq.heappush(self._heap, job.entry)

    def _prune(self) -> None:
        heap = self._heap
        while heap and (heap[0][3].entry is not heap[0] or heap[0][3].state != QUEUED):
            heapq.heappop(heap)

    def has_work(self) -> bool:
        self._prune()
        return bool(self._heap)

    def pop_batch(self, limit: int, compatible: Callable[[Job, Job], bool]) -> list[Job]:
        """The best queued job plus up to ``limit - 1`` more, in priority order, for
        which ``compatible(first, other)`` holds. Returned jobs are marked running."""
        self._prune()
        if not self._heap:
            return []
        first = heapq.heappop(self._heap)[3]
        batch, skipped = [first], []
        while len(batch) < limit and self._heap:
            entry = heapq.heappop(self._heap)
            job = entry[3]
            if job.entry is not entry or job.state != QUEUED:
                continue
            if compatible(first, job):
                batch.append(job)
            else:
                skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        for job in batch:
            job.state = RUNNING
            job.entry = None
        return batch

    def finish(self, job: Job) -> None:
        job.state = DONE
        self.jobs.pop(job.key, None)

    def queued(self) -> list[Job]:
        return [job for job in self.jobs.values() if job.state == QUEUED]

    def drain(self) -> list[Job]:
        """Remove every queued job (running ones stay); returns the removed ones."""
        removed = self.queued()
        for job in removed:
            job.state = DONE
            job.entry = None
            del self.jobs[job.key]
        self._heap.clear()
        return removed


def same_pass(first: Job, other: Job) -> bool:
    """Whether ``other`` may join ``first``'s encoder pass: same volume and axis, and a
    PROMPT job takes only PROMPT jobs along (a click never waits for background work)."""
    if other.volume is not first.volume or other.axis_number != first.axis_number:
        return False
    return first.priority()[0] != Priority.PROMPT or other.priority()[0] == Priority.PROMPT


@torch.no_grad()
def encode_slices(model: DeSAM, encode: Callable, precision: Precision, jobs: list[Job]) -> list[ImageFeatures]:
    """One encoder pass over the jobs' slices (same volume and axis, so same input size),
    preprocessed exactly as ``SlicePredictor.set_image`` does."""
    inputs, sizes, originals = [], [], []
    for job in jobs:
        rgb = to_rgb(slice_view(job.volume.array, job.axis_number, job.index), job.volume.window)
        x, input_size = prepare_input(model, rgb)
        inputs.append(x)
        sizes.append(input_size)
        originals.append(tuple(rgb.shape[:2]))
    with precision.autocast():
        embedding, taps = encode(inputs[0] if len(inputs) == 1 else torch.cat(inputs))
    return [ImageFeatures(embedding=embedding[b:b + 1].float(), taps=[t[b:b + 1].float() for t in taps],
                          input_size=sizes[b], original_size=originals[b]) for b in range(len(jobs))]
