"""Time and peak memory of one DB-SAM training step per encoder, with and without
activation checkpointing (docs/DBSAM.md).

A step: DB-SAM encoder forward on a random normalised image batch, a toy loss on the
image embedding (mean squared distance to a fixed target: the mask decoder's own cost is
left out, it is the same as in decoder-only training), backward, AdamW step on DB-SAM's
trainable parts. Random weights (the cost does not depend on them). Each configuration
runs in its own process, so that its peak memory is its own: on CPU the growth of the
peak resident set over the set after building the model, on CUDA
``torch.cuda.max_memory_allocated`` during the steps. Also times the frozen encoder's
own inference forward for comparison. Prints a table and writes JSON; no assertions.

    PYTHONPATH=ModelServer python scripts/bench_dbsam.py --encoders tiny,lite_medsam,mobile_sam
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def measure(encoder_name: str, checkpointing: bool, batch: int, steps: int, device: str, threads: int) -> dict:
    import torch

    from desam_server.modeling import get_spec
    from desam_server.modeling.dbsam_checkpoint import build_dbsam_encoder

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = get_spec(encoder_name)
    base = spec.make_encoder().requires_grad_(False).eval().to(device)
    dbsam = build_dbsam_encoder(base, encoder_name=encoder_name, checkpoint_stages=checkpointing)
    side = spec.convention.img_size
    x = torch.randn(batch, 3, side, side, device=device)
    target = torch.randn(batch, 256, spec.embedding_size, spec.embedding_size, device=device)
    opt = torch.optim.AdamW(dbsam.trainable_parameters(), lr=1e-4)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.no_grad():
        t0 = time.perf_counter()
        base(x)
        sync()
        inference = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        baseline = _rss_mib()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = (dbsam(x) - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _rss_mib()
    return {
        "encoder": encoder_name, "checkpointing": checkpointing, "batch": batch, "device": device,
        "threads": threads, "steps": steps, "input": side,
        "trainable_parameters": sum(p.numel() for p in dbsam.trainable_parameters()),
        "frozen_parameters": sum(p.numel() for p in base.parameters()),
        "step_seconds_first": round(times[0], 3), "step_seconds_min": round(min(times), 3),
        "encoder_inference_seconds": round(inference, 3),
        "memory_baseline_mib": round(baseline, 1), "memory_peak_mib": round(peak, 1),
        "step_memory_mib": round(peak - baseline, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoders", default="tiny,lite_medsam,mobile_sam")
    parser.add_argument("--checkpointing", default="off,on", help="off, on or off,on")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("out") / "bench_dbsam.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one configuration
    args = parser.parse_args(argv)
    if args.one:
        name, flag = args.one.split(":")
        print(json.dumps(measure(name, flag == "on", args.batch_size, args.steps, args.device, args.threads)))
        return 0

    rows = []
    for name in args.encoders.split(","):
        for flag in args.checkpointing.split(","):
            cmd = [sys.executable, __file__, "--one", f"{name}:{flag}", "--batch-size", str(args.batch_size),
                   "--steps", str(args.steps), "--device", args.device, "--threads", str(args.threads)]
            done = subprocess.run(cmd, check=True, capture_output=True, text=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{row['encoder']:12s} ckpt={flag:3s} batch={row['batch']}"
                  f" step first {row['step_seconds_first']:7.2f} s  min {row['step_seconds_min']:7.2f} s"
                  f"  step memory {row['step_memory_mib']:8.1f} MiB  (peak {row['memory_peak_mib']:.0f} MiB;"
                  f" encoder inference {row['encoder_inference_seconds']:.2f} s)", flush=True)

    from desam_server.atomic import atomic_write_bytes

    atomic_write_bytes(args.json, json.dumps({"rows": rows}, indent=2).encode())
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
