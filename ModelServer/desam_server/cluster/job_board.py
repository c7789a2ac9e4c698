"""The cluster's shared record of segmentation jobs: ``JobBoard``.

A job runs on the replica that accepted it (its ``api.jobs.JobManager``); the board holds
what every replica published about its jobs, so that any replica can answer ``GET
/jobs/{id}``, a cancel and the result (``job_routes``). In a cluster the board runs as a
Ray Serve deployment of one replica (``replica.build_application``); this class is plain
Python and knows nothing of Ray.

- ``publish`` (each replica's ``JobSync``, every ``interval`` seconds, also with nothing new:
  it is the replica's heartbeat) takes the job records that changed, the results of jobs
  that succeeded, and the ids the replica holds; it answers the cancels asked for on
  other replicas and the ids the board does not know (after a restart of the board: the
  replica sends them again in full).
- A replica silent for ``stale_s`` seconds is taken for dead (Ray restarts it under a new
  id, without its jobs): its queued and running jobs then read as failed with ``LOST``, for
  good, so a client polling such a job gets a clear end instead of a job that never moves.
- Finished jobs are kept until ``keep`` newer ones have finished (results included).
- ``publications(job_id)`` counts the publications of the job's replica: a replica asked
  for the result of a job the board shows as active waits for the next publications of
  its owner (``job_routes``), which publishes as soon as a job finishes (``job_sync``).

Time is the board's own monotonic clock, so clocks of different nodes never meet.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

__all__ = ["JobBoard", "LOST", "ACTIVE_STATES"]

#: The error of a job whose replica stopped while it was queued or running.
LOST = ("the replica running this job stopped (Ray restarts it, without its jobs): "
        "submit the job again")
ACTIVE_STATES = ("queued", "running")


@dataclass
class _Entry:
    owner: str
    record: dict
    result: bytes | None = field(default=None, repr=False)
    cancel: bool = False
    finished: bool = False


class JobBoard:
    """``stale_s``: seconds without a heartbeat after which a replica's active jobs read as
    failed; ``keep``: finished jobs remembered."""

    def __init__(self, stale_s: float = 10.0, keep: int = 256) -> None:
        if not stale_s > 0 or keep < 1:
            raise ValueError("stale_s must be > 0 and keep >= 1")
        self.stale_s = float(stale_s)
        self.keep = int(keep)
        self._lock = threading.Lock()
        self._jobs: dict[str, _Entry] = {}
        self._seen: dict[str, float] = {}                  # replica -> its last heartbeat
        self._publications: dict[str, int] = {}            # replica -> its publications so far
        self._finished: collections.deque[str] = collections.deque()

    # ---- replicas -------------------------------------------------------------------------------
    def publish(self, replica: str, records: list[dict], results: dict[str, bytes], held: list[str]) -> dict:
        """A replica's heartbeat with its changed job records, new results and the ids it
        holds; ``{"cancel": [...], "missing": [...]}``."""
        with self._lock:
            self._seen[replica] = time.monotonic()
            self._publications[replica] = self._publications.get(replica, 0) + 1
            for record in records:
                entry = self._jobs.get(record["id"])
                if entry is None:
                    entry = self._jobs[record["id"]] = _Entry(replica, record)
                elif entry.finished and entry.record["state"] == "failed" and entry.record["error"] == LOST:
                    continue                                  # declared lost: stays so
                entry.owner, entry.record = replica, record
                if record["state"] not in ACTIVE_STATES:
                    self._mark_finished(record["id"], entry)
            for job_id, data in results.items():
                if job_id in self._jobs:
                    self._jobs[job_id].result = data
            cancel = [job_id for job_id in held if job_id in self._jobs and self._jobs[job_id].cancel
                      and self._jobs[job_id].record["state"] in ACTIVE_STATES
                      and not self._jobs[job_id].record.get("cancel_requested")]
            missing = [job_id for job_id in held if job_id not in self._jobs]
        return {"cancel": cancel, "missing": missing}

    # ---- any replica ----------------------------------------------------------------------------
    def get(self, job_id: str) -> dict | None:
        with self._lock:
            entry = self._jobs.get(job_id)
            return None if entry is None else self._current(job_id, entry)

    def publications(self, job_id: str) -> int | None:
        """How many times the job's replica has published so far (None: unknown job)."""
        with self._lock:
            entry = self._jobs.get(job_id)
            return None if entry is None else self._publications.get(entry.owner, 0)

    def list(self) -> list[dict]:
        with self._lock:
            return sorted((self._current(job_id, entry) for job_id, entry in list(self._jobs.items())),
                          key=lambda record: record["created"])

    def cancel(self, job_id: str) -> dict | None:
        """Ask the job's replica to cancel it (at its next heartbeat); the record as the
        client will see it, or None for an unknown job."""
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return None
            record = self._current(job_id, entry)
            if record["state"] in ACTIVE_STATES:
                entry.cancel = True
                record = {**record, "cancel_requested": True}
            return record

    def result(self, job_id: str) -> bytes | None:
        with self._lock:
            entry = self._jobs.get(job_id)
            return None if entry is None else entry.result

    def stats(self) -> dict:
        with self._lock:
            now = time.monotonic()
            return {"jobs": len(self._jobs), "finished_kept": len(self._finished), "keep": self.keep,
                    "stale_s": self.stale_s,
                    "replicas": {replica: round(now - seen, 3) for replica, seen in sorted(self._seen.items())}}

    # ---- internals (under the lock) ---------------------------------------------------------------
    def _current(self, job_id: str, entry: _Entry) -> dict:
        """The record, or its lost form when its replica stopped sending heartbeats."""
        if entry.record["state"] in ACTIVE_STATES:
            seen = self._seen.get(entry.owner)
            if seen is None or time.monotonic() - seen > self.stale_s:
                entry.record = {**entry.record, "state": "failed", "error": LOST, "finished": time.time(),
                                "result_available": False}
                self._mark_finished(job_id, entry)
        return dict(entry.record)

    def _mark_finished(self, job_id: str, entry: _Entry) -> None:
        if entry.finished:
            return
        entry.finished = True
        self._finished.append(job_id)
        while len(self._finished) > self.keep:
            self._jobs.pop(self._finished.popleft(), None)
