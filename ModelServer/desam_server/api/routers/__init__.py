"""One router per resource: health, info, decoders, volumes, segment, jobs."""

from . import decoders, health, info, jobs, segment, volumes

ROUTERS = (health.router, info.router, decoders.router, volumes.router, segment.router, jobs.router)

__all__ = ["ROUTERS"]
