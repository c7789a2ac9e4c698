"""The service's encoding scheduler: one worker thread runs every encoder pass.

One worker thread owns the encoder (the expensive, not thread-safe step); callers on
other threads submit work and wait on futures. Work is ranked (see ``scheduler_queue``): PROMPT (a click needs this slice now) > VIEW
(the slice on screen) > NEIGHBOUR (slices around it, nearest first: v+1, v-1, v+2, ...)
> BACKGROUND (precompute of a whole axis); first-in, first-out within equal rank.

API (all methods thread-safe; axis is 'k', 'j', 'i' or 0, 1, 2 of a K x J x I array):

- ``register_volume(volume_id, array, window, encoder_weights_sha256=...)``: make a
  volume known (the array is kept by reference: do not modify it while registered).
  Re-registering an id cancels its queued view and precompute work.
  ``unregister_volume(volume_id)`` forgets it.
- ``features(volume_id, axis, index, timeout=None) -> ImageFeatures``: the slice's
  features from the cache at once, else queued at PROMPT priority (an already-queued job
  for the slice is raised to PROMPT, a running one is joined) and awaited. Raises
  ``TimeoutError`` after ``timeout`` seconds, the encoder's exception when the pass
  failed, ``SchedulerClosedError`` when the scheduler closes first; ``taps=False``: a
  cache hit comes without the taps (SAM's prompted decoder needs the embedding only).
- ``set_view(volume_id, axis, index)``: VIEW for the slice and NEIGHBOUR work for
  ``neighbours`` slices each side; queued view work of the previous view of that volume
  that lies outside the new neighbourhood is cancelled (stats 'cancelled_obsolete').
- ``precompute(volume_id, axis)`` / ``cancel_precompute(volume_id, axis=None)``:
  BACKGROUND work for every slice not cached yet, and its withdrawal.
- ``progress(volume_id, axis)``: {'total', 'cached', 'queued', 'running'};
  ``is_cached(volume_id, axis, index)``.
- ``call(fn, urgent=True)``: run other PyTorch work on the worker thread (urgent: at the
  running pass's next module), so that one thread runs every parallel operation.
- ``pause()`` / ``resume()`` (hold the worker before its next batch), ``stats()``,
  ``history()`` (recent encodes, oldest first), ``close()``.

Preemption: a pass that nobody waits for is given up at the next encoder module boundary
(``preemption``) when a click needs another slice, when the view moves so far that the
slice is no longer wanted, or at close; the job goes back in the queue if still wanted
(stats 'preempted'). A click therefore waits for at most one encoder module, not a pass.

Results go through ``FeatureCache.get_or_compute`` under the slice's ``FeatureKey``:
callers get the stored form (bit-identical per key); a cached key is not encoded again.
With ``encode_batch`` > 1 the worker puts up to that many queued jobs of one volume and
axis into one encoder pass (a PROMPT job only takes PROMPT jobs along). Logs name volumes
by the first 12 characters of their id and never show voxel values.
"""

from __future__ import annotations

import collections
import logging
import threading
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Callable

import torch

from ..modeling.desam import DeSAM, ImageFeatures
from . import preemption
from .feature_cache import FeatureCache
from .preprocess import IntensityWindow
from .runtime import Precision, choose_precision
from .scheduler_queue import (AXIS_NAMES, QUEUED, RUNNING, Job, JobQueue, Priority, Volume,
                              feature_key, outward, where)
from .scheduler_worker import SchedulerClosedError, SchedulerWorker

log = logging.getLogger(__name__)

__all__ = ["EncodingScheduler", "Priority", "SchedulerClosedError", "AXIS_NAMES"]

COUNTERS = ("requests", "cache_hits", "joined", "raised", "encoded", "batches", "skipped_cached", "errors",
            "cancelled_obsolete", "cancelled_precompute", "cancelled_close", "cancelled_reregister", "preempted")
EncodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]]


class EncodingScheduler(SchedulerWorker):
    """Arguments: a DeSAM model (on its device), the ``FeatureCache``; ``encode_batch``:
    most jobs per encoder pass; ``neighbours``: slices each side of the view to encode;
    ``precision``: the encoder's autocast ('auto', 'fp32', 'bf16', 'fp16'), as
    ``SlicePredictor``; ``encode_fn``: replaces ``model.encode`` (tests, profiling)."""

    def __init__(self, model: DeSAM, cache: FeatureCache, *, encode_batch: int = 1, neighbours: int = 8,
                 precision: str | Precision = "auto", encode_fn: EncodeFn | None = None,
                 history_size: int = 1024) -> None:
        if isinstance(encode_batch, bool) or not isinstance(encode_batch, int) or encode_batch < 1:
            raise ValueError(f"encode_batch must be an integer >= 1, got {encode_batch!r}")
        if isinstance(neighbours, bool) or not isinstance(neighbours, int) or neighbours < 0:
            raise ValueError(f"neighbours must be an integer >= 0, got {neighbours!r}")
        self.model = model
        self.cache = cache
        self.encode_batch = encode_batch
        self.neighbours = neighbours
        self.precision = precision if isinstance(precision, Precision) else choose_precision(model.device, precision)
        self._encode = encode_fn or model.encode
        self._volumes: dict[str, Volume] = {}
        self._queue = JobQueue()
        self._cond = threading.Condition()
        self._paused = False
        self._closing = False
        self._history: collections.deque = collections.deque(maxlen=history_size)
        self._counters = collections.Counter(dict.fromkeys(COUNTERS, 0))
        self._encode_seconds = 0.0
        self._running: list[Job] = []                  # the batch in the encoder now
        self._preempt = threading.Event()
        self._init_calls()
        self._hooks = preemption.install(model.image_encoder)  # an encode_fn using it is preemptible too
        self._thread = threading.Thread(target=self._run, name="desam-encoder", daemon=True)
        self._thread.start()

    def register_volume(self, volume_id: str, array, window: IntensityWindow, *,
                        encoder_weights_sha256: str | None = ...) -> None:
        """``encoder_weights_sha256`` defaults to the model's own (None: random weights)."""
        sha = self.model.encoder_weights_sha256 if encoder_weights_sha256 is ... else encoder_weights_sha256
        volume = Volume.create(volume_id, array, window, sha)
        feature_key(self.model, volume, 0, 0)  # validates the sha256 early
        with self._cond:
            self._check_open()
            old = self._volumes.get(volume_id)
            self._volumes[volume_id] = volume
            dropped = self._withdraw(old, view=True, background=None) if old else []
            self._counters["cancelled_reregister"] += len(dropped)
        self._cancel(dropped)
        log.debug("scheduler: volume %s registered, shape %s", volume.tag, array.shape)

    def unregister_volume(self, volume_id: str) -> None:
        """Forget a volume; queued view/precompute work is cancelled (waiters still get theirs)."""
        with self._cond:
            volume = self._volume(volume_id)
            del self._volumes[volume_id]
            dropped = self._withdraw(volume, view=True, background=None)
            self._preempt_unless(lambda job: job.volume is not volume or job.waiters > 0)
        self._cancel(dropped)

    # ---- requests --------------------------------------------------------------------------------
    def features(self, volume_id: str, axis, index: int, timeout: float | None = None, *,
                 taps: bool = True) -> ImageFeatures:
        with self._cond:
            volume = self._volume(volume_id)
            a, index = where(volume, axis, index)
        key = feature_key(self.model, volume, a, index)
        packed = self.cache.lookup(key)
        # Unpacking (16-bit -> float32) is parallel work: the worker thread does it.
        cached = None if packed is None else self.call(lambda: self.cache.unpack(packed, self.model.device,
                                                                                 taps=taps))
        if cached is None and threading.current_thread() is self._thread:
            raise RuntimeError("features() on the worker thread: only for a cached slice")
        with self._cond:
            self._counters["requests"] += 1
            if cached is not None:
                self._counters["cache_hits"] += 1
                return cached
            self._check_open()
            job = self._queue.get(key)
            if job is None:
                job = Job(key, volume, a, waiters=1)
                self._queue.add(job)
                self._cond.notify_all()
            else:
                self._counters["joined"] += 1
                if job.state == QUEUED and job.priority()[0] != Priority.PROMPT:
                    self._counters["raised"] += 1
                job.waiters += 1
                self._queue.reschedule(job)
            if job.state == QUEUED:  # not the running pass: that one may have to give way
                self._preempt_unless(lambda running: running.waiters > 0)
        try:
            result = job.future.result(timeout)
        except FutureTimeout:
            with self._cond:
                job.waiters -= 1
                unwanted = not self._queue.reschedule(job)
            if unwanted:
                job.future.cancel()
            raise TimeoutError(f"slice {index} along axis {AXIS_NAMES[a]} was not encoded within {timeout} s") from None
        # A copy per caller: predictors cache per-slice state (skips) on the object.
        return ImageFeatures(embedding=result.embedding, taps=list(result.taps), input_size=result.input_size,
                             original_size=result.original_size)

    def is_cached(self, volume_id: str, axis, index: int) -> bool:
        """Whether the slice's features are in the cache now (no encoder work queued)."""
        with self._cond:
            volume = self._volume(volume_id)
            a, index = where(volume, axis, index)
        return self.cache.contains(feature_key(self.model, volume, a, index))

    def set_view(self, volume_id: str, axis, index: int) -> None:
        with self._cond:
            self._check_open()
            volume = self._volume(volume_id)
            a, index = where(volume, axis, index)
            wanted = {}
            for rank, i in outward(index, self.neighbours, volume.array.shape[a]):
                wanted[feature_key(self.model, volume, a, i)] = rank
            volume.view = (a, index)
            dropped = []
            for job in list(volume.view_jobs):
                if job.key not in wanted or job.state != QUEUED:
                    job.view_rank = None
                    volume.view_jobs.discard(job)
                    if not self._queue.reschedule(job):
                        dropped.append(job)
            self._counters["cancelled_obsolete"] += len(dropped)
            for key, rank in sorted(wanted.items(), key=lambda kv: kv[1]):
                job = self._queue.get(key)
                if job is None:
                    if self.cache.contains(key):
                        continue
                    job = Job(key, volume, a, view_rank=rank)
                    self._queue.add(job)
                elif job.state == QUEUED:
                    job.view_rank = rank
                    if job.waiters == 0:
                        job.entry = None  # a fresh entry: outward order, behind older equals
                    self._queue.reschedule(job)
                else:
                    job.view_rank = rank  # running: keeps its place if preempted
                volume.view_jobs.add(job)
            self._preempt_unless(lambda job: job.priority() is not None)
            self._cond.notify_all()
        self._cancel(dropped)

    def precompute(self, volume_id: str, axis) -> int:
        """Queue every uncached slice of the axis in the background; returns the count."""
        with self._cond:
            self._check_open()
            volume = self._volume(volume_id)
            a, _ = where(volume, axis, 0)
            volume.background_axes.add(a)
            count = 0
            for i in range(volume.array.shape[a]):
                key = feature_key(self.model, volume, a, i)
                job = self._queue.get(key)
                if job is None:
                    if self.cache.contains(key):
                        continue
                    self._queue.add(Job(key, volume, a, background=True))
                elif job.state == QUEUED and not job.background:
                    job.background = True
                    self._queue.reschedule(job)
                else:
                    continue
                count += 1
            self._cond.notify_all()
        log.debug("scheduler: precompute of %s axis %s, %d slices", volume.tag, AXIS_NAMES[a], count)
        return count

    def cancel_precompute(self, volume_id: str, axis=None) -> int:
        """Withdraw queued background work of the volume (one axis, or all). Returns how
        many jobs were cancelled (jobs also wanted by a prompt or the view stay)."""
        with self._cond:
            volume = self._volume(volume_id)
            a = None if axis is None else where(volume, axis, 0)[0]
            dropped = self._withdraw(volume, view=False, background=a)
            self._counters["cancelled_precompute"] += len(dropped)
        self._cancel(dropped)
        return len(dropped)

    def progress(self, volume_id: str, axis) -> dict:
        with self._cond:
            volume = self._volume(volume_id)
            a, _ = where(volume, axis, 0)
            jobs = [j for j in self._queue.jobs.values() if j.volume is volume and j.axis_number == a]
        total = volume.array.shape[a]
        cached = sum(self.cache.contains(feature_key(self.model, volume, a, i)) for i in range(total))
        return {"total": total, "cached": cached, "queued": sum(j.state == QUEUED for j in jobs),
                "running": sum(j.state == RUNNING for j in jobs)}

    # ---- control ---------------------------------------------------------------------------------
    def pause(self) -> None:  # the worker finishes its batch, then waits for resume()
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking work, cancel queued jobs (waiters: SchedulerClosedError), join."""
        with self._cond:
            self._closing = True
            dropped = self._queue.drain()
            for volume in self._volumes.values():
                volume.view_jobs.clear()
            self._counters["cancelled_close"] += len(dropped)
            self._preempt_unless(lambda job: job.waiters > 0)
            self._cond.notify_all()
        self._cancel(dropped, SchedulerClosedError("the encoding scheduler was closed"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        for handle in self._hooks:
            handle.remove()

    def __enter__(self) -> "EncodingScheduler":  # noqa: D105
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        with self._cond:
            jobs = list(self._queue.jobs.values())
            by_priority = collections.Counter(j.priority()[0].name.lower() for j in jobs if j.state == QUEUED)
            return {**self._counters, "queued": sum(by_priority.values()),
                    "queued_by_priority": dict(by_priority), "running": sum(j.state == RUNNING for j in jobs),
                    "volumes": len(self._volumes), "encode_batch": self.encode_batch, "precision": self.precision.name,
                    "encode_seconds": round(self._encode_seconds, 6), "paused": self._paused,
                    "closed": self._closing, "worker_alive": self._thread.is_alive()}

    def history(self) -> list[tuple[str, str, int, str]]:
        """Recent encodes, oldest first: (volume id, axis, index, priority at start)."""
        with self._cond:
            return list(self._history)

    # ---- internals --------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closing:
            raise SchedulerClosedError("the encoding scheduler is closed")

    def _volume(self, volume_id: str) -> Volume:
        volume = self._volumes.get(volume_id)
        if volume is None:
            raise KeyError(f"unknown volume {str(volume_id)[:12]!r}: register it with register_volume() first")
        return volume

    def _withdraw(self, volume: Volume, *, view: bool, background) -> list[Job]:
        """Remove view reasons (``view``) and background reasons (axis number, or None
        for all axes) from the volume's queued jobs; returns jobs left without a reason.
        Caller holds the lock."""
        dropped = []
        if view:
            volume.view = None
        if background is None:
            volume.background_axes.clear()
        else:
            volume.background_axes.discard(background)
        for job in self._queue.queued():
            if job.volume is not volume:
                continue
            if view and job.view_rank is not None:
                job.view_rank = None
                volume.view_jobs.discard(job)
            if job.background and (background is None or job.axis_number == background):
                job.background = False
            if not self._queue.reschedule(job):
                dropped.append(job)
        return dropped

    @staticmethod
    def _cancel(jobs: list[Job], error: BaseException | None = None) -> None:
        for job in jobs:
            if error is not None and job.waiters > 0:
                job.future.set_exception(error)
            else:
                job.future.cancel()
