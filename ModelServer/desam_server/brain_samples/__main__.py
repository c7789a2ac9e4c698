"""``python -m desam_server.brain_samples [--dest DIR] [--measure] [--png DIR]``: fetch the
brain samples (MNI152 template, Colin27), print their facts, and with ``--measure`` run
the plausibility check: the pretrained SAM mask decoder of the default encoder
(MobileSAM, no DeSAM decoder involved), prompted with the brain mask's bounding box (plus
``MARGIN`` pixels) on three axial slices (30, 50 and 70 % up the brain's extent) of the
template, of a synthetic head (seed 0) and of Colin27; Dice and precision against the
brain mask. ``--png`` writes an overlay per case."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from . import fetch_colin27, fetch_mni152, synthetic_head, tissue_probability
from .common import BrainSample, dice

MARGIN = 3
FRACTIONS = (0.3, 0.5, 0.7)


def measurement_slices(mask: np.ndarray) -> list[int]:
    rows = np.nonzero(mask.any(axis=(1, 2)))[0]
    return [int(round(rows[0] + f * (rows[-1] - rows[0]))) for f in FRACTIONS]


def box_prompt_scores(predictor, sample: BrainSample, k: int) -> tuple[float, float, np.ndarray, np.ndarray]:
    """(Dice, precision, predicted mask, box) of the best-scored of SAM's three masks for
    a box around the brain on axial slice ``k``."""
    truth = sample.brain_mask[k].astype(bool)
    rows, cols = np.nonzero(truth)
    h, w = truth.shape
    box = np.array([max(cols.min() - MARGIN, 0), max(rows.min() - MARGIN, 0),
                    min(cols.max() + 1 + MARGIN, w), min(rows.max() + 1 + MARGIN, h)], dtype=np.float64)
    predictor.set_image(sample.volume.array[k], sample.intensity_window())
    masks, scores, _ = predictor.predict(box=box, multimask_output=True)
    mask = masks[int(np.argmax(scores))]
    precision = float((mask & truth).sum()) / max(int(mask.sum()), 1)
    return dice(mask, truth), precision, mask, box


def _overlay_png(path: Path, sample: BrainSample, rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(5 * len(rows), 5.5))
    low = sample.window[0] - sample.window[1] / 2
    for ax, (k, d, p, mask, box) in zip(np.atleast_1d(axes), rows, strict=True):
        ax.imshow(sample.volume.array[k], cmap="gray", vmin=low, vmax=low + sample.window[1])
        ax.contour(sample.brain_mask[k], [0.5], colors="lime", linewidths=0.8)
        ax.contour(mask, [0.5], colors="red", linewidths=0.8)
        ax.add_patch(plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False, ec="yellow"))
        ax.set_title(f"{sample.name} k={k}: Dice {d:.3f}, precision {p:.3f}")
        ax.axis("off")
    fig.tight_layout()
    from ..atomic import atomic_output_path

    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, dpi=70, format="png")
    plt.close(fig)


def measure(samples: list[BrainSample], png_dir: Path | None) -> list[dict]:
    from ..engine import SlicePredictor
    from ..loading import build_model

    model, _ = build_model(device="cpu")
    predictor = SlicePredictor(model)
    results = []
    for sample in samples:
        rows = []
        for k in measurement_slices(sample.brain_mask):
            d, p, mask, box = box_prompt_scores(predictor, sample, k)
            rows.append((k, d, p, mask, box))
            results.append({"sample": sample.name, "slice": k, "dice": round(d, 4), "precision": round(p, 4)})
            print(f"{sample.name:16s} k={k:3d}  Dice {d:.3f}  precision {p:.3f}", flush=True)
        print(f"{sample.name:16s} mean  Dice {np.mean([r[1] for r in rows]):.3f}  "
              f"precision {np.mean([r[2] for r in rows]):.3f}", flush=True)
        if png_dir is not None:
            png_dir.mkdir(parents=True, exist_ok=True)
            _overlay_png(png_dir / f"box_prompt_{sample.name}.png", sample, rows)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m desam_server.brain_samples", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dest", type=Path, default=None, help="data directory (default: DESAM_DATA_DIR "
                        "or ~/.cache/slicer-desam/data)")
    parser.add_argument("--measure", action="store_true", help="run the box-prompt plausibility check")
    parser.add_argument("--png", type=Path, default=None, help="with --measure: write overlays here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        template = fetch_mni152(args.dest)
        colin = fetch_colin27(args.dest)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    head = synthetic_head(template, tissue_probability(template), seed=0)
    seconds = time.perf_counter() - started
    for sample in (template, head, colin):
        print(f"{sample.name}: shape (k, j, i) {sample.volume.array.shape}, brain {sample.brain_ml:.0f} ml, "
              f"window (center, width) {sample.window}; {sample.license}")
    print(f"synthetic head generated in {seconds:.1f} s")
    if args.measure:
        measure([template, head, colin], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
