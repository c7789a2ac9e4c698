"""``ComputeWorker``: the encoding scheduler's one compute thread.

It runs every PyTorch computation the scheduler is given: encoder passes (which it asks
its owner for, through three callables: ``next_pass``, ``run_pass``, ``finish_pass``) and
*calls* -- other work handed over with ``call(fn)``: a click's decoder pass (urgent: before
any queued encoding, and inside a running pass at its next step, after which the pass
continues), a batch job's next slice (between passes), feature unpacking.

Why one thread: with GNU OpenMP every thread that runs a parallel operation keeps a team
of its own, and once a process has more OpenMP threads than CPUs, libgomp stops spinning
between parallel regions and sleeps in the kernel instead -- measured ~8 ms of a ~40 ms
click on two cores. One compute thread keeps one team.

Stopping a pass: the worker hands ``run_pass`` a ``between_steps`` callable, which the
encoder calls between its steps (``DeSAM.encode``). It runs the waiting urgent calls and,
once ``preempt()`` was asked for (under the owner's lock), raises ``EncodePreempted``; the
pass then ends at that step and ``finish_pass`` learns it was preempted. Nothing is
installed on the model.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch

log = logging.getLogger("desam_server.engine.scheduler")

__all__ = ["ComputeWorker", "EncodePreempted", "SchedulerClosedError"]


class SchedulerClosedError(RuntimeError):
    """The scheduler was closed before the work could run."""


class EncodePreempted(BaseException):
    """The running encoder pass was given up for more urgent work. A ``BaseException``, so
    that code handling encoder *errors* (``except Exception``) lets it through to the
    worker, which hands the pass back to its owner as preempted instead of failed."""


StepCallback = Callable[[], None]


class ComputeWorker:
    """The compute thread (see the module docstring).

    cond: the owner's lock and condition; the worker waits on it and the owner notifies it
    when work arrives. next_pass(): with the lock held, the requests of the next encoder
    pass (marked running), or None when there is none to run now. run_pass(requests,
    between_steps): runs that pass (lock not held). finish_pass(requests, preempted,
    error): settles it (lock not held; ``error`` is an exception that escaped
    ``run_pass``, else None). device_type: autocast is switched off for calls made inside
    an encoder pass's autocast region.
    """

    def __init__(self, cond: threading.Condition, *, next_pass: Callable[[], list | None],
                 run_pass: Callable[[list, StepCallback], None],
                 finish_pass: Callable[[list, bool, BaseException | None], None], device_type: str,
                 name: str = "desam-encoder") -> None:
        self._cond = cond
        self._next_pass = next_pass
        self._run_pass = run_pass
        self._finish_pass = finish_pass
        self._device_type = device_type
        self._urgent: collections.deque = collections.deque()
        self._others: collections.deque = collections.deque()
        self._preempt = threading.Event()
        self._closing = False
        self._serving = False  # worker thread only: inside serve_urgent
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- for any thread -------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def on_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def call(self, fn: Callable[[], Any], *, urgent: bool = True) -> Any:
        """Run ``fn()`` on the worker thread; return its result or raise its exception.
        Urgent calls (clicks) run before any queued encoding and, during an encoder pass,
        at its next step (the pass then continues); others (batch segmentation) between
        passes, after the urgent ones; they can serve urgent calls at their own steps
        (``serve_urgent``). On the worker thread itself: at once. Raises
        ``SchedulerClosedError`` once the worker is closing."""
        if self.on_worker_thread():
            return fn()
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise SchedulerClosedError("the encoding scheduler is closed")
            (self._urgent if urgent else self._others).append((fn, future))
            self._cond.notify_all()
        return future.result()

    def waiting_calls(self) -> dict[str, int]:
        """Calls queued and not yet started: {'urgent': n, 'other': m}."""
        with self._cond:
            return {"urgent": len(self._urgent), "other": len(self._others)}

    # ---- for the owner, with its lock held ---------------------------------------------------
    def preempt(self) -> None:
        """Ask the running encoder pass to stop at its next step (owner's lock held)."""
        self._preempt.set()

    def stop(self) -> None:
        """Stop taking calls and passes (owner's lock held); ``join`` waits for the thread."""
        self._closing = True
        self._cond.notify_all()

    def join(self, timeout: float | None = None) -> None:
        if not self.on_worker_thread():
            self._thread.join(timeout)

    # ---- on the worker thread -------------------------------------------------------------------
    def serve_urgent(self) -> None:
        """Run the urgent calls waiting now (a long computation on the worker thread calls
        this between its steps: a batch job's slice serves clicks that way). Elsewhere,
        and inside an urgent call, it does nothing."""
        if not self.on_worker_thread() or self._serving:
            return
        self._serving = True
        try:
            while True:
                with self._cond:
                    if not self._urgent:
                        return
                    task = self._urgent.popleft()
                self._execute(task)
        finally:
            self._serving = False

    def _between_encoder_steps(self) -> None:
        self.serve_urgent()
        if self._preempt.is_set():
            raise EncodePreempted()

    def _execute(self, task: tuple) -> None:
        fn, future = task
        if not future.set_running_or_notify_cancel():
            return
        try:
            # Inside an encoder pass its autocast region is active: not for this work.
            with torch.autocast(self._device_type, enabled=False):
                result = fn()
        except BaseException as exc:  # noqa: BLE001 - the caller gets it; the worker goes on
            future.set_exception(exc)
        else:
            future.set_result(result)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self._fail_calls()

    def _loop(self) -> None:
        while True:
            task, batch = None, None
            with self._cond:
                while True:
                    if self._closing:
                        return
                    if self._urgent or self._others:
                        task = (self._urgent or self._others).popleft()
                        break
                    batch = self._next_pass()
                    if batch:
                        self._preempt.clear()
                        break
                    self._cond.wait()
            if task is not None:
                self._execute(task)  # a long non-urgent call serves urgent ones itself (serve_urgent)
                continue
            preempted, error = False, None
            try:
                self._run_pass(batch, self._between_encoder_steps)
            except EncodePreempted:
                preempted = True
            except BaseException as exc:  # noqa: BLE001 - the worker must survive anything; the pass's waiters get it
                error = exc
            self._finish_pass(batch, preempted, error)

    def _fail_calls(self) -> None:
        with self._cond:
            tasks = list(self._urgent) + list(self._others)
            self._urgent.clear()
            self._others.clear()
        for _, future in tasks:
            if future.set_running_or_notify_cancel():
                future.set_exception(SchedulerClosedError("the encoding scheduler was closed"))
