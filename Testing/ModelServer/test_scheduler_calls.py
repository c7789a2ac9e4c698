"""EncodingScheduler.call: other PyTorch work on the worker thread (one OpenMP team)."""

from __future__ import annotations

import threading

import pytest

from desam_server.engine.scheduler import SchedulerClosedError

from scheduler_helpers import VOLUME, close_while_held, idle, make, wait_until


def test_a_call_runs_on_the_worker_and_returns_or_raises(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path)
    assert sched.call(lambda: threading.current_thread().name) == "desam-encoder"
    # From the worker itself (a call inside a call): at once, no deadlock.
    assert sched.call(lambda: sched.call(lambda: 7) + 1) == 8
    with pytest.raises(ZeroDivisionError):
        sched.call(lambda: 1 / 0)
    assert sched.call(lambda: "still serving") == "still serving"
    sched.close()
    with pytest.raises(SchedulerClosedError):
        sched.call(lambda: None)


def test_urgent_calls_go_before_others_and_before_encoding(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path, neighbours=0)
    gate, order, threads = threading.Event(), [], []

    def submit(name, urgent):
        t = threading.Thread(target=lambda: sched.call(lambda: order.append(name), urgent=urgent))
        t.start()
        threads.append(t)

    started = threading.Event()
    blocker = threading.Thread(target=lambda: sched.call(lambda: started.set() or gate.wait(20), urgent=False))
    blocker.start()
    assert started.wait(20)  # the worker runs the blocker
    submit("batch slice", urgent=False)
    wait_until(lambda: sched.stats()["calls_waiting"]["other"] == 1)
    sched.precompute(VOLUME, "k")
    submit("click", urgent=True)
    wait_until(lambda: sched.stats()["calls_waiting"]["urgent"] == 1)
    gate.set()
    for t in (blocker, *threads):
        t.join(20)
    assert order == ["click", "batch slice"]
    assert sched.stats()["encoded"] < scheduler_volume.shape[0]  # both ran before the precompute ended
    wait_until(lambda: idle(sched))
    sched.close()


def test_calls_waiting_at_close_get_an_error(scheduler_model, scheduler_volume, tmp_path):
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path)
    gate, outcome = threading.Event(), {}

    def later():
        try:
            outcome["late"] = sched.call(lambda: "ran")
        except SchedulerClosedError as exc:
            outcome["late"] = exc

    started = threading.Event()
    blocker = threading.Thread(target=lambda: sched.call(lambda: started.set() or gate.wait(20)))
    blocker.start()
    assert started.wait(20)
    late = threading.Thread(target=later)
    late.start()
    wait_until(lambda: sched.stats()["calls_waiting"]["urgent"] == 1)
    close_while_held(sched, gate, blocker, late, timeout=20)
    assert isinstance(outcome["late"], SchedulerClosedError)
    assert not sched.stats()["worker_alive"]


def test_a_long_call_serves_urgent_calls_when_it_asks(scheduler_model, scheduler_volume, tmp_path):
    """A batch-segmentation slice (non-urgent, seconds on a CPU) lets a click run at its
    next step (it calls ``serve_urgent`` there) instead of after it."""
    sched, _, _ = make(scheduler_model, scheduler_volume, tmp_path)
    started, clicked, order = threading.Event(), threading.Event(), []

    def long_slice():
        started.set()
        for _ in range(2000):  # up to 20 s, serving at every step
            if clicked.is_set():
                break
            sched.serve_urgent()
            threading.Event().wait(0.01)
        order.append("slice done")
        return clicked.is_set()

    def click():
        order.append("click")
        sched.serve_urgent()  # served work does not serve again: no nesting
        clicked.set()

    result = {}
    slice_thread = threading.Thread(target=lambda: result.update(slice=sched.call(long_slice, urgent=False)))
    slice_thread.start()
    assert started.wait(20)
    sched.call(click)  # returns while the slice is still running
    slice_thread.join(20)
    assert order == ["click", "slice done"] and result["slice"] is True
    # Outside the worker thread serve_urgent does nothing (and runs nobody's call).
    sched.serve_urgent()
    sched.close()
