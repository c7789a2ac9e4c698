"""Volumes: upload once (content-addressed), look up, delete; view hint, precompute, progress."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from ..errors import BadRequest, PayloadTooLarge
from ..schemas import (
    MIN_VOLUME_PAYLOAD_BYTES,
    Axis,
    PrecomputeRequest,
    Progress,
    ViewRequest,
    VolumeInfo,
    VolumeList,
    WindowQuery,
    errors,
)
from .deps import get_service

router = APIRouter(prefix="/volumes", tags=["volumes"])

VOLUME_BODY = {"requestBody": {
    "required": True, "description": "a wire volume payload (docs/WIRE_FORMAT.md)",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary",
                                                        "minLength": MIN_VOLUME_PAYLOAD_BYTES}}}}}


async def read_body(request: Request, limit: int, what: str = "a wire volume payload") -> bytes:
    """The whole request body, refused (413) as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise BadRequest("Content-Length must be a number of bytes")
        if int(declared) > limit:
            raise PayloadTooLarge(f"body of {declared} bytes exceeds the limit of {limit} bytes (max_upload_bytes)")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (max_upload_bytes)")
            chunks.append(chunk)
    except ClientDisconnect:
        raise BadRequest("the client went away during the upload; nothing was stored") from None
    if not size:
        raise BadRequest(f"empty body: send {what}")
    return b"".join(chunks)


@router.post("", status_code=201, response_model=VolumeInfo, openapi_extra=VOLUME_BODY,
             responses={200: {"model": VolumeInfo, "description": "the service already had this volume"},
                        **errors(400, 401, 413, 422, 503)})
async def upload_volume(request: Request, response: Response, service=Depends(get_service)) -> VolumeInfo:
    """Store a volume; its id is the content hash of voxels + geometry (``wire.volume_id``).
    201 when new, 200 when the service had it already. Nothing is stored unless the whole
    payload arrived and passed every check."""
    body = await read_body(request, service.settings.max_upload_bytes)
    info, created = await run_in_threadpool(service.upload, body)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/volumes/{info['volume_id']}"
    return VolumeInfo(**info)


@router.get("", response_model=VolumeList, responses=errors(401, 503))
def list_volumes(service=Depends(get_service)) -> VolumeList:
    return VolumeList(volumes=service.store.ids())


@router.get("/{volume_id}", response_model=VolumeInfo, responses=errors(401, 404, 503))
def get_volume(volume_id: str, service=Depends(get_service)) -> VolumeInfo:
    """Shape and geometry; 404 when the service does not hold the volume (upload it)."""
    return VolumeInfo(**service.store.describe(volume_id))


@router.delete("/{volume_id}", status_code=204, responses=errors(401, 404, 503))
def delete_volume(volume_id: str, service=Depends(get_service)) -> Response:
    """Forget the volume (memory and disk) and cancel its jobs."""
    service.delete_volume(volume_id)
    return Response(status_code=204)


@router.put("/{volume_id}/view", response_model=Progress, responses=errors(400, 401, 404, 422, 503))
def set_view(volume_id: str, body: ViewRequest, service=Depends(get_service)) -> Progress:
    """The slice the user is looking at: encoded first, then its neighbours outward;
    queued work around the previous view is dropped."""
    window = body.window.model_dump() if body.window else None
    return Progress(**service.view(volume_id, body.axis, body.index, window, decoder=body.decoder))


@router.post("/{volume_id}/precompute", status_code=202, response_model=Progress,
             responses=errors(400, 401, 404, 422, 503))
def precompute(volume_id: str, body: PrecomputeRequest, service=Depends(get_service)) -> Progress:
    """Encode every slice of the axis in the background (or withdraw that work)."""
    window = body.window.model_dump() if body.window else None
    return Progress(**service.precompute(volume_id, body.axis, window, cancel=body.cancel, decoder=body.decoder))


@router.get("/{volume_id}/progress", response_model=Progress, responses=errors(400, 401, 404, 422, 503))
def progress(volume_id: str, axis: Axis = "k",
             window: WindowQuery | None = Query(None, description="the intensity window as center, then width: "
                                                "window=40&window=400 (default: the volume's default window)"),
             center: float | None = Query(None, allow_inf_nan=False, include_in_schema=False),
             width: float | None = Query(None, gt=0, allow_inf_nan=False, include_in_schema=False),
             decoder: str | None = Query(None, max_length=64, description="the model whose encoder's features to "
                                         "count (default: the service's encoder)"),
             service=Depends(get_service)) -> Progress:
    """How many slices of the axis are cached, queued and running for a window.

    ``center`` and ``width`` as two parameters are the deprecated form of ``window`` (kept for
    clients of earlier versions; not in the schema, which cannot say that they go together)."""
    if center is not None or width is not None:
        if window is not None:
            raise BadRequest("give window, or the deprecated center and width, not both")
        if center is None or width is None:
            raise BadRequest("give both center and width, or neither (better: window=<center>&window=<width>)")
        window = (center, width)
    return Progress(**service.progress(volume_id, axis, None if window is None else
                                       {"center": window[0], "width": window[1]}, decoder=decoder))
