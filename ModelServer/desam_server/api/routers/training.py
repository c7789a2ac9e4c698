"""Training jobs: start, list, status, log, metrics, cancel, and a server-sent event stream."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Query, Request, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from ..errors import NotFound
from ..schemas import TrainingJobInfo, TrainingJobList, TrainingLog, TrainingMetrics, TrainingRequest, errors
from ..training_jobs import ENDED_TRAINING, LOG_LINES
from .deps import get_service

router = APIRouter(prefix="/training", tags=["training"])

#: How often an event stream looks for new events, and how often it sends a keep-alive
#: comment when there is nothing to send.
EVENTS_POLL_S = 0.2
PING_S = 15
_ENDED = {state.value for state in ENDED_TRAINING}

EVENTS_RESPONSE = {200: {
    "description": "server-sent events (docs/API.md, 'Training events'): first 'status' (the job's status), then "
                   "'precompute', 'precomputed', 'data', 'start', 'step', 'epoch' as they happen, and last one of "
                   "'finished', 'failed', 'cancelled' (the final status, with its reason); ': ping' comments keep "
                   "the connection alive. Each data field is one JSON object whose 'event' names it.",
    "content": {"text/event-stream": {"schema": {
        "description": "one server-sent event", "type": "object", "required": ["event", "data", "id"],
        "properties": {"event": {"type": "string", "enum": [
                           "status", "data", "precompute", "precomputed", "start", "step", "epoch", "finished",
                           "failed", "cancelled"]},
                       "data": {"type": "string", "contentMediaType": "application/json",
                                "description": "a JSON object with the event's fields, 'event' among them"},
                       "id": {"type": "string", "pattern": "^[0-9]+$"}}}}}}}


def _info(status: dict) -> TrainingJobInfo:
    return TrainingJobInfo(**status)


@router.post("", status_code=202, response_model=TrainingJobInfo, responses=errors(400, 401, 404, 409, 422, 503))
def start_training(body: TrainingRequest, response: Response, service=Depends(get_service)) -> TrainingJobInfo:
    """Train a decoder for ``structure`` from uploaded volumes and their label volumes, in
    a process of the service's own (the service keeps answering clicks). 404: a volume or
    label the service does not hold; 422: a label that does not fit its volume, an empty
    label, a split or batch the cases cannot fill; 409: another training job is queued or
    running (its id is in the message), or the service's encoder has random weights."""
    options = body.options.model_dump()
    job = service.submit_training(body.structure, [case.model_dump() for case in body.cases], options)
    response.headers["Location"] = f"/training/{job.id}"
    return _info(service.training.status(job.id))


@router.get("", response_model=TrainingJobList, responses=errors(401, 503))
def list_training(service=Depends(get_service)) -> TrainingJobList:
    return TrainingJobList(jobs=[_info(service.training.status(job.id)) for job in service.training.list()])


@router.get("/{job_id}", response_model=TrainingJobInfo, responses=errors(401, 404, 503))
def get_training(job_id: str, service=Depends(get_service)) -> TrainingJobInfo:
    """State, phase, progress, the latest loss and validation Dice, the time left; the
    reason of a failed or cancelled job. For clients that cannot hold an event stream."""
    return _info(service.training.status(job_id))


@router.get("/{job_id}/log", response_model=TrainingLog, responses=errors(401, 404, 422, 503))
def training_log(job_id: str, lines: int = Query(100, ge=1, le=LOG_LINES, description="the last N lines"),
                 service=Depends(get_service)) -> TrainingLog:
    """The job's recent log lines (its process's and the service's notes on it)."""
    return TrainingLog(lines=service.training.log_lines(job_id, lines))


@router.get("/{job_id}/metrics", response_model=TrainingMetrics, responses=errors(401, 404, 503))
def training_metrics(job_id: str, service=Depends(get_service)) -> TrainingMetrics:
    """Per-epoch history: loss, validation Dice (overall and per volume), learning rate, timings."""
    return TrainingMetrics(epochs=service.training.metrics(job_id))


@router.post("/{job_id}/cancel", response_model=TrainingJobInfo, responses=errors(401, 404, 503))
def cancel_training(job_id: str, service=Depends(get_service)) -> TrainingJobInfo:
    """Ask the job to stop: its process stops before its next step and the job ends
    cancelled (killed if it has not stopped within the grace period); idempotent."""
    service.training.cancel(job_id)
    return _info(service.training.status(job_id))


def _event(seq: int, event: dict) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(event, allow_nan=False), event=event["event"], id=str(seq))


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses={**EVENTS_RESPONSE,
                                                                               **errors(401, 404, 503)})
async def training_events(job_id: str, request: Request, service=Depends(get_service)) -> EventSourceResponse:
    """The job's events as they happen, ending with its final state (a client that
    connects late gets the current status first, and a client that reconnects with
    ``Last-Event-ID`` the events it missed that are still kept)."""
    training = service.training
    seq, status = training.snapshot(job_id)
    resume = request.headers.get("last-event-id", "")
    start = int(resume) if resume.isdigit() and int(resume) <= seq else seq

    async def stream():
        yield _event(seq, {"event": "status", **status})
        if status["state"] in _ENDED:
            yield _event(seq, {"event": status["state"], **status})
            return
        last = start
        while True:
            try:
                new, ended = training.events_after(job_id, last)
            except NotFound:            # forgotten meanwhile (many newer jobs ended)
                return
            for n, event in new:
                yield _event(n, event)
                last = n
                if event["event"] in _ENDED:
                    return
            if ended is not None:       # the final event fell out of the kept ones
                yield _event(last, {"event": ended["state"], **ended})
                return
            await asyncio.sleep(EVENTS_POLL_S)

    return EventSourceResponse(stream(), ping=PING_S)
