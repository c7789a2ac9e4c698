"""One router per resource: health, info, decoders, decoder registry, volumes, labels, segment, jobs."""

from . import decoders, health, info, jobs, labels, registry, segment, volumes

ROUTERS = (health.router, info.router, decoders.router, registry.router, volumes.router, labels.router, segment.router,
           jobs.router)

__all__ = ["ROUTERS"]
