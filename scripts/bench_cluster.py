"""The service as Ray Serve replicas (``desam-server cluster``) on this machine, MobileSAM
(pretrained, CPU), driven through ``ServerClient``; prints numbers and writes JSON.

1. The proxy's cost per click: the same click on a cached slice, alternated between the
   cluster (1 replica, 2 CPUs) and a plain ``desam-server serve`` child (uvicorn), side by
   side in one run; client round trip and the service's own ``timing.total_s``.
2. Affinity: 2 replicas (1 CPU each), several volumes, a fixed shuffled sequence of clicks
   (each slice clicked ``--repeats`` times), with the volume id sent in the routing header
   and without it (fresh volumes for each run, so nothing is cached before): the feature
   cache's hit rate (``timing.cached``) and the click latency.
3. 8 concurrent clients, each clicking its own cached slice: 1 replica (2 CPUs) against 2
   replicas (1 CPU each): clicks per second and latency.

Scheduler neighbours are 0 (a click encodes only its own slice), so hits count routing
alone. Usage: ``python scripts/bench_cluster.py [--json out/bench_cluster.json]``; the
MobileSAM weights must be in the cache (``desam-server fetch-weights mobile_sam``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "ModelServer"), str(ROOT / "SlicerDeSAM"), str(ROOT / "Testing" / "ModelServer")]

from cluster_helpers import local_cluster  # noqa: E402

from desam_server.api import ServiceSettings  # noqa: E402
from desam_server.cluster import run as cluster_run  # noqa: E402
from desam_server.cluster.options import ClusterOptions  # noqa: E402
from SlicerDeSAMLib.ServerClient import ServerClient  # noqa: E402

from service_helpers import DIRECTION, ORIGIN, SPACING, free_port, phantom_volume  # noqa: E402

WINDOW = (40.0, 400.0)


def ms(values) -> dict:
    v = sorted(1000 * x for x in values)
    return {"n": len(v), "p50": round(statistics.median(v), 1), "p90": round(v[int(0.9 * (len(v) - 1))], 1),
            "mean": round(statistics.fmean(v), 1), "max": round(v[-1], 1)}


def upload(client: ServerClient, seed: int) -> str:
    vol = phantom_volume(6, 256, 256, seed=seed)
    return client.upload_volume(vol, spacing=SPACING, origin=ORIGIN, direction=DIRECTION)[0]


def click(client: ServerClient, volume_id: str, index: int, jitter: int = 0) -> tuple[float, dict]:
    t = time.perf_counter()
    result = client.segment_prompt(volume_id, "k", index, points=[[120 + jitter % 7, 130]], labels=[1],
                                   multimask=True, window=WINDOW)
    return time.perf_counter() - t, result.timing


def settings_for(tmp: Path, port: int, device: str = "cpu") -> ServiceSettings:
    base = ServiceSettings.load(environ={}, encoder="mobile_sam", device=device, volume_dir=str(tmp / "volumes"),
                                registry_dir="off", port=port, neighbours=0)
    return replace(base, cache=replace(base.cache, directory=tmp / "features", host_bytes=2 << 30),
                   training_dir=tmp / "training-jobs", training_features_dir=tmp / "training-features")


@contextlib.contextmanager
def plain_serve(tmp: Path, device: str = "cpu"):
    """``desam-server serve`` as a child process with the same settings (its own folders)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "ModelServer"), "DESAM_CACHE_DIR": str(tmp / "serve-features"),
           "DESAM_NEIGHBOURS": "0", "DESAM_TRAINING_DIR": str(tmp / "serve-training")}
    proc = subprocess.Popen([sys.executable, "-m", "desam_server.cli", "serve", "--encoder", "mobile_sam", "--device",
                             device, "--port", str(port), "--volume-dir", str(tmp / "serve-volumes"),
                             "--registry-dir", "off", "--log-level", "warning"], env=env)
    try:
        client = ServerClient(f"http://127.0.0.1:{port}")
        client.wait_until_ready(timeout=300)
        yield client
    finally:
        proc.terminate()
        proc.wait(60)


def proxy_cost(cluster: ServerClient, plain: ServerClient, clicks: int) -> dict:
    ids = {name: upload(c, seed=100) for name, c in (("cluster", cluster), ("serve", plain))}
    for name, c in (("cluster", cluster), ("serve", plain)):
        for _ in range(3):
            click(c, ids[name], 2)                           # encode, then warm up
    rows = {"cluster": [], "serve": []}
    for n in range(clicks):
        order = (("cluster", cluster), ("serve", plain)) if n % 2 == 0 else (("serve", plain), ("cluster", cluster))
        for name, c in order:
            rows[name].append(click(c, ids[name], 2, jitter=n))
    out = {}
    for name, samples in rows.items():
        out[name] = {"round_trip_ms": ms([s[0] for s in samples]),
                     "service_total_ms": ms([s[1]["total_s"] for s in samples]),
                     "outside_service_ms": ms([s[0] - s[1]["total_s"] for s in samples])}
    out["proxy_cost_p50_ms"] = round(out["cluster"]["outside_service_ms"]["p50"]
                                     - out["serve"]["outside_service_ms"]["p50"], 1)
    return out


def affinity_run(url: str, *, affinity: bool, seeds: list[int], slices: list[int], repeats: int) -> dict:
    client = ServerClient(url, affinity=affinity)
    ids = [upload(client, seed) for seed in seeds]
    sequence = [(v, s) for v in ids for s in slices] * repeats
    random.Random(7).shuffle(sequence)
    latencies, hits = [], []
    for n, (volume_id, index) in enumerate(sequence):
        seconds, timing = click(client, volume_id, index, jitter=n)
        latencies.append(seconds)
        hits.append(bool(timing["cached"]))
    unique = len(ids) * len(slices)
    return {"affinity": affinity, "volumes": len(ids), "slices_per_volume": len(slices), "clicks": len(sequence),
            "hit_rate": round(sum(hits) / len(hits), 3), "best_possible_hit_rate": round(1 - unique / len(sequence), 3),
            "encodes": hits.count(False), "latency_ms": ms(latencies),
            "hit_latency_ms": ms([t for t, h in zip(latencies, hits, strict=True) if h]),
            "miss_latency_ms": ms([t for t, h in zip(latencies, hits, strict=True) if not h])}


def concurrent(url: str, clients: int, clicks_each: int, seed0: int) -> dict:
    setup = ServerClient(url)
    ids = [upload(setup, seed0 + n) for n in range(clients)]
    for volume_id in ids:
        click(setup, volume_id, 1)                           # encoded once, on its replica
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)

    def worker(volume_id: str) -> None:
        client = ServerClient(url)
        barrier.wait()
        for n in range(clicks_each):
            seconds, _ = click(client, volume_id, 1, jitter=n)
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=worker, args=(v,)) for v in ids]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "clicks": len(latencies), "wall_s": round(wall, 2),
            "clicks_per_s": round(len(latencies) / wall, 2), "latency_ms": ms(latencies)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--proxy-clicks", type=int, default=40)
    ap.add_argument("--volumes", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--clicks-each", type=int, default=6)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU node (then each replica takes one GPU)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    report: dict = {"model": f"mobile_sam (pretrained, {args.device})", "cpus": os.cpu_count(), "neighbours": 0}
    settings = settings_for(tmp, free_port(), args.device)
    gpus = 1.0 if args.device.startswith("cuda") else 0.0
    one = ClusterOptions(replicas=1, num_cpus=2, num_gpus=gpus)
    two = ClusterOptions(replicas=2, num_cpus=1, num_gpus=gpus)
    with local_cluster(settings, one, num_cpus=os.cpu_count() or 2) as url, plain_serve(tmp, args.device) as plain:
        report["proxy"] = proxy_cost(ServerClient(url), plain, args.proxy_clicks)
        print("proxy:", json.dumps(report["proxy"]), flush=True)
        report["concurrent_1_replica"] = concurrent(url, args.clients, args.clicks_each, seed0=300)
        print("8 clients, 1 replica:", json.dumps(report["concurrent_1_replica"]), flush=True)
        cluster_run.stop()
        cluster_run.start(settings, two)
        report["concurrent_2_replicas"] = concurrent(url, args.clients, args.clicks_each, seed0=400)
        print("8 clients, 2 replicas:", json.dumps(report["concurrent_2_replicas"]), flush=True)
        seeds = list(range(args.volumes))
        report["affinity_on"] = affinity_run(url, affinity=True, seeds=[500 + s for s in seeds], slices=[1, 3],
                                             repeats=args.repeats)
        print("affinity on:", json.dumps(report["affinity_on"]), flush=True)
        report["affinity_off"] = affinity_run(url, affinity=False, seeds=[600 + s for s in seeds], slices=[1, 3],
                                              repeats=args.repeats)
        print("affinity off:", json.dumps(report["affinity_off"]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
