"""Time per training step on cached features, the share of it spent loading features, and
a 2-process torchrun (gloo on CPU, NCCL on GPUs) against one process with the same global
batch (docs/TRAINING.md, evidence item 4).

Runs `desam-server train` for one epoch on the sample head CT with MobileSAM, the
`make decoders` head data (every 2nd slice, mirrored copies; features must be cached:
`make decoders` or `desam-server precompute` first, else the first run encodes them), once
per process count, and reads each run's history (process 0's times). Prints a table and
writes JSON. Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from desam_server.atomic import atomic_write_bytes
from desam_server.samples import fetch_cranium


def run(processes: int, common: list[str], output: Path, device: str) -> dict:
    cmd = [sys.executable, "-m", "desam_server.cli", "train", *common, "--device", device, "--output", str(output),
           "--restart", "-q"]
    if processes > 1:
        torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
        cmd = [torchrun, "--standalone", "--nproc-per-node", str(processes), *cmd[1:]]
    env = dict(os.environ)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    history = json.loads((output / "history.json").read_text())["history"]
    epoch = history[-1]
    step = (epoch["load_seconds"] + epoch["compute_seconds"]) / epoch["steps"]
    return {"processes": processes, "steps": epoch["steps"], "seconds_per_step": round(step, 3),
            "load_share": round(epoch["load_seconds"] / (epoch["load_seconds"] + epoch["compute_seconds"]), 4),
            "validation_seconds": epoch["validation_seconds"], "wall_seconds": round(wall, 1),
            "loss": epoch["loss"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=Path("out") / "bench_training.json")
    args = parser.parse_args(argv)
    sample = fetch_cranium()
    common = ["--encoder", "mobile_sam", "--structure", "head", "--case", str(sample.volume), str(sample.head_mask),
              f"--window={sample.window[0]},{sample.window[1]}", "--slice-step", "2", "--augment", "flip_lr",
              "--strategy", "box", "--epochs", "1", "--batch-size", str(args.batch_size)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        for n in [int(p) for p in args.processes.split(",")]:
            rows.append(run(n, common, Path(tmp) / f"p{n}", args.device))
            print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds_per_step"]
    print(f"\n{'processes':>9} {'s/step':>8} {'speed-up':>8} {'load share':>10} {'steps':>6} {'wall s':>7}")
    for r in rows:
        print(f"{r['processes']:9d} {r['seconds_per_step']:8.2f} {base / r['seconds_per_step']:8.2f} "
              f"{100 * r['load_share']:9.1f}% {r['steps']:6d} {r['wall_seconds']:7.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps({"device": args.device, "batch_size": args.batch_size, "runs": rows},
                                             indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
