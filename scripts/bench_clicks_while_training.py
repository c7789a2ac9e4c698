"""Click latency of the service while a training job runs, against the same clicks with
the service idle (docs/TRAINING.md): `desam-server serve` with MobileSAM as a child
process (its volumes, features, registry and training folders in a temporary folder; the
training features in the usual training cache), the sample head CT uploaded with its head
label, clicks on one encoded slice, then a training job on the volume and the same clicks
while it trains (blocks of clicks alternate with short pauses so that the job runs).
Prints a table and writes JSON; the job is cancelled at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "SlicerDeSAM"))

from desam_server.atomic import atomic_write_bytes
from desam_server.io import read_volume
from desam_server.samples import fetch_cranium
from SlicerDeSAMLib.ServerClient import ServerClient


def clicks(client: ServerClient, vid: str, n: int, index: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        client.segment_prompt(vid, "k", index, points=[[120 + (i % 5) * 4, 128]], labels=[1])
        out.append(1000 * (time.perf_counter() - t0))
    return out


def summary(ms: list[float]) -> dict:
    return {"clicks": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(sorted(ms)[int(0.9 * (len(ms) - 1))], 1), "max_ms": round(max(ms), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=30)
    parser.add_argument("--json", type=Path, default=Path("out") / "bench_clicks_while_training.json")
    args = parser.parse_args(argv)
    sample = fetch_cranium()
    volume, mask = read_volume(sample.volume), read_volume(sample.head_mask)
    g = volume.geometry
    with tempfile.TemporaryDirectory(prefix="bench_clicks_training_") as tmp:
        tmp = Path(tmp)
        port = 8790
        env = {**os.environ, "DESAM_CACHE_DIR": str(tmp / "features"), "DESAM_REGISTRY_DIR": str(tmp / "registry"),
               "DESAM_TRAINING_DIR": str(tmp / "training-jobs")}
        proc = subprocess.Popen([sys.executable, "-m", "desam_server.cli", "serve", "--port", str(port),
                                 "--volume-dir", str(tmp / "volumes")], env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            client = ServerClient(f"http://127.0.0.1:{port}", timeout=300)
            client.wait_until_ready(timeout=300)
            vid, _ = client.upload_volume(volume.array, spacing=g.spacing, origin=g.origin, direction=g.direction)
            client.put_label(vid, "head", mask.array != 0)
            index = sample.reference_slice
            clicks(client, vid, 3, index)  # encodes the slice, warms up
            idle = clicks(client, vid, args.clicks, index)
            options = {"slice_step": 2, "empty_ratio": 0.3, "config": {"strategy": "box", "epochs": 3}}
            job = client.start_training("head", [(vid, "head")], options)
            while client.training_job(job["id"])["phase"] != "train":
                time.sleep(2)
            busy = []
            while len(busy) < args.clicks:
                busy += clicks(client, vid, 5, index)
                time.sleep(1.0)
            state = client.training_job(job["id"])
            client.cancel_training(job["id"])
            client.wait_training(job["id"], timeout=120)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    rows = {"idle": summary(idle), "while_training": summary(busy),
            "training_state_at_end": {k: state.get(k) for k in ("phase", "epoch", "step", "steps")}}
    print(f"{'':16} {'clicks':>6} {'median ms':>10} {'p90 ms':>8} {'max ms':>8}")
    for name in ("idle", "while_training"):
        r = rows[name]
        print(f"{name:16} {r['clicks']:6d} {r['median_ms']:10.1f} {r['p90_ms']:8.1f} {r['max_ms']:8.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(rows, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
