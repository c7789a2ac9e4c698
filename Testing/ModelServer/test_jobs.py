"""The job manager on its own: states, cancel reasons, errors after a cancel."""

from __future__ import annotations

import threading

import pytest

from desam_server.api.jobs import CANCELLED_ON_REQUEST, SHUTTING_DOWN, VOLUME_DELETED, AutoJobSpec, JobManager


def spec(volume: str = "v" * 64) -> AutoJobSpec:
    return AutoJobSpec(volume_id=volume, axis="k", start=0, stop=4, mode="box", decoder="phantom",
                       window=(40.0, 400.0))


class Run:
    """A job's run that holds at ``gate`` once started, then does ``then(job)``."""

    def __init__(self, then):
        self.started, self.gate, self.then = threading.Event(), threading.Event(), then

    def __call__(self, job):
        self.started.set()
        assert self.gate.wait(20)
        return self.then(job)


def checked(job) -> bytes:
    job.check_cancelled()
    return b"slab"


def fails(job) -> bytes:
    raise KeyError("volume gone from the scheduler")    # what a deleted volume's lookup raises


@pytest.fixture()
def manager():
    made = []

    def make(then):
        run = Run(then)
        made.append((JobManager(run, max_jobs=4, keep=8), run))
        return made[-1]

    yield make
    for m, run in made:
        run.gate.set()
        m.close(timeout=20)


def test_a_run_succeeds_or_fails_on_its_own(manager):
    m, run = manager(checked)
    job = m.submit(spec())
    run.gate.set()
    assert m.wait(job.id, timeout=20).state == "succeeded" and job.result == b"slab" and job.error is None
    m, run = manager(fails)
    job = m.submit(spec())
    run.gate.set()
    assert m.wait(job.id, timeout=20).state == "failed"
    assert job.error == "KeyError: 'volume gone from the scheduler'" and job.result is None


def test_cancel_reasons(manager):
    m, run = manager(checked)
    running = m.submit(spec("a" * 64))
    assert run.started.wait(20)
    queued = m.submit(spec("b" * 64))
    other = m.submit(spec("c" * 64))
    assert m.cancel_volume("b" * 64) == 1
    assert (queued.state, queued.error) == ("cancelled", VOLUME_DELETED)      # at once: it never ran
    assert m.cancel(other.id).state == "cancelled" and other.error == CANCELLED_ON_REQUEST
    assert m.cancel(running.id).state == "running" and running.cancel_requested.is_set()
    m.cancel_volume("a" * 64)                                                  # a second cause: the first stays
    run.gate.set()
    assert m.wait(running.id, timeout=20).state == "cancelled" and running.error == CANCELLED_ON_REQUEST
    assert m.stats()["finished_total"]["cancelled"] == 3


def test_an_error_after_a_cancel_ends_the_job_cancelled(manager):
    """A job whose volume is deleted while it is between two cancel checks meets the
    volume's absence first (a lookup error): it ends cancelled, saying why, not failed."""
    m, run = manager(fails)
    job = m.submit(spec())
    assert run.started.wait(20)
    assert m.cancel_volume(job.spec.volume_id) == 1
    run.gate.set()
    assert m.wait(job.id, timeout=20).state == "cancelled"
    assert job.error == VOLUME_DELETED and job.result is None


def test_shutdown_cancels_queued_and_running_jobs(manager):
    m, run = manager(checked)
    running = m.submit(spec("a" * 64))
    assert run.started.wait(20)
    queued = m.submit(spec("b" * 64))
    closer = threading.Thread(target=m.close, kwargs={"timeout": 20})
    closer.start()
    assert m.wait(queued.id, timeout=20).state == "cancelled" and queued.error == SHUTTING_DOWN
    run.gate.set()
    closer.join(20)
    assert not closer.is_alive()
    assert running.state == "cancelled" and running.error == SHUTTING_DOWN
