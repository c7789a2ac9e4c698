"""BackgroundWorker: calls run on its one thread in order; results, errors and callbacks
come back only through poll() on the polling (main) thread; busy, cancel, shutdown."""

from __future__ import annotations

import threading
import time

import pytest

from SlicerDeSAMLib.BackgroundWorker import BackgroundWorker, TaskState


def _poll_until(worker: BackgroundWorker, condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        worker.poll()
        time.sleep(0.005)


@pytest.fixture()
def worker():
    w = BackgroundWorker()
    yield w
    w.shutdown(wait=True, timeout=10)


def test_calls_run_on_the_worker_in_order_and_callbacks_on_the_polling_thread(worker):
    main = threading.current_thread()
    ran_on, order, callbacks = [], [], []

    def call(n):
        ran_on.append(threading.current_thread())
        order.append(n)
        time.sleep(0.01 if n % 2 else 0)
        return n * n

    for n in range(6):
        worker.submit(call, n, on_done=lambda r, n=n: callbacks.append((n, r, threading.current_thread())))
    # Nothing is delivered without poll(), however long the worker had.
    deadline = time.monotonic() + 10
    while len(order) < 6 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert callbacks == []
    assert worker.busy()
    _poll_until(worker, lambda: len(callbacks) == 6)
    assert order == list(range(6))
    assert all(t is worker.thread and t is not main for t in ran_on)
    assert [(n, r) for n, r, _ in callbacks] == [(n, n * n) for n in range(6)]
    assert all(t is main for _, _, t in callbacks)
    assert not worker.busy()


def test_keyword_arguments_reach_the_call(worker):
    got = []
    worker.submit(lambda a, b=0: a - b, 10, b=3, on_done=got.append)
    _poll_until(worker, lambda: got)
    assert got == [7]


def test_errors_are_delivered_to_on_error_on_the_polling_thread(worker):
    errors, done = [], []

    def fail():
        raise ValueError("the service said no")

    task = worker.submit(fail, on_done=done.append, on_error=lambda e: errors.append((e, threading.current_thread())))
    after = worker.submit(lambda: "still runs", on_done=done.append)
    _poll_until(worker, lambda: errors and done)
    (error, thread), = errors
    assert isinstance(error, ValueError) and str(error) == "the service said no"
    assert thread is threading.current_thread()
    assert task.state is TaskState.FAILED and task.error is error
    assert done == ["still runs"] and after.state is TaskState.DONE


def test_an_error_without_on_error_is_raised_by_poll_and_the_rest_still_delivered(worker):
    done = []
    worker.submit(lambda: 1 / 0)
    worker.submit(lambda: "next", on_done=done.append)
    while worker.pending()[0].state in (TaskState.QUEUED, TaskState.RUNNING):
        time.sleep(0.005)
    with pytest.raises(ZeroDivisionError):
        worker.poll()
    _poll_until(worker, lambda: done)
    assert done == ["next"]


def test_busy_per_key_and_cancel_of_queued_tasks(worker):
    gate = threading.Event()
    started = threading.Event()
    ran, done = [], []

    def blocker():
        started.set()
        gate.wait(10)
        return "blocker"

    worker.submit(blocker, key="segment", on_done=done.append)
    started.wait(10)
    queued = [worker.submit(ran.append, n, key="train", on_done=done.append) for n in range(3)]
    other = worker.submit(ran.append, "view", key="view")
    assert worker.busy("segment") and worker.busy("train") and worker.busy("view")
    assert not worker.busy("nothing")
    assert worker.cancel("train") == 3
    assert all(t.state is TaskState.CANCELLED for t in queued)
    assert not worker.busy("train") and worker.busy("segment")
    gate.set()
    _poll_until(worker, lambda: not worker.busy())
    assert ran == ["view"] and done == ["blocker"] and other.state is TaskState.DONE
    assert worker.cancel("train") == 0


def test_busy_until_the_result_is_delivered(worker):
    task = worker.submit(lambda: 5, key="k")
    while task.state is not TaskState.DONE:
        time.sleep(0.005)
    assert worker.busy("k")              # finished, but its callback has not run yet
    assert worker.poll() == 1
    assert not worker.busy("k")


def test_poll_delivers_at_most_max_tasks(worker):
    got = []
    tasks = [worker.submit(lambda n=n: n, on_done=got.append) for n in range(3)]
    while any(t.state is not TaskState.DONE for t in tasks):
        time.sleep(0.005)
    assert worker.poll(max_tasks=2) == 2 and got == [0, 1]
    assert worker.poll() == 1 and got == [0, 1, 2]
    assert worker.poll() == 0


def test_shutdown_joins_after_the_running_call_and_withdraws_the_queue():
    worker = BackgroundWorker()
    started, ran = threading.Event(), []

    def slow():
        started.set()
        time.sleep(0.2)
        ran.append("slow")
        return "slow"

    worker.submit(slow)
    started.wait(10)
    late = worker.submit(ran.append, "late")
    t0 = time.monotonic()
    assert worker.shutdown(wait=True, timeout=10)
    assert time.monotonic() - t0 < 5
    assert not worker.thread.is_alive()
    assert ran == ["slow"] and late.state is TaskState.CANCELLED
    assert worker.poll() == 1              # the finished call is still delivered
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(print)
    assert worker.shutdown(wait=True)      # twice is fine


def test_the_worker_thread_is_a_daemon():
    worker = BackgroundWorker()
    try:
        assert worker.thread.daemon and worker.thread.is_alive()
    finally:
        worker.shutdown()


def test_the_logic_modules_import_without_slicer_vtk_or_qt():
    """BackgroundWorker, LocalServer, ServerLogic, TrainingLogic and their dataclasses are
    importable where slicer, vtk and qt cannot be imported (a worker thread never needs them)."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "for name in ('slicer', 'vtk', 'qt', 'ctk', 'PythonQt'):\n"
            "    sys.modules[name] = None\n"
            "import SlicerDeSAMLib.BackgroundWorker, SlicerDeSAMLib.LocalServer, SlicerDeSAMLib.ServerLogic\n"
            "import SlicerDeSAMLib.TrainingLogic, SlicerDeSAMLib.TrainingCase, SlicerDeSAMLib.TrainingStatus\n"
            "import SlicerDeSAMLib.ServerSummary, SlicerDeSAMLib.DeSAMError\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
