"""Segmentation jobs: a queue, one worker thread, progress and cancel.

A job of kind "auto" runs DeSAM's box or grid mode on a contiguous slice range of one
volume along one axis; a job of kind "propagate" carries a seed slice's mask to its
neighbours in both directions (``propagation``). Both report each finished slice's
predicted IoU and area (``SliceScore``). Jobs run one at a time, first come first
served, on a worker thread of their own (the encoder still runs on the scheduler's
thread, and clicks take the decoder before a job's next slice, so a running job never
freezes interactive work). Limits: at most one active (queued or running) job per volume
and axis (a second one is a 409 naming the first), at most ``max_jobs`` active jobs
(then 429). Finished jobs, with their result masks, are kept until ``keep`` newer ones
have finished. Jobs do not belong to a connection: a client that goes away leaves its
job running, or cancels it.

A cancelled job says why in ``error`` (``CANCELLED_ON_REQUEST``, ``VOLUME_DELETED``,
``SHUTTING_DOWN``). A job whose cancel was asked ends cancelled however its run stops:
the check before its next slice, or an error that the cancel's cause raised first (its
volume gone from the store and the scheduler while the job was between two checks).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .errors import Conflict, NotFound, TooManyRequests

log = logging.getLogger(__name__)

__all__ = ["AutoJobSpec", "PropagateJobSpec", "SliceScore", "AutoJob", "JobState", "JobManager", "JobCancelled",
           "ACTIVE", "FINISHED", "CANCELLED_ON_REQUEST", "VOLUME_DELETED", "SHUTTING_DOWN"]

#: Why a job was cancelled (its ``error``).
CANCELLED_ON_REQUEST = "cancelled on request"
VOLUME_DELETED = "its volume was deleted"
SHUTTING_DOWN = "the service shut down"


class JobState(StrEnum):
    """A job's state: queued, then running, then succeeded, failed or cancelled (the API's words)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE = (JobState.QUEUED, JobState.RUNNING)
FINISHED = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobCancelled(Exception):
    """Raised inside a job's run when its cancel flag is seen."""


@dataclass(frozen=True)
class SliceScore:
    """One finished slice of a job: the decoder's predicted IoU of its final mask (None
    where there is no prediction: an empty automatic answer, or a propagation's seed slice,
    whose mask the client gave), the mask's area in pixels, and for the cam-box mode the
    classifier's presence probability and the box that prompted SAM (x0, y0, x1, y1 in
    the slice's pixels; None when the slice was judged absent)."""

    index: int
    iou: float | None
    area: int
    presence: float | None = None
    box: tuple[float, float, float, float] | None = None

    def to_json(self) -> dict:
        return {"index": self.index, "iou": self.iou, "area": self.area, "presence": self.presence,
                "box": None if self.box is None else list(self.box)}


@dataclass(frozen=True)
class AutoJobSpec:
    """An automatic job over slices [start, stop). mode: "box" / "grid" (DeSAM's whole-box
    and grid-points modes), "roi" (every slice prompted by the same ``box``, x0 y0 x1 y1
    in slice pixels: a user's region of interest; any decoder, "sam" included) or "cam-box"
    (a SAM-Mix model: presence >= ``presence_threshold`` -> the box of its class activation
    map at ``omega`` x its maximum, the largest region's or each region's)."""

    kind = "auto"

    volume_id: str
    axis: str
    start: int
    stop: int                     # exclusive
    mode: str                     # "box", "grid", "roi" or "cam-box"
    decoder: str
    window: tuple[float, float]   # center, width
    grid_size: int = 9
    iou_threshold: float = 0.5
    min_region_area: int = 64
    box: tuple[float, float, float, float] | None = None
    presence_threshold: float = 0.5
    omega: float = 0.5
    largest_only: bool = True

    def to_json(self) -> dict:
        return {"volume_id": self.volume_id, "axis": self.axis, "start": self.start, "stop": self.stop,
                "mode": self.mode, "decoder": self.decoder,
                "window": {"center": self.window[0], "width": self.window[1]}, "grid_size": self.grid_size,
                "iou_threshold": self.iou_threshold, "min_region_area": self.min_region_area,
                "box": None if self.box is None else list(self.box), "presence_threshold": self.presence_threshold,
                "omega": self.omega, "largest_only": self.largest_only}

    def describe(self) -> str:
        return f"{self.mode} mode, {self.stop - self.start} slices"


@dataclass(frozen=True)
class PropagateJobSpec:
    """A propagation from the seed slice ``index`` (its mask ``seed``, H x W bool) within
    slices [start, stop) along ``axis``; the stop rules are ``propagation.StopRules``'."""

    kind = "propagate"

    volume_id: str
    axis: str
    index: int
    start: int
    stop: int                     # exclusive
    decoder: str                  # "sam" or a structure decoder's name
    window: tuple[float, float]   # center, width
    iou_threshold: float
    min_area: int
    min_area_ratio: float
    max_area_ratio: float
    seed: Any = field(repr=False, compare=False)   # H x W bool ndarray

    def to_json(self) -> dict:
        return {"volume_id": self.volume_id, "axis": self.axis, "index": self.index, "start": self.start,
                "stop": self.stop, "decoder": self.decoder,
                "window": {"center": self.window[0], "width": self.window[1]},
                "iou_threshold": self.iou_threshold, "min_area": self.min_area,
                "min_area_ratio": self.min_area_ratio, "max_area_ratio": self.max_area_ratio,
                "seed_area": int(self.seed.sum())}

    def describe(self) -> str:
        return f"propagation from slice {self.index} within [{self.start}, {self.stop})"


@dataclass(eq=False)
class AutoJob:
    """A segmentation job (automatic or propagation, ``spec.kind``): its spec, state,
    progress, the scores of its finished slices, and its result (a wire mask payload of the
    slice range; a propagation's from the first to the last slice it reached, ``reached``)."""

    spec: AutoJobSpec | PropagateJobSpec
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    state: JobState = JobState.QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    done: int = 0
    slices_with_mask: int = 0
    error: str | None = None
    result: bytes | None = field(default=None, repr=False)
    cancel_requested: threading.Event = field(default_factory=threading.Event, repr=False)
    cancel_reason: str | None = None
    slices: list[SliceScore] = field(default_factory=list, repr=False)
    reached: tuple[int, int] | None = None

    def add_slice(self, score: SliceScore) -> None:
        """Record a finished slice (the job's worker; readers copy the list)."""
        self.slices.append(score)

    @property
    def total(self) -> int:
        return self.spec.stop - self.spec.start

    def check_cancelled(self) -> None:
        if self.cancel_requested.is_set():
            raise JobCancelled()

    def to_json(self) -> dict:
        elapsed = None
        if self.started is not None:
            elapsed = round((self.finished or time.time()) - self.started, 3)
        slices = sorted(list(self.slices), key=lambda score: score.index)
        return {"id": self.id, "kind": self.spec.kind, "state": self.state.value, "spec": self.spec.to_json(),
                "progress": {"done": self.done, "total": self.total,
                             "fraction": round(self.done / self.total, 4) if self.total else 1.0},
                "slices_with_mask": self.slices_with_mask, "created": self.created, "started": self.started,
                "finished": self.finished, "elapsed_s": elapsed, "error": self.error,
                "result_available": self.result is not None, "cancel_requested": self.cancel_requested.is_set(),
                "slices": [score.to_json() for score in slices],
                "reached": None if self.reached is None else list(self.reached)}


class JobManager:
    """``run(job) -> bytes`` does the work (checking ``job.check_cancelled()``, updating
    ``job.done``) and returns the result payload."""

    def __init__(self, run: Callable[[AutoJob], bytes], *, max_jobs: int, keep: int) -> None:
        self._run = run
        self.max_jobs = max_jobs
        self.keep = keep
        self._lock = threading.Condition()
        self._jobs: dict[str, AutoJob] = {}
        self._queue: collections.deque[AutoJob] = collections.deque()
        self._finished: collections.deque[str] = collections.deque()
        self._closing = False
        self._counters = collections.Counter(dict.fromkeys((state.value for state in FINISHED), 0))
        self._thread = threading.Thread(target=self._worker, name="desam-jobs", daemon=True)
        self._thread.start()

    def submit(self, spec: AutoJobSpec | PropagateJobSpec) -> AutoJob:
        with self._lock:
            if self._closing:
                raise Conflict("the service is shutting down")
            active = [j for j in self._jobs.values() if j.state in ACTIVE]
            for other in active:
                if other.spec.volume_id == spec.volume_id and other.spec.axis == spec.axis:
                    raise Conflict(f"job {other.id} is already segmenting this volume along axis {spec.axis}: "
                                   "wait for it or cancel it first")
            if len(active) >= self.max_jobs:
                raise TooManyRequests(f"{len(active)} jobs are queued or running (limit {self.max_jobs})",
                                      retry_after=10)
            job = AutoJob(spec)
            self._jobs[job.id] = job
            self._queue.append(job)
            self._lock.notify_all()
        log.info("job %s queued: %s", job.id[:8], spec.describe())
        return job

    def get(self, job_id: str) -> AutoJob:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"unknown job {job_id[:32]!r} (finished jobs are forgotten after {self.keep} newer ones)")
        return job

    def list(self) -> list[AutoJob]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def cancel(self, job_id: str, reason: str = CANCELLED_ON_REQUEST) -> AutoJob:
        """Ask a job to stop (idempotent; a finished job is left as it is, and a second
        request keeps the first reason)."""
        job = self.get(job_id)
        with self._lock:
            if job.state in ACTIVE and not job.cancel_requested.is_set():
                job.cancel_reason = reason
                job.cancel_requested.set()
            if job.state is JobState.QUEUED:
                self._queue.remove(job)
                self._finish(job, JobState.CANCELLED, job.cancel_reason)
        return job

    def cancel_volume(self, volume_id: str) -> int:
        """Cancel the volume's active jobs because the volume is being deleted."""
        count = 0
        for job in self.list():
            if job.spec.volume_id == volume_id and job.state in ACTIVE:
                self.cancel(job.id, VOLUME_DELETED)
                count += 1
        return count

    def finished_count(self) -> int:
        """Jobs finished since the service started (any end: succeeded, failed, cancelled)."""
        with self._lock:
            return sum(self._counters.values())

    def wait_for_finish(self, seen: int, timeout: float) -> int:
        """Block until more than ``seen`` jobs have finished, or ``timeout`` seconds; returns
        ``finished_count()`` (a replica's job publication wakes on it, ``cluster.job_sync``)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while sum(self._counters.values()) == seen:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return sum(self._counters.values())

    def active_count(self) -> int:
        with self._lock:
            return sum(j.state in ACTIVE for j in self._jobs.values())

    def stats(self) -> dict:
        with self._lock:
            states = collections.Counter(j.state for j in self._jobs.values())
            return {"queued": states[JobState.QUEUED], "running": states[JobState.RUNNING], "kept": len(self._jobs),
                    "finished_total": dict(self._counters), "max_jobs": self.max_jobs}

    def close(self, timeout: float | None = 30.0) -> None:
        """Cancel queued and running jobs and wait for the worker."""
        with self._lock:
            self._closing = True
            pending = list(self._queue)
            self._queue.clear()
            for job in pending:
                job.cancel_reason = job.cancel_reason or SHUTTING_DOWN
                job.cancel_requested.set()
                self._finish(job, JobState.CANCELLED, job.cancel_reason)
            for job in self._jobs.values():
                if job.state is JobState.RUNNING and not job.cancel_requested.is_set():
                    job.cancel_reason = SHUTTING_DOWN
                    job.cancel_requested.set()
            self._lock.notify_all()
        self._thread.join(timeout)

    # ---- internals -----------------------------------------------------------------------
    def _finish(self, job: AutoJob, state: JobState, error: str | None = None) -> None:
        """Caller holds the lock."""
        job.state, job.error, job.finished = state, error, time.time()
        self._counters[state.value] += 1
        self._finished.append(job.id)
        while len(self._finished) > self.keep:
            self._jobs.pop(self._finished.popleft(), None)
        self._lock.notify_all()

    def wait(self, job_id: str, timeout: float | None = None) -> AutoJob:
        """Block until the job has finished (tests, command line)."""
        job = self.get(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while job.state in ACTIVE:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"job {job_id[:8]} still {job.state.value} after {timeout} s")
                self._lock.wait(left)
        return job

    def _worker(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if self._closing and not self._queue:
                    return
                job = self._queue.popleft()
                job.state, job.started = JobState.RUNNING, time.time()
            try:
                result = self._run(job)
            except Exception as exc:  # noqa: BLE001 - a job's failure must not stop the worker
                if isinstance(exc, JobCancelled) or job.cancel_requested.is_set():
                    # An error after a cancel comes from what the cancel's cause took away
                    # (a deleted volume): the job was cancelled, not failed.
                    with self._lock:
                        self._finish(job, JobState.CANCELLED, job.cancel_reason)
                    log.info("job %s cancelled after %d/%d slices", job.id[:8], job.done, job.total)
                    continue
                message = getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"
                with self._lock:
                    self._finish(job, JobState.FAILED, message)
                log.warning("job %s failed (%s)", job.id[:8], exc.__class__.__name__)
            else:
                with self._lock:
                    job.result = result
                    self._finish(job, JobState.SUCCEEDED)
                log.info("job %s succeeded: %d slices in %.1f s", job.id[:8], job.total,
                         (job.finished or 0) - (job.started or 0))

