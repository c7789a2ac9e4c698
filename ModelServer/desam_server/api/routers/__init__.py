"""One router per resource: health, info, decoders, volumes, labels, segment, jobs."""

from . import decoders, health, info, jobs, labels, segment, volumes

ROUTERS = (health.router, info.router, decoders.router, volumes.router, labels.router, segment.router, jobs.router)

__all__ = ["ROUTERS"]
