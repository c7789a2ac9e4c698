"""GET /decoders: the trained DeSAM decoders loaded (for the automatic modes)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..schemas import DecoderList, errors
from .deps import get_service

router = APIRouter(tags=["decoders"])


@router.get("/decoders", response_model=DecoderList, responses=errors(401, 503))
def list_decoders(service=Depends(get_service)) -> DecoderList:
    return DecoderList(decoders=service.decoders.describe())
