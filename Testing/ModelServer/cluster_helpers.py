"""Helpers for the cluster tests and benchmark: a small local Ray instance on loopback
running ``desam-server cluster``'s application, raw requests that report which replica
answered, and the check that nothing Ray started outlives it."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import tempfile
import time
import urllib.parse

from desam_server.api import ServiceSettings
from desam_server.cluster import run as cluster_run
from desam_server.cluster.middleware import AFFINITY_HEADER, REPLICA_HEADER
from desam_server.cluster.options import ClusterOptions

#: Ray's own processes and object store, kept small (the machine has 2 cores, shared).
OBJECT_STORE_BYTES = 96 << 20


def processes_mentioning(text: str) -> list[int]:
    """Pids of the processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if text.encode() in handle.read():
                    found.append(int(entry))
    return found


@contextlib.contextmanager
def local_cluster(settings: ServiceSettings, options: ClusterOptions, *, num_cpus: int = 2):
    """Ray on loopback (``num_cpus`` CPUs, no dashboard) with the cluster application on
    ``settings``' port; yields its URL. Afterwards Serve and Ray are shut down and every
    process Ray started (found by its session folder, a fresh one under /tmp, short
    enough for Ray's socket paths) has exited; the folder is removed."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="dsr-")
    try:
        url = cluster_run.start(settings, options, num_cpus=num_cpus, object_store_memory=OBJECT_STORE_BYTES,
                                include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir,
                                configure_logging=False)
        yield url
    finally:
        with contextlib.suppress(Exception):
            cluster_run.stop()
        ray.shutdown()
        deadline = time.monotonic() + 30
        while processes_mentioning(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = processes_mentioning(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        if left:
            raise AssertionError(f"processes of the Ray session still running after shutdown: {left}")


def raw(url: str, method: str, path: str, body: dict | None = None, volume_id: str | None = None,
        timeout: float = 60.0) -> tuple[int, str, dict]:
    """One request on a fresh connection: (status, the replica that answered, JSON answer)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if volume_id:
        headers[AFFINITY_HEADER] = volume_id
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        response = conn.getresponse()
        data = response.read()
    finally:
        conn.close()
    try:
        answer = json.loads(data)
    except ValueError:
        answer = {"text": data.decode("utf-8", "replace")}
    return response.status, response.getheader(REPLICA_HEADER, ""), answer


def replica_states(app: str = "desam", deployment: str = "DeSAM") -> dict:
    """{state: count} of the deployment's replicas (Ray Serve's status)."""
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {str(getattr(state, "value", state)): count for state, count in status.replica_states.items()}


def wait_for_replicas(count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while replica_states().get("RUNNING", 0) != count or len(replica_states()) != 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"replicas not back to {count} running: {replica_states()}")
        time.sleep(0.25)
