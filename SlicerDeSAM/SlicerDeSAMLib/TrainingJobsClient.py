"""The training-job part of ``ServerClient``: start, follow (polling or server-sent
events), cancel.

``TrainingJobsClient`` is a base class of ``ServerClient`` and uses its transport
(``_json``, ``_new_connection``, ``_headers``, ``_error``, ``_base``, ``url``); it is not
used on its own. Standard library only, like ``ServerClient``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from .ServerError import ServerError

__all__ = ["TrainingJobsClient", "parse_event_stream", "TRAINING_FINAL_EVENTS"]

#: The events that end a training job's event stream (its final state).
TRAINING_FINAL_EVENTS = ("finished", "failed", "cancelled")


def parse_event_stream(lines: Iterable[bytes | str]) -> Iterator[dict]:
    """Server-sent events (the WHATWG format) from the stream's lines: one dict per event,
    its ``data`` parsed as JSON (an object; other data comes as ``{"data": ...}``), with
    ``event`` (default 'message') and ``id`` (the last one seen) set. Comment lines
    (keep-alive pings) and ``retry`` fields are skipped."""
    event, data, last_id = None, [], None
    for raw in lines:
        line = (raw.decode("utf-8") if isinstance(raw, bytes) else raw).rstrip("\r\n")
        if not line:
            if data:
                text = "\n".join(data)
                try:
                    item = json.loads(text)
                except ValueError:
                    item = text
                item = dict(item) if isinstance(item, dict) else {"data": item}
                item.setdefault("event", event or "message")
                item["id"] = last_id
                yield item
            event, data = None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value


class TrainingJobsClient:
    """The ``/training`` endpoints (``ServerClient`` inherits them)."""

    def start_training(self, structure: str, cases: Sequence, options: dict | None = None) -> dict:
        """Start training a decoder for ``structure``. ``cases``: (volume_id, label
        structure) pairs or ``{"volume_id", "structure"}`` dicts of uploaded volumes with
        uploaded label volumes; ``options``: training options (docs/API.md). Returns the
        job's status (``id``); 409 while another training job is active."""
        refs = [dict(c) if isinstance(c, dict) else {"volume_id": c[0], "structure": c[1]} for c in cases]
        body = {"structure": structure, "cases": refs}
        if options is not None:
            body["options"] = options
        return self._json("POST", "/training", body)

    def training_jobs(self) -> list[dict]:
        return self._json("GET", "/training")["jobs"]

    def training_job(self, job_id: str) -> dict:
        return self._json("GET", f"/training/{job_id}")

    def training_log(self, job_id: str, lines: int = 100) -> list[str]:
        return self._json("GET", f"/training/{job_id}/log?lines={int(lines)}")["lines"]

    def training_metrics(self, job_id: str) -> list[dict]:
        """One entry per finished epoch (loss, validation_dice, ...)."""
        return self._json("GET", f"/training/{job_id}/metrics")["epochs"]

    def cancel_training(self, job_id: str) -> dict:
        return self._json("POST", f"/training/{job_id}/cancel")

    def training_events(self, job_id: str, *, timeout: float = 60.0) -> Iterator[dict]:
        """The job's server-sent events as dicts (``event``: 'status' first, then
        'precompute', 'start', 'step', 'epoch', ..., last 'finished', 'failed' or
        'cancelled', after which the iteration ends). A connection of its own; ``timeout``:
        the longest silence (the service pings every 15 s)."""
        conn = self._new_connection(timeout)
        path = f"/training/{job_id}/events"
        headers = self._headers("text/event-stream")
        try:
            try:
                conn.request("GET", self._base + path, headers=headers)
                response = conn.getresponse()
            except TimeoutError:
                raise ServerError(0, f"no answer within {timeout:g} s", method="GET", path=path) from None
            except OSError as exc:
                raise ServerError(0, f"cannot reach the service at {self.url}: {exc}", method="GET",
                                  path=path) from None
            if response.status >= 400:
                raise self._error(response, response.read(), "GET", path)
            lines = iter(response.readline, b"")
            try:
                for event in parse_event_stream(lines):
                    yield event
                    if event["event"] in TRAINING_FINAL_EVENTS:
                        return
            except TimeoutError:
                raise ServerError(0, f"the event stream was silent for {timeout:g} s", method="GET",
                                  path=path) from None
            raise ServerError(0, "the event stream ended before the job's final event", method="GET", path=path)
        finally:
            conn.close()

    def wait_training(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0,
                      on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll the job's status until it has ended (for callers that cannot hold a stream)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.training_job(job_id)
            if on_progress is not None:
                on_progress(job)
            if job["state"] not in ("queued", "running"):
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training job {job_id[:8]} still {job['state']} after {timeout} s")
            time.sleep(poll)
