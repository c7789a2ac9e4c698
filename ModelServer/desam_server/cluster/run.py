"""Starting and stopping the cluster: ``start``, ``stop`` and ``desam-server cluster``.

``start(settings, options)`` joins (or starts) Ray, starts Ray Serve's HTTP proxies on the
settings' host and port (with the settings' TLS certificate and key: the proxies speak
https), and deploys ``replica.build_application``; it returns once every replica has
loaded its model and answers. ``stop()`` removes Serve and its application.

Ray is imported here, inside the functions: ``desam-server serve`` and every import of
the package work without it (the ``cluster`` extra installs it).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING

from .options import APP_NAME, ClusterOptions

if TYPE_CHECKING:
    from ..api import ServiceSettings

log = logging.getLogger("desam_server")

__all__ = ["start", "stop", "add_cluster_args", "cmd_cluster", "http_options"]


def _require_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("desam-server cluster needs Ray Serve: pip install 'desam-server[cluster]' "
                         "(ray[serve], pinned in ModelServer/pyproject.toml)") from None
    return ray, serve


def http_options(settings: ServiceSettings) -> dict:
    """Ray Serve's proxy options from the service's settings (host, port, TLS)."""
    options = {"host": settings.host, "port": settings.port}
    if settings.tls:
        options.update(ssl_certfile=str(settings.tls_certfile), ssl_keyfile=str(settings.tls_keyfile))
    return options


def _check_session_header() -> None:
    """The client sends the volume id in ``x-session-id``, Ray's default session header; a
    cluster told to read another header would route every request at random."""
    from .middleware import AFFINITY_HEADER

    configured = os.environ.get("RAY_SERVE_SESSION_ID_HEADER_KEY", AFFINITY_HEADER)
    if configured.lower().replace("-", "_") != AFFINITY_HEADER.replace("-", "_"):
        raise SystemExit(f"RAY_SERVE_SESSION_ID_HEADER_KEY is {configured!r}: the DeSAM client sends the volume id "
                         f"in {AFFINITY_HEADER!r} (Ray's default); unset the variable")


def start(settings: ServiceSettings, options: ClusterOptions, **init_kwargs) -> str:
    """Deploy the service on Ray Serve; its URL. ``init_kwargs`` go to ``ray.init`` when
    this process is not connected to Ray yet (tests: a small local instance)."""
    ray, serve = _require_ray()
    from .replica import build_application

    _check_session_header()
    if not ray.is_initialized():
        ray.init(address=options.address, **init_kwargs)
    serve.start(http_options=http_options(settings))
    serve.run(build_application(settings, options), name=APP_NAME, route_prefix="/")
    scheme = "https" if settings.tls else "http"
    log.info("DeSAM cluster: %d replica(s) at %s://%s:%d", options.replicas, scheme, settings.host, settings.port)
    return f"{scheme}://{settings.host}:{settings.port}"


def stop() -> None:
    """Remove the application and Serve (proxies, controller) from the Ray cluster."""
    _, serve = _require_ray()
    serve.shutdown()


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicas", type=int, default=None,
                   help="service replicas (default: one per GPU of the Ray cluster, else 1)")
    p.add_argument("--gpus-per-replica", type=float, default=None,
                   help="GPUs each replica reserves (default 1 when the Ray cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs each replica reserves (default 1)")
    p.add_argument("--address", default=None,
                   help="the Ray cluster to join: 'auto' (started with `ray start --head` on this node) or "
                        "HOST:PORT; default: a Ray instance for this command alone")
    p.add_argument("--job-stale-s", type=float, default=10.0,
                   help="seconds without a heartbeat after which a replica's jobs read as failed (default 10)")


def _options(args: argparse.Namespace, ray) -> ClusterOptions:
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_replica = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if gpus else 0.0)
    replicas = args.replicas
    if replicas is None:
        replicas = max(1, int(gpus // per_replica)) if per_replica else 1
    return ClusterOptions(replicas=replicas, num_gpus=per_replica, num_cpus=args.cpus_per_replica,
                          address=args.address, job_stale_s=args.job_stale_s)


def cmd_cluster(args: argparse.Namespace) -> int:
    from ..serve import settings_from_args

    settings = settings_from_args(args)
    settings.check_bind()
    logging.getLogger().setLevel(settings.log_level.upper())
    ray, serve = _require_ray()
    _check_session_header()
    try:
        ray.init(address=args.address)
    except (ConnectionError, RuntimeError) as exc:
        raise SystemExit(f"desam-server cluster: cannot join the Ray cluster at {args.address!r}: {exc} "
                         "(start it with `ray start --head`, or leave --address out for a local one)") from None
    try:
        options = _options(args, ray)
    except ValueError as exc:
        raise SystemExit(f"desam-server cluster: {exc}") from None
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        url = start(settings, options)
        print(f"DeSAM service: {options.replicas} replica(s) on {url} (Ctrl-C stops them)", flush=True)
        while not stopping.wait(1.0):
            pass
    finally:
        log.info("stopping the DeSAM cluster application")
        stop()
        ray.shutdown()
    return 0
