"""FLOPs of one encoder pass per registry encoder, counted, not timed: the model is built on
PyTorch's meta device (no weights, no memory) and ``torch.utils.flop_counter.FlopCounterMode``
counts the operations of one forward pass of a 1-slice batch at the encoder's input size
(a multiply-add counts 2). Prints a table and writes JSON. docs/CAPACITY.md uses it where no
GPU measurement exists.

Usage: ``PYTHONPATH=ModelServer python scripts/count_encoder_flops.py [--json out/encoder_flops.json]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from desam_server.modeling import build_desam, get_spec


def count(encoder: str) -> dict:
    with torch.device("meta"):
        model = build_desam(encoder)
    size = get_spec(encoder).convention.img_size
    x = torch.zeros(1, 3, size, size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.image_encoder(x)
    params = sum(p.numel() for p in model.image_encoder.parameters())
    return {"encoder": encoder, "input": size, "gflop": round(counter.get_total_flops() / 1e9, 1),
            "encoder_params_m": round(params / 1e6, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoders", default="vit_h,vit_l,vit_b,mobile_sam")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = [count(name) for name in args.encoders.split(",")]
    for row in rows:
        print(f"{row['encoder']:12s} {row['input']:5d} px  {row['gflop']:9.1f} GFLOP  "
              f"{row['encoder_params_m']:7.1f} M params")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
