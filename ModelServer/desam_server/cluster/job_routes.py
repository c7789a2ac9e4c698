"""The jobs routes of a cluster replica: the same paths, models and answers as
``api.routers.jobs``, for the jobs of every replica.

A job this replica runs is answered from its own ``JobManager`` (the freshest state);
any other from the job board (``job_board``), where every replica publishes its jobs
(``job_sync``): the record, the result of a job that succeeded, and a cancel, which the
board passes to the job's replica at its next heartbeat. A job whose replica stopped
reads as failed (``job_board.LOST``). The board is reached through ``app.state.job_board``
(a ``BoardClient``); when it cannot be reached the answer is a 503 with Retry-After.

The board lags the job's replica by one publication (``job_sync`` publishes as soon as a
job finishes): a client that saw a job succeed on its replica may ask another one for the
result before the board has it. So the result of a job the board shows as queued or
running is answered only after two more publications of the job's replica (the second
was taken after the request arrived) or its end, whichever comes first; a job still
running then gets the 409 it would get from its own replica.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request, Response

from ..api.errors import Conflict, NotFound, Unavailable
from ..api.routers.deps import get_service
from ..api.routers.jobs import MASK_RESPONSE
from ..api.schemas import JobInfo, JobList, errors
from .job_board import ACTIVE_STATES

__all__ = ["BoardClient", "router"]

router = APIRouter(prefix="/jobs", tags=["jobs"])


class BoardClient:
    """The board's reading side for request handlers: ``call(method, *args)`` reaches it;
    any failure becomes a 503 (the board is restarting, or its node is gone).
    ``settle_s``: the longest wait for a job's replica to publish (the cluster's
    ``job_stale_s``: by then it has published or its jobs read as lost)."""

    def __init__(self, call: Callable[..., Any], *, settle_s: float = 10.0, poll_s: float = 0.05) -> None:
        self._call = call
        self.settle_s = settle_s
        self.poll_s = poll_s

    def __call__(self, method: str, *args: Any) -> Any:
        try:
            return self._call(method, *args)
        except Exception:  # noqa: BLE001 - any transport or actor error: the board is not there now
            raise Unavailable("the cluster's job board cannot be reached now; try again", retry_after=2) from None


def get_board(request: Request) -> BoardClient:
    return request.app.state.job_board


def _unknown(job_id: str) -> NotFound:
    return NotFound(f"unknown job {job_id[:32]!r} on every replica (finished jobs are forgotten after newer ones)")


def _settled(board: BoardClient, job_id: str, record: dict) -> dict:
    """The board's record of a job of another replica once it shows what that replica knew
    when the request arrived (see the module's docstring)."""
    if record["state"] not in ACTIVE_STATES:
        return record
    first = board("publications", job_id)
    deadline = time.monotonic() + board.settle_s
    while record["state"] in ACTIVE_STATES and time.monotonic() < deadline:
        if first is None or (board("publications", job_id) or 0) >= first + 2:
            break
        time.sleep(board.poll_s)
        record = board("get", job_id) or record
    return record


def _local(service, job_id: str):
    try:
        return service.jobs.get(job_id)
    except NotFound:
        return None


@router.get("", response_model=JobList, responses=errors(401, 503))
def list_jobs(service=Depends(get_service), board: BoardClient = Depends(get_board)) -> JobList:
    records = {record["id"]: record for record in board("list")}
    records.update({job.id: job.to_json() for job in service.jobs.list()})
    return JobList(jobs=[JobInfo(**record) for record in sorted(records.values(), key=lambda r: r["created"])])


@router.get("/{job_id}", response_model=JobInfo, responses=errors(401, 404, 503))
def get_job(job_id: str, service=Depends(get_service), board: BoardClient = Depends(get_board)) -> JobInfo:
    job = _local(service, job_id)
    if job is not None:
        return JobInfo(**job.to_json())
    record = board("get", job_id)
    if record is None:
        raise _unknown(job_id)
    return JobInfo(**record)


@router.post("/{job_id}/cancel", response_model=JobInfo, responses=errors(401, 404, 503))
def cancel_job(job_id: str, service=Depends(get_service), board: BoardClient = Depends(get_board)) -> JobInfo:
    """Ask the job to stop (a running job stops before its next slice; a job of another
    replica at that replica's next heartbeat); idempotent."""
    if _local(service, job_id) is not None:
        return JobInfo(**service.jobs.cancel(job_id).to_json())
    record = board("cancel", job_id)
    if record is None:
        raise _unknown(job_id)
    return JobInfo(**record)


@router.get("/{job_id}/result", response_class=Response, responses={**MASK_RESPONSE, **errors(401, 404, 409, 503)})
def job_result(job_id: str, service=Depends(get_service), board: BoardClient = Depends(get_board)) -> Response:
    """The segmentation of the job's slice range; 409 until the job has succeeded."""
    job = _local(service, job_id)
    if job is not None:
        state, error, data = job.state.value, job.error, job.result
    else:
        record = board("get", job_id)
        if record is None:
            raise _unknown(job_id)
        record = _settled(board, job_id, record)
        state, error = record["state"], record["error"]
        data = board("result", job_id) if state == "succeeded" else None
    if data is None:
        raise Conflict(f"job {job_id} is {state}: no result" + (f" ({error})" if error else ""))
    return Response(content=data, media_type="application/octet-stream")
