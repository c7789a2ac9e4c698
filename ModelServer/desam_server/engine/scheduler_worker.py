"""The worker half of ``EncodingScheduler``: the loop of its one compute thread.

Takes the best batch off the queue, encodes it through the feature cache with the
preemption hooks armed, and settles every job: result, error, or back in the queue
when the pass was preempted and the job is still wanted. Methods run on the worker
thread and use the scheduler's attributes and lock (see ``scheduler``).

``call(fn)`` runs other PyTorch work on this thread too (the service's decoder passes and
feature unpacking): with GNU OpenMP every thread that runs a parallel operation keeps a
team of its own, and once a process has more OpenMP threads than CPUs, libgomp stops
spinning between parallel regions and sleeps in the kernel instead -- measured ~8 ms of
a ~40 ms click on two cores. One compute thread keeps one team.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable

import torch

from ..modeling.desam import ImageFeatures
from . import preemption
from .scheduler_queue import QUEUED, Job, encode_slices, same_pass

log = logging.getLogger("desam_server.engine.scheduler")

__all__ = ["SchedulerWorker", "SchedulerClosedError"]


class SchedulerClosedError(RuntimeError):
    """The scheduler was closed before the work could run."""


class SchedulerWorker:
    """Mixin: the worker loop; the scheduler provides the queue, cache, lock, counters."""

    _preempt: threading.Event
    _volumes: dict
    _running: list[Job]
    _thread: threading.Thread

    def _init_calls(self) -> None:
        self._urgent_calls: collections.deque = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._never_stop = threading.Event()  # calls serve clicks but are never preempted

    def call(self, fn: Callable[[], Any], *, urgent: bool = True) -> Any:
        """Run ``fn()`` on the worker thread; return its result or raise its exception.
        Urgent calls (clicks) run before any queued encoding and, during an encoder pass,
        at its next module (the pass then continues); others (batch segmentation)
        between passes, after the urgent ones, and serve urgent calls at their serve
        points (``preemption.serve_point``). On the worker thread itself: at once."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future = Future()
        with self._cond:
            self._check_open()
            (self._urgent_calls if urgent else self._calls).append((fn, future))
            self._cond.notify_all()
        return future.result()

    def _next_call(self) -> tuple | None:
        """The next call to run (lock held)."""
        for calls in (self._urgent_calls, self._calls):
            if calls:
                return calls.popleft()
        return None

    def _serve_urgent(self) -> None:
        """Run the waiting urgent calls (worker thread, inside an encoder pass)."""
        while True:
            with self._cond:
                if not self._urgent_calls:
                    return
                task = self._urgent_calls.popleft()
            self._execute(task)

    def _execute(self, task: tuple) -> None:
        fn, future = task
        if not future.set_running_or_notify_cancel():
            return
        try:
            # Inside an encoder pass its autocast region is active: not for this work.
            with torch.autocast(self.model.device.type, enabled=False):
                result = fn()
        except BaseException as exc:  # noqa: BLE001 - the caller gets it; the worker goes on
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _fail_calls(self) -> None:
        with self._cond:
            tasks = list(self._urgent_calls) + list(self._calls)
            self._urgent_calls.clear()
            self._calls.clear()
        for _, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(SchedulerClosedError("the encoding scheduler was closed"))

    def _preempt_unless(self, keep: Callable[[Job], bool]) -> None:
        """Stop the running pass unless ``keep`` holds for one of its jobs (lock held)."""
        if self._running and not any(keep(job) for job in self._running):
            self._preempt.set()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._fail_calls()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while (not self._closing and not self._urgent_calls and not self._calls
                       and (self._paused or not self._queue.has_work())):
                    self._cond.wait()
                if self._closing:
                    return
                urgent = bool(self._urgent_calls)
                task = self._next_call()
                if task is None:
                    batch = self._queue.pop_batch(self.encode_batch, same_pass)
                    for job in batch:
                        self._history.append((job.key.volume_id, job.key.axis, job.index, job.priority()[0].name))
                    self._running = batch
                    self._preempt.clear()
            if task is not None:
                if urgent:
                    self._execute(task)
                else:  # a long call serves clicks at its serve points (see ``preemption``)
                    with preemption.armed(self._never_stop, self._serve_urgent):
                        self._execute(task)
                continue
            preempted = False
            try:
                with preemption.armed(self._preempt, self._serve_urgent):
                    self._encode_batch(batch)
            except preemption.EncodePreempted:
                preempted = True
            except BaseException as exc:  # noqa: BLE001 - the worker must survive anything
                self._fail(batch, exc)
            finally:
                self._finish(batch, preempted)

    def _finish(self, batch: list[Job], preempted: bool) -> None:
        """Jobs of a preempted pass go back in the queue while wanted (by a waiter, or
        with their volume still registered); others are done."""
        dropped = []
        with self._cond:
            self._running = []
            for job in batch:
                if preempted and not job.future.done():
                    self._counters["preempted"] += 1
                    job.state = QUEUED
                    kept = job.waiters > 0 or self._volumes.get(job.key.volume_id) is job.volume
                    if not self._closing and kept and self._queue.reschedule(job):
                        continue
                    self._queue.finish(job)
                    dropped.append(job)
                else:
                    self._queue.finish(job)
                job.volume.view_jobs.discard(job)
        self._cancel(dropped, SchedulerClosedError("the encoding scheduler was closed") if self._closing else None)

    def _fail(self, jobs: list[Job], exc: BaseException) -> None:
        pending = [job for job in jobs if not job.future.done()]
        with self._cond:
            self._counters["errors"] += len(pending)
        if pending:
            j = pending[0]
            log.warning("scheduler: encoding %d slice(s) of volume %s axis %s failed (%s)", len(pending),
                        j.volume.tag, j.key.axis, exc.__class__.__name__)
        for job in pending:
            job.future.set_exception(exc)

    def _encode_batch(self, batch: list[Job]) -> None:
        device = self.model.device
        todo = []
        for job in batch:
            cached = self.cache.get(job.key, device) if self.cache.contains(job.key) else None
            if cached is not None:
                with self._cond:
                    self._counters["skipped_cached"] += 1
                job.future.set_result(cached)
            else:
                todo.append(job)
        if len(todo) == 1:
            job = todo[0]
            try:
                job.future.set_result(self.cache.get_or_compute(job.key, lambda: self._compute(todo)[0], device))
            except Exception as exc:  # noqa: BLE001
                self._fail([job], exc)
        elif todo:
            try:
                computed = self._compute(todo)
            except Exception as exc:  # noqa: BLE001
                self._fail(todo, exc)
                return
            for job, feats in zip(todo, computed):
                try:
                    job.future.set_result(self.cache.get_or_compute(job.key, lambda f=feats: f, device))
                except Exception as exc:  # noqa: BLE001
                    self._fail([job], exc)

    def _compute(self, jobs: list[Job]) -> list[ImageFeatures]:
        start = time.perf_counter()
        result = encode_slices(self.model, self._encode, self.precision, jobs)
        with self._cond:
            self._encode_seconds += time.perf_counter() - start
            self._counters["encoded"] += len(jobs)
            self._counters["batches"] += 1
        return result
