"""One router per resource: health, info, decoders, decoder registry, volumes, labels, segment, jobs,
training."""

from . import decoders, health, info, jobs, labels, registry, segment, training, volumes

ROUTERS = (health.router, info.router, decoders.router, registry.router, volumes.router, labels.router, segment.router,
           jobs.router, training.router)

__all__ = ["ROUTERS"]
