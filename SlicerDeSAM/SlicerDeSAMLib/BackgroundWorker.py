"""One worker thread for the module's network calls, with results handed back on the main thread.

Qt and MRML may be touched only on Slicer's main thread, and a network call must never run
there (it would freeze the GUI). So a panel submits the network part of an action
(``request_*`` / ``run_*``: ``ServerClient`` calls on plain data) to a ``BackgroundWorker``;
the widget's ``QTimer`` calls ``poll()`` on the main thread, which runs each finished
task's ``on_done(result)`` or ``on_error(exception)`` there, and those write into MRML.

Standard library only (no Qt): the same object works in the tests, where the test's own
thread plays the main thread.
"""

from __future__ import annotations

import collections
import enum
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["BackgroundWorker", "Task", "TaskState"]


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"              # finished; its result waits for (or went through) poll()
    FAILED = "failed"          # raised; its exception waits for (or went through) poll()
    CANCELLED = "cancelled"    # withdrawn before it started; never ran, no callback runs


class Task:
    """One submitted call. ``state``, ``result`` and ``error`` are for inspection; the
    callbacks are the way results reach the caller (on the thread that calls ``poll()``)."""

    _ids = itertools.count(1)

    def __init__(self, fn: Callable, args: tuple, kwargs: dict, on_done: Callable | None,
                 on_error: Callable | None, key: str | None) -> None:
        self.id = next(Task._ids)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.on_done, self.on_error = on_done, on_error
        self.key = key
        self.state = TaskState.QUEUED
        self.result: Any = None
        self.error: BaseException | None = None
        self.delivered = False     # its callback has run (or it was cancelled): it no longer counts as busy

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", repr(self.fn))
        return f"<Task {self.id} {name} key={self.key!r} {self.state.value}>"


class BackgroundWorker:
    """``submit(fn, *args, on_done=None, on_error=None, key=None, **kwargs) -> Task``: run
    ``fn(*args, **kwargs)`` on the worker thread, after the tasks submitted before it.
    ``poll()`` (main thread) runs the callbacks of the tasks that have finished, in the
    order they finished, and returns how many it delivered. A task that raised and has no
    ``on_error`` re-raises its exception from ``poll()`` (nothing fails silently).
    ``busy(key)``: a task (of that key) queued, running, or finished but not yet delivered.
    ``cancel(key)``: withdraw the queued tasks of a key (a running call is not interrupted;
    to stop a service job, submit its cancel request). ``shutdown()``: withdraw what is
    queued, let the running call end, stop the thread."""

    def __init__(self, name: str = "SlicerDeSAM worker") -> None:
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._tasks: list[Task] = []                         # submitted, not yet delivered
        self._finished: collections.deque[Task] = collections.deque()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ---- caller's side ------------------------------------------------------------------------
    def submit(self, fn: Callable, *args, on_done: Callable[[Any], None] | None = None,
               on_error: Callable[[BaseException], None] | None = None, key: str | None = None,
               **kwargs) -> Task:
        task = Task(fn, args, kwargs, on_done, on_error, key)
        with self._lock:
            if self._stopped:
                raise RuntimeError("the background worker has been shut down")
            self._tasks.append(task)
        self._queue.put(task)
        return task

    def poll(self, max_tasks: int | None = None) -> int:
        """Run the callbacks of finished tasks on this thread; returns how many were delivered.
        An exception raised by a callback (or re-raised for a task without ``on_error``)
        propagates after its task is marked delivered, so the next ``poll()`` goes on with
        the rest."""
        delivered = 0
        while max_tasks is None or delivered < max_tasks:
            with self._lock:
                if not self._finished:
                    break
                task = self._finished.popleft()
                task.delivered = True
                self._tasks.remove(task)
            delivered += 1
            if task.state is TaskState.DONE:
                if task.on_done is not None:
                    task.on_done(task.result)
            elif task.on_error is not None:
                task.on_error(task.error)
            else:
                raise task.error
        return delivered

    def busy(self, key: str | None = None) -> bool:
        with self._lock:
            return any(key is None or t.key == key for t in self._tasks)

    def pending(self, key: str | None = None) -> list[Task]:
        """The tasks (of ``key``) not yet delivered, oldest first."""
        with self._lock:
            return [t for t in self._tasks if key is None or t.key == key]

    def cancel(self, key: str | None = None) -> int:
        """Withdraw the queued tasks of ``key`` (every queued task when None); returns how
        many. Their callbacks never run."""
        count = 0
        with self._lock:
            for task in list(self._tasks):
                if task.state is TaskState.QUEUED and (key is None or task.key == key):
                    task.state = TaskState.CANCELLED
                    task.delivered = True
                    self._tasks.remove(task)
                    count += 1
        return count

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> bool:
        """Withdraw queued tasks, stop the thread after its running call; with ``wait``, join
        it (up to ``timeout`` seconds). Returns whether the thread has ended. Results that
        had finished can still be delivered by ``poll()``."""
        with self._lock:
            already = self._stopped
            self._stopped = True
        self.cancel()
        if not already:
            self._queue.put(None)
        if wait:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    # ---- worker thread ----------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            task = self._queue.get()
            if task is None:
                return
            with self._lock:
                if task.state is not TaskState.QUEUED:
                    continue                      # cancelled while it waited
                task.state = TaskState.RUNNING
            try:
                result = task.fn(*task.args, **task.kwargs)
            except BaseException as exc:  # noqa: BLE001 - every failure is handed to the caller's thread
                outcome, state = exc, TaskState.FAILED
            else:
                outcome, state = result, TaskState.DONE
            with self._lock:
                task.state = state
                if state is TaskState.DONE:
                    task.result = outcome
                else:
                    task.error = outcome
                self._finished.append(task)
