"""A replica's side of the job board: ``JobSync``.

A thread publishes the replica's jobs to the board (``job_board.JobBoard.publish``) as
soon as one of them finishes and otherwise every ``interval`` seconds: the records that
changed since the last publication, the result of a job that succeeded (once), and the
ids it holds; this call is also the replica's heartbeat. It applies the cancels the
board passes on (asked on another replica) and sends again in full, at the next
interval, what the board says it lacks. ``publish`` may also be called directly: the
replica does so before it answers a job submission, so that the job's id is known to
every replica before the client has it.

``call(method, *args)`` reaches the board (in a cluster: a Ray Serve deployment handle;
in tests: a ``JobBoard`` in the same process). A failing call is logged and retried at
the next interval; the jobs keep running.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..api.jobs import JobManager

log = logging.getLogger(__name__)

__all__ = ["JobSync"]

#: Longest time ``stop`` waits for the thread to hear it.
STOP_POLL_S = 0.25


class JobSync:
    def __init__(self, jobs: JobManager, call: Callable[..., Any], replica: str, *, interval: float = 0.5) -> None:
        self.jobs = jobs
        self.call = call
        self.replica = replica
        self.interval = interval
        self._lock = threading.Lock()               # one publication at a time
        self._sent: dict[str, tuple] = {}           # job id -> what its last published record showed
        self._results_sent: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="desam-job-sync", daemon=True)
        self.failures = 0

    def start(self) -> JobSync:
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def publish(self) -> None:
        """Publish what changed (and the heartbeat); apply the board's answer."""
        with self._lock:
            jobs = self.jobs.list()
            held = [job.id for job in jobs]
            records, results, signatures = [], {}, {}
            for job in jobs:
                signature = (job.state.value, job.done, job.error, job.cancel_requested.is_set(), len(job.slices))
                if self._sent.get(job.id) != signature:
                    records.append(job.to_json())
                    signatures[job.id] = signature
                if job.result is not None and job.id not in self._results_sent:
                    results[job.id] = job.result
            answer = self.call("publish", self.replica, records, results, held)
            self._sent = {job_id: sig for job_id, sig in {**self._sent, **signatures}.items() if job_id in held}
            self._results_sent = (self._results_sent | set(results)) & set(held)
            for job_id in answer["missing"]:        # the board restarted: everything again
                self._sent.pop(job_id, None)
                self._results_sent.discard(job_id)
        for job_id in answer["cancel"]:
            try:
                self.jobs.cancel(job_id)
            except Exception as exc:  # noqa: BLE001 - forgotten meanwhile: nothing to cancel
                log.debug("job %s: cancel from the board not applied (%s)", job_id[:8], exc)

    def _loop(self) -> None:
        seen = self.jobs.finished_count()
        beat = time.monotonic() + self.interval
        while not self._stop.is_set():
            # Wakes when a job finishes, so its end and result reach the board at once; in
            # short waits, so that ``stop`` is heard soon.
            finished = self.jobs.wait_for_finish(seen, min(STOP_POLL_S, max(beat - time.monotonic(), 0.0)))
            if self._stop.is_set():
                return
            if finished == seen and time.monotonic() < beat:
                continue
            seen, beat = finished, time.monotonic() + self.interval
            try:
                self.publish()
                self.failures = 0
            except Exception as exc:  # noqa: BLE001 - the board may be restarting; try again
                self.failures += 1
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("job board unreachable (%d time(s) in a row): %s", self.failures,
                                exc.__class__.__name__)
