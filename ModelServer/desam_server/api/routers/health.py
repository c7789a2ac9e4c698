"""GET /health: the process is up and its model is loaded."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ... import __version__
from ..schemas import Health, errors
from .deps import get_service

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, responses=errors(401, 503))
def health(service=Depends(get_service)) -> Health:
    """200 once the model is loaded and the service accepts work; 503 while it starts or stops."""
    return Health(status="ok", version=__version__)
