"""What a cluster replica does around every request: ``ReplicaMiddleware`` (plain ASGI).

- **Decoder versions**: before a request that may use or show a decoder, the decoder
  registry's fingerprint is compared (a few ``stat`` calls) and, when another replica or a
  training process changed the registry, this replica syncs (in a worker thread) before
  answering: an activation made through any replica is served by every replica from
  its next request on.
- **Job ids everywhere**: a job submission's answer is held until the replica has
  published the new job to the job board (``publish_jobs``), so the id the client gets is
  already known to every replica.
- Every answer carries ``X-DeSAM-Replica`` (the replica's id), for operators and tests.

Affinity itself needs nothing here: the proxies route on the volume id the client sends
in ``AFFINITY_HEADER`` (``replica``). Ray-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio

log = logging.getLogger(__name__)

__all__ = ["ReplicaMiddleware", "AFFINITY_HEADER", "REPLICA_HEADER"]

#: The header Ray Serve's proxies read the session id from (Ray's default,
#: ``RAY_SERVE_SESSION_ID_HEADER_KEY`` unset); the client sends a volume's id in it on
#: every request about that volume, and the consistent-hash router routes on it.
AFFINITY_HEADER = "x-session-id"
REPLICA_HEADER = "x-desam-replica"
_DECODER_PATHS = ("/segment", "/decoders", "/registry", "/info", "/training")
_JOB_SUBMISSIONS = ("/segment/auto", "/segment/propagate")


class ReplicaMiddleware:
    """``app``: the FastAPI app (``app.state.service`` is the running ``Service`` once its
    lifespan has started); ``publish_jobs()``: the replica's ``JobSync.publish`` (blocking;
    run in a thread); ``replica``: its id."""

    def __init__(self, app, *, publish_jobs: Callable[[], None], replica: str) -> None:
        self.app = app
        self.publish_jobs = publish_jobs
        self.replica = replica.encode("ascii")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        service = getattr(self.app.state, "service", None)
        if service is not None and path.startswith(_DECODER_PATHS) and service.versions.changed():
            await anyio.to_thread.run_sync(service.versions.sync_if_changed)
        submission = scope["method"] == "POST" and path in _JOB_SUBMISSIONS

        async def send_with_replica(message) -> None:
            if message["type"] == "http.response.start":
                if submission and message["status"] < 300:
                    try:
                        await anyio.to_thread.run_sync(self.publish_jobs)
                    except Exception as exc:  # noqa: BLE001 - the heartbeat publishes it later
                        log.warning("job board: the new job not published at once (%s)", exc.__class__.__name__)
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)]}
            await send(message)

        await self.app(scope, receive, send_with_replica)
