"""How a cluster is laid out: ``ClusterOptions`` (the service's own settings stay
``api.ServiceSettings``, the same as ``serve``'s)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClusterOptions", "APP_NAME"]

#: The Ray Serve application's name.
APP_NAME = "desam"


@dataclass(frozen=True)
class ClusterOptions:
    """replicas: service replicas (one per GPU on a GPU cluster); num_gpus / num_cpus: what
    each replica reserves (1 GPU; fractions of a CPU in tests); address: the Ray cluster to
    join ('auto': the one ``ray start --head`` started on this node; an address
    'host:6379'; None: start a Ray instance for this process alone); max_ongoing_requests:
    requests a replica accepts at once before the proxies look elsewhere (the service
    queues its own work: clicks beyond ``max_pending_prompts`` get 429); job_stale_s:
    seconds without a heartbeat after which a replica's jobs read as failed;
    job_sync_interval_s: how often a replica publishes its jobs (its heartbeat);
    jobs_kept: finished jobs the board keeps; health_check_period_s: Ray Serve's
    health check of each replica."""

    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    address: str | None = None
    max_ongoing_requests: int = 64
    job_stale_s: float = 10.0
    job_sync_interval_s: float = 0.5
    jobs_kept: int = 256
    health_check_period_s: float = 5.0

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("num_gpus and num_cpus must not be negative")
        if self.max_ongoing_requests < 1 or self.jobs_kept < 1:
            raise ValueError("max_ongoing_requests and jobs_kept must be at least 1")
        if not (self.job_stale_s > 2 * self.job_sync_interval_s > 0):
            raise ValueError("job_stale_s must exceed two job_sync_interval_s (a replica is taken for dead "
                             "only after missing several heartbeats)")
        if not self.health_check_period_s > 0:
            raise ValueError("health_check_period_s must be > 0")
