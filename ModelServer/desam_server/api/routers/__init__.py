"""One router per resource: health, info, decoders, volumes, segment, jobs, training."""

from . import decoders, health, info, jobs, segment, training, volumes

ROUTERS = (health.router, info.router, decoders.router, volumes.router, segment.router, jobs.router,
           training.router)

__all__ = ["ROUTERS"]
