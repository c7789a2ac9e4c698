"""The running ``Service`` for a request (503 while starting or stopping)."""

from __future__ import annotations

from fastapi import Request

from ..errors import Unavailable
from ..service import Service


async def get_service(request: Request) -> Service:
    """Async, so FastAPI resolves it on the event loop instead of a thread-pool hop."""
    service = getattr(request.app.state, "service", None)
    if service is None or service.closed:
        raise Unavailable("the service is starting or stopping", retry_after=5)
    return service
