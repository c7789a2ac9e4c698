"""The decoder registry: structures and their versions, each version's training record and
curve; activate, roll back (served at once, without a restart), delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Response

from ..schemas import (
    STRUCTURE_PATTERN,
    VERSION_PATTERN,
    ActivateRequest,
    DecoderRecord,
    RegistryList,
    RegistryStructure,
    errors,
)
from .deps import get_service

router = APIRouter(prefix="/registry", tags=["registry"])

Structure = Annotated[str, Path(pattern=STRUCTURE_PATTERN, description="structure (= decoder) name")]
Version = Annotated[str, Path(pattern=VERSION_PATTERN, description="version, e.g. v2")]

PNG_RESPONSE = {200: {"description": "the training curve (loss and validation Dice per epoch)",
                      "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}}}


@router.get("", response_model=RegistryList, responses=errors(401, 409, 503))
def list_structures(service=Depends(get_service)) -> RegistryList:
    """Every structure with its versions, the active one and the one this service serves
    (409 when the service runs without a registry)."""
    return RegistryList(structures=service.versions.structures())


@router.get("/{structure}", response_model=RegistryStructure, responses=errors(401, 404, 409, 422, 503))
def get_structure(structure: Structure, service=Depends(get_service)) -> RegistryStructure:
    return RegistryStructure(**service.versions.structure(structure))


@router.put("/{structure}/active", response_model=RegistryStructure,
            responses=errors(400, 401, 404, 409, 422, 503))
def activate(structure: Structure, body: ActivateRequest, service=Depends(get_service)) -> RegistryStructure:
    """Make ``version`` the active version and serve it under the structure's name at once:
    new requests get it, requests already running (a click, an automatic job) finish on the
    version they started with. 409, with nothing changed, when the version does not fit the
    service's model (another encoder or encoder weights) or a decoder file given at start
    has the structure's name."""
    return RegistryStructure(**service.versions.activate(structure, body.version))


@router.post("/{structure}/rollback", response_model=RegistryStructure, responses=errors(401, 404, 409, 422, 503))
def rollback(structure: Structure, service=Depends(get_service)) -> RegistryStructure:
    """Back to the version that was active before the present one, served at once (409 when
    there is none)."""
    return RegistryStructure(**service.versions.rollback(structure))


@router.get("/{structure}/versions/{version}", response_model=DecoderRecord,
            responses=errors(401, 404, 409, 422, 503))
def get_version(structure: Structure, version: Version, service=Depends(get_service)) -> DecoderRecord:
    """The version and its training record (the decoder file's metadata)."""
    return DecoderRecord(**service.versions.record(structure, version))


@router.get("/{structure}/versions/{version}/curve", response_class=Response,
            responses={**PNG_RESPONSE, **errors(401, 404, 409, 422, 503)})
def get_curve(structure: Structure, version: Version, service=Depends(get_service)) -> Response:
    """The version's training-curve PNG (404 when it was registered without one)."""
    return Response(content=service.versions.curve(structure, version), media_type="image/png")


@router.delete("/{structure}/versions/{version}", status_code=204, responses=errors(401, 404, 409, 422, 503))
def delete_version(structure: Structure, version: Version, service=Depends(get_service)) -> Response:
    """Delete a version. The active version is refused (409) while the structure has other
    versions (activate another or roll back first); deleting the only version removes the
    structure, which the service then stops serving."""
    service.versions.delete(structure, version)
    return Response(status_code=204)
