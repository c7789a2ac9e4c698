"""Labels of uploaded volumes (training data): store, list, fetch, delete (api/label_store.py)."""

from __future__ import annotations

import urllib.parse

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.concurrency import run_in_threadpool

from ..label_store import STRUCTURE_RE, STRUCTURE_RULE, check_structure
from ..schemas import LabelInfo, LabelList, errors
from .deps import get_service
from .jobs import MASK_RESPONSE
from .volumes import read_body

router = APIRouter(prefix="/volumes/{volume_id}/labels", tags=["labels"])

LABEL_BODY = {"requestBody": {
    "required": True,
    "description": "a wire mask payload (docs/WIRE_FORMAT.md) of the whole volume: axis 'k', offset 0, shape K x J x I "
                   "= the volume's; its volume_id, when present, is this volume's",
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary", "minLength": 1}}}}}

# The rule is the service's (a 422 that states it); the schema states it too, for clients and the fuzz.
Structure = Path(description=f"the structure's name: {STRUCTURE_RULE}",
                 json_schema_extra={"pattern": STRUCTURE_RE.pattern, "minLength": 1, "maxLength": 64})


@router.put("/{structure}", response_model=LabelInfo, status_code=201, openapi_extra=LABEL_BODY,
            responses={200: {"model": LabelInfo, "description": "the label replaced an earlier one"},
                       **errors(400, 401, 404, 413, 422, 503)})
async def put_label(volume_id: str, request: Request, response: Response, structure: str = Structure,
                    service=Depends(get_service)) -> LabelInfo:
    """Store the label of a structure for an uploaded volume (201; 200 when it replaces one).
    Refused: an unknown volume (404), a label of another shape or volume, or an empty one (422)."""
    body = await read_body(request, service.settings.max_upload_bytes, "a wire mask payload")
    info, created = await run_in_threadpool(service.put_label, volume_id, structure, body)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/volumes/{volume_id}/labels/{urllib.parse.quote(structure, safe='')}"
    return LabelInfo(**info.to_json())


@router.get("", response_model=LabelList, responses=errors(401, 404, 503))
def list_labels(volume_id: str, service=Depends(get_service)) -> LabelList:
    """The volume's labels: voxels, and per axis the slices containing each structure."""
    labels, available = service.list_labels(volume_id)
    return LabelList(volume_id=volume_id, volume_available=available,
                     labels=[LabelInfo(**info.to_json()) for info in labels])


@router.get("/{structure}", response_class=Response,
            responses={200: {**MASK_RESPONSE[200], "description": "the label: a wire mask payload, K x J x I, "
                                                                  "axis 'k', offset 0, with the volume's id"},
                       **errors(401, 404, 422, 503)})
def get_label(volume_id: str, structure: str = Structure, service=Depends(get_service)) -> Response:
    payload = service.labels.payload(volume_id, check_structure(structure))
    return Response(content=payload, media_type="application/octet-stream")


@router.delete("/{structure}", status_code=204, responses=errors(401, 404, 422, 503))
def delete_label(volume_id: str, structure: str = Structure, service=Depends(get_service)) -> Response:
    service.delete_label(volume_id, check_structure(structure))
    return Response(status_code=204)
