"""Jobs: list, status with progress, cancel, result (a wire mask slab)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response

from ..errors import Conflict
from ..schemas import JobInfo, JobList, errors
from .deps import get_service

router = APIRouter(prefix="/jobs", tags=["jobs"])

MASK_RESPONSE = {200: {"description": "a wire mask payload: N x H x W, offset = the first slice",
                       "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("", response_model=JobList, responses=errors(401, 503))
def list_jobs(service=Depends(get_service)) -> JobList:
    return JobList(jobs=[JobInfo(**job.to_json()) for job in service.jobs.list()])


@router.get("/{job_id}", response_model=JobInfo, responses=errors(401, 404, 503))
def get_job(job_id: str, service=Depends(get_service)) -> JobInfo:
    return JobInfo(**service.jobs.get(job_id).to_json())


@router.post("/{job_id}/cancel", response_model=JobInfo, responses=errors(401, 404, 503))
def cancel_job(job_id: str, service=Depends(get_service)) -> JobInfo:
    """Ask the job to stop (a running job stops before its next slice); idempotent."""
    return JobInfo(**service.jobs.cancel(job_id).to_json())


@router.get("/{job_id}/result", response_class=Response, responses={**MASK_RESPONSE, **errors(401, 404, 409, 503)})
def job_result(job_id: str, service=Depends(get_service)) -> Response:
    """The segmentation of the job's slice range; 409 until the job has succeeded."""
    job = service.jobs.get(job_id)
    if job.result is None:
        raise Conflict(f"job {job.id} is {job.state.value}: no result" + (f" ({job.error})" if job.error else ""))
    return Response(content=job.result, media_type="application/octet-stream")
