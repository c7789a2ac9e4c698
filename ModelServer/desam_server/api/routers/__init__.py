"""One router per resource: health, info, decoders, decoder registry, volumes, segment, jobs."""

from . import decoders, health, info, jobs, registry, segment, volumes

ROUTERS = (health.router, info.router, decoders.router, registry.router, volumes.router, segment.router, jobs.router)

__all__ = ["ROUTERS"]
