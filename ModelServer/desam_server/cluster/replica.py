"""The Ray Serve application: ``build_application(settings, options)``.

Two deployments:

- ``DeSAM``: ``options.replicas`` replicas, each the service's own FastAPI app
  (``api.create_app``, the same routers, settings and token) behind ``serve.ingress``,
  with ``options.num_gpus`` GPUs (1: one replica per GPU; Ray sets ``CUDA_VISIBLE_DEVICES``
  so each sees its GPU as ``cuda``) and ``options.num_cpus`` CPUs. Each builds its
  ``Service`` in the app's lifespan, claims a feature-cache folder of its own on its node
  (``cache_slot``), publishes its jobs to the board (``job_sync``) and runs
  ``middleware.ReplicaMiddleware`` around the app (decoder-version sync, job publication
  on submission, the ``X-DeSAM-Replica`` header). The jobs router is ``job_routes.router`` (jobs of every
  replica).
- ``JobBoard``: one replica (no CPU reserved) holding the jobs every replica published
  (``job_board``).

Affinity is Ray Serve's consistent-hash request router (``ROUTER``): the client sends
the volume id in Ray's session header (``middleware.AFFINITY_HEADER``, ``x-session-id``),
and every proxy maps it to a replica on a hash ring of the running replicas (100 virtual
nodes each): the same volume always reaches the same replica, with no state to learn and
no race between proxies; when that replica refuses (``max_ongoing_requests`` reached) the
next one on the ring takes the request. Requests that name no volume (health, info, job
lookups) spread uniformly. A replica that dies hands its arc of the ring to its
neighbours; the replica Ray starts instead gets a new id and so a new arc (about 1/N of
all volumes move, their features are encoded again where they land). Model multiplexing
was tried first and left: a volume whose first two requests arrive within the ~0.1 s its
registration takes to reach the proxies is registered by two replicas, and its requests
then alternate between them for good (docs/CLUSTER.md).

Imports Ray: only ``cluster.run`` imports this module, lazily; the rest of the package
never needs Ray.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

from ray import serve

from ..api import Service, ServiceSettings, create_app
from ..api.app import build_service
from ..api.routers import ROUTERS
from ..api.routers import jobs as api_jobs
from . import job_routes
from .cache_slot import CacheSlot
from .job_board import JobBoard
from .job_sync import JobSync
from .middleware import ReplicaMiddleware
from .options import ClusterOptions

log = logging.getLogger(__name__)

__all__ = ["build_application", "DeSAMReplica", "ROUTER", "BOARD_CALL_TIMEOUT_S"]

#: Ray Serve's consistent-hash router (experimental in Ray 2.60, the pinned version).
ROUTER = "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
#: Longest wait for one call to the job board.
BOARD_CALL_TIMEOUT_S = 10.0


def _resolved_cache_device(settings: ServiceSettings) -> str:
    """The feature cache's device as this replica sees it (``device`` 'auto' was resolved on
    the machine that read the settings, which may have no GPU)."""
    if settings.device != "auto":
        return settings.cache.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@serve.ingress()
class DeSAMReplica:
    """One replica; ``board``: the ``JobBoard`` deployment's handle."""

    def __init__(self, settings: ServiceSettings, options: ClusterOptions, board) -> None:
        self.options = options
        self.board = board
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.slot = None
        cache = replace(settings.cache, device=_resolved_cache_device(settings))
        if settings.cache.directory is not None:
            self.slot = CacheSlot.claim(settings.cache.directory)
            cache = replace(cache, directory=self.slot.directory)
        self.settings = replace(settings, cache=cache)
        self.sync: JobSync | None = None
        log.info("replica %s (pid %d): feature cache slot %s", self.replica_id, os.getpid(),
                 None if self.slot is None else self.slot.number)

    def __serve_build_asgi_app__(self):
        routers = tuple(job_routes.router if router is api_jobs.router else router for router in ROUTERS)
        app = create_app(self.settings, service_factory=self._build_service, routers=routers)
        app.state.job_board = job_routes.BoardClient(self._board_call, settle_s=self.options.job_stale_s)
        app.state.replica = {"id": self.replica_id, "pid": os.getpid(),
                             "cache_slot": None if self.slot is None else self.slot.number}
        return ReplicaMiddleware(app, publish_jobs=self._publish_jobs, replica=self.replica_id)

    def _build_service(self, settings: ServiceSettings) -> Service:
        service = build_service(settings)
        self.sync = JobSync(service.jobs, self._board_call, self.replica_id,
                            interval=self.options.job_sync_interval_s).start()
        return service

    def _board_call(self, method: str, *args):
        """A call to the job board from a thread (never from the replica's event loop)."""
        return getattr(self.board, method).remote(*args).result(timeout_s=BOARD_CALL_TIMEOUT_S)

    def _publish_jobs(self) -> None:
        if self.sync is not None:
            self.sync.publish()

    def __del__(self) -> None:
        if self.sync is not None:
            self.sync.stop()
        if self.slot is not None:
            self.slot.release()


def build_application(settings: ServiceSettings, options: ClusterOptions):
    """The bound application (``serve.run`` deploys it)."""
    from ray.serve.config import RequestRouterConfig

    board = serve.deployment(JobBoard, name="JobBoard", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=1000).bind(stale_s=options.job_stale_s,
                                                             keep=options.jobs_kept)
    replica = serve.deployment(
        DeSAMReplica, name="DeSAM", num_replicas=options.replicas,
        ray_actor_options={"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        max_ongoing_requests=options.max_ongoing_requests,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
        health_check_period_s=options.health_check_period_s, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=35)
    return replica.bind(settings, options, board)
