"""GET /info: device, precision, model and decoders, cache tiers, queues, limits."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request

from ... import __version__
from ..schemas import errors
from .deps import get_service

router = APIRouter(tags=["info"])


@router.get("/info", response_model=dict[str, Any], responses=errors(401, 503))
def info(request: Request, service=Depends(get_service)) -> dict[str, Any]:
    """What the service runs and how busy it is. No paths, no tokens, no patient data.
    ``replica``: in a cluster (``desam-server cluster``) the replica that answered (id,
    process id, feature-cache slot); null from ``desam-server serve``."""
    import torch

    return {"version": __version__, "torch": torch.__version__, "replica": request.app.state.replica,
            **service.info()}
