"""Which prompt carries a mask from slice to slice best (``api/propagation.py``)?

The sample head CT (``samples.fetch_cranium``), pretrained MobileSAM on the CPU: every
slice of [lo, hi) encoded once, then, from the seed slice's true head mask, a walk in
both directions where each slice is prompted by its neighbour's answer, for each prompt
variant: the neighbour's bounding box widened by a margin, that box plus the neighbour's
mask as SAM's mask input (``prompting.mask_to_logits``), the mask input alone, and the
box with three masks (highest predicted IoU kept). No stop rule: every slice is walked.
Prints, per variant, the mean and lowest Dice against the true head mask over the
slices up to ``--last`` (the head ends above it), and writes the per-slice rows as JSON.

    python scripts/measure_propagation_prompts.py --out propagation_prompts.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "ModelServer"))

from desam_server.api.prompting import mask_to_logits
from desam_server.api.propagation import box_around
from desam_server.atomic import atomic_write_bytes
from desam_server.engine import SlicePredictor

from realweights_helpers import cranium, load_model

VARIANTS = ("box:0", "box:2", "box:4", "box:8", "box:16", "box+mask:4", "mask:0", "box-multi:4")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def answer(predictor: SlicePredictor, variant: str, neighbour: np.ndarray) -> tuple[np.ndarray, float]:
    kind, margin = variant.split(":")
    box = box_around(neighbour, int(margin))
    features = predictor.features
    if kind == "box":
        masks, ious, _ = predictor.predict(box=box, multimask_output=False)
    elif kind == "box+mask":
        masks, ious, _ = predictor.predict(box=box, mask_input=mask_to_logits(neighbour, predictor.model, features),
                                           multimask_output=False)
    elif kind == "mask":
        masks, ious, _ = predictor.predict(mask_input=mask_to_logits(neighbour, predictor.model, features),
                                           multimask_output=False)
    elif kind == "box-multi":
        masks, ious, _ = predictor.predict(box=box, multimask_output=True)
    else:
        raise ValueError(variant)
    best = int(np.argmax(ious))
    return masks[best], float(ious[best])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-slice", type=int, default=54)
    parser.add_argument("--lo", type=int, default=30, help="first slice walked")
    parser.add_argument("--hi", type=int, default=108, help="one past the last slice walked")
    parser.add_argument("--last", type=int, default=105, help="last slice counted in the summary")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=0, help="PyTorch CPU threads (0: PyTorch's default)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ct = cranium()
    model = load_model("mobile_sam", "cpu")
    predictor = SlicePredictor(model, precision="fp32")
    features, t0 = {}, time.perf_counter()
    for k in range(args.lo, args.hi):
        predictor.set_image(ct.volume[k], ct.window)
        features[k] = predictor.features
    encode_s = (time.perf_counter() - t0) / (args.hi - args.lo)
    print(f"encoded slices {args.lo}..{args.hi - 1}: {encode_s:.2f} s per slice")
    seed = ct.head[args.seed_slice]
    rows = []
    for variant in args.variants.split(","):
        t0, walked = time.perf_counter(), 0
        for direction, bound in ((1, args.hi), (-1, args.lo - 1)):
            previous, k = seed, args.seed_slice + direction
            while k != bound:
                predictor.set_features(features[k])
                mask, iou = answer(predictor, variant, previous)
                rows.append({"variant": variant, "slice": k, "iou": iou, "area": int(mask.sum()),
                             "true_area": int(ct.head[k].sum()), "dice": dice(mask, ct.head[k])})
                walked += 1
                previous = mask if mask.any() else previous
                k += direction
        counted = [r["dice"] for r in rows if r["variant"] == variant and r["slice"] <= args.last]
        print(f"{variant:12s} mean Dice {np.mean(counted):.3f}, lowest {min(counted):.3f} (slices {args.lo}.."
              f"{args.last}); decoder {1000 * (time.perf_counter() - t0) / walked:.0f} ms per slice")
    if args.out is not None:
        atomic_write_bytes(args.out, json.dumps({"seed_slice": args.seed_slice, "encode_s_per_slice": encode_s,
                                                 "rows": rows}, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
