"""DB-SAM's evidence (issue #13) on the offline sample data: prints tables, writes JSON.
Nothing here asserts anything.

Trains, on the same slices with the same budget (``--epochs``, ``--slice-step``, batch,
learning rate, seed), the four rows of the paper's ablation in its direction and DeSAM's
whole-box decoder:

- ``dbsam_decoder_only``: SAM's mask decoder fine-tuned on cached features (MedSAM-style);
- ``dbsam_adapters``: + channel attention adapters in the frozen encoder;
- ``dbsam_no_fusion``: + convolution branch and bilateral cross-attention;
- ``dbsam``: + ViT-Conv fusion (the full model);
- ``desam`` with the ``box`` strategy (the whole slice as its box).

Then evaluates each on the held-out validation slabs (``split_cases``: whole slabs, slices
without the structure included), per contiguous slab, 3-D Dice and NSD at ``--tolerance``
mm (``evaluate.dice_and_nsd``, the volume's spacing), in the settings:

- ``truth box`` (prompted; the paper's and MedSAM's evaluation): each slice that holds
  the structure gets its ground-truth bounding box; slices without it get no box and
  count as predicted empty. Uses the truth: an upper bound of prompted use, not automatic.
- ``whole box`` (automatic, no user input): the whole slice as the box on every slice,
  small regions removed (min area ``--min-region-area``) - exactly DeSAM's box mode's
  prompt, and the families' validation ``predict``.
- ``point`` (prompted, one click per slice): a positive click at the truth's interior
  point (the pixel farthest from its border; the largest region's on a slice with
  several), SAM's three masks and the one with the highest predicted IoU (SAM's answer to
  a single ambiguous click); slices without the structure get no click (empty).
- ``3 points``: the ``point`` answer corrected by two more clicks, each at the interior
  point of the largest error region (positive where the structure was missed, negative
  where the mask is extra), with the previous answer's low-resolution logits as the mask
  input and one mask out: SAM's own interactive protocol, the product's click refinement.
- ``propagation`` (one user mask per slab, then automatic): the product's propagation
  (``api.propagation``: neighbour's box + 4 px, its stop rules) from the slab's slice with
  the largest true area, seeded with that slice's true mask (the seed slice counts with
  its true mask, as the product keeps the user's), both directions to the slab's ends.

The ``sam`` row is SAM with no training at all (the encoder's own mask decoder), in
the prompted settings: the zero-shot reference for boxes and clicks.

Each model is evaluated after its last epoch (the budget's end), not at its best
validation epoch: validation scores the whole-box mode, which is not what the box-trained
rows are for (on the brain it stays near 0 and would pick the first epoch). One encoder
pass per slice serves all three settings. Also prints each run's training
step time (the trainer's compute seconds per image) and validation time.

    nice -n 10 env PYTHONPATH=ModelServer python scripts/evidence_dbsam.py --json out/evidence_dbsam.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from desam_server.api.propagation import StopRules, box_around, propagate
from desam_server.atomic import atomic_write_bytes
from desam_server.engine.postprocess import remove_small_regions
from desam_server.engine.predictor import SlicePredictor
from desam_server.io.slices import slice_view
from desam_server.training.config import TrainConfig
from desam_server.training.dbsam_family import truth_box, whole_box
from desam_server.training.evaluate import dice_and_nsd
from desam_server.training.family import get_family
from desam_server.training.features import FeatureReader
from desam_server.training.run import STORAGE_DTYPE, TrainingOptions, prepare_data, run_training
from desam_server.training.slice_images import SliceImageReader
from desam_server.wire import axis_dimension

log = logging.getLogger("evidence_dbsam")

ROWS = ("dbsam_decoder_only", "dbsam_adapters", "dbsam_no_fusion", "dbsam")
LABELS = {"dbsam_decoder_only": "decoder only (MedSAM-style)", "dbsam_adapters": "+ channel attention",
          "dbsam_no_fusion": "+ conv branch & cross-attention", "dbsam": "+ fusion (DB-SAM)",
          "desam": "DeSAM, whole box", "sam": "SAM, no training"}
SETTINGS = ("truth_box", "point", "points_3", "whole_box", "propagation")
HEADERS = {"truth_box": "truth box", "point": "1 point", "points_3": "3 points", "whole_box": "whole box",
           "propagation": "propagation"}
CORRECTIONS = 2


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the pixel of ``mask``'s largest region farthest from its border."""
    regions, count = ndimage.label(mask)
    if count > 1:
        sizes = ndimage.sum_labels(mask, regions, index=range(1, count + 1))
        mask = regions == 1 + int(np.argmax(sizes))
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return float(x), float(y)


def build_base(encoder: str, seed: int):
    torch.manual_seed(seed)
    if encoder == "tiny":
        from desam_server.modeling import build_desam

        return build_desam("tiny")
    from desam_server.loading import build_model

    model, _ = build_model(encoder, None, None, "cpu")
    return model


def load_cases(args):
    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "Testing" / "ModelServer"))
        from training_helpers import phantom_cases

        return phantom_cases(3, shape=(12, 40, 48))
    from desam_server.training import sample_cases

    return sample_cases.head_cases() if args.data == "head" else sample_cases.brain_cases()


def options(args, family: str) -> TrainingOptions:
    strategy = "box"
    config = TrainConfig(family=family, strategy=strategy, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed, precision=args.precision,
                         min_region_area=args.min_region_area)
    return TrainingOptions(validation_fraction=args.validation_fraction, slice_step=args.slice_step,
                           empty_ratio=args.empty_ratio, config=config)


def slabs(indices) -> list[list[int]]:
    """Contiguous runs of slice indices."""
    out: list[list[int]] = []
    for i in sorted(indices):
        if out and i == out[-1][-1] + 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


class Answers:
    """One slab's slices encoded once (image families: DB-SAM's encoder at the service's
    "auto" precision, as their validation; feature families: the cached features); box
    answers through SlicePredictor (fp32 decoder)."""

    def __init__(self, model, input_kind: str, case, axis, indices, features_dir: Path) -> None:
        self.model = model
        self.predictor = SlicePredictor(model, precision="auto")
        self.features = {}
        model.eval()
        reader = (SliceImageReader() if input_kind == "image"
                  else FeatureReader(model, features_dir, storage_dtype=STORAGE_DTYPE))
        for index in indices:
            source = reader.load(case, axis, index, model.device)
            if input_kind == "image":
                self.predictor.set_image(source.image, source.window)
                self.features[index] = self.predictor.features
            else:
                self.features[index] = source

    def box(self, index: int, box) -> tuple[np.ndarray, float]:
        self.predictor.set_features(self.features[index])
        masks, iou, _ = self.predictor.predict(box=np.asarray(box, np.float64), multimask_output=False)
        return masks[0], float(iou[0])

    def clicks(self, index: int, truth: np.ndarray, corrections: int) -> np.ndarray:
        """One click at the interior point (best of SAM's three masks by predicted IoU),
        then ``corrections`` clicks on the largest error region, each refining the last
        answer (its low-resolution logits as the mask input)."""
        self.predictor.set_features(self.features[index])
        points, labels = [interior_point(truth)], [1]
        masks, iou, low_res = self.predictor.predict(point_coords=np.asarray(points), point_labels=np.asarray(labels),
                                                     multimask_output=True)
        best = int(np.argmax(iou))
        mask, logits = masks[best], low_res[best:best + 1]
        for _ in range(corrections):
            missed, extra = truth & ~mask, mask & ~truth
            if not missed.any() and not extra.any():
                break
            positive = missed.sum() >= extra.sum()
            points.append(interior_point(missed if positive else extra))
            labels.append(1 if positive else 0)
            masks, _, low_res = self.predictor.predict(point_coords=np.asarray(points),
                                                       point_labels=np.asarray(labels), mask_input=logits,
                                                       multimask_output=False)
            mask, logits = masks[0], low_res[0:1]
        return mask

    def desam_whole_box(self, index: int, min_region_area: int) -> np.ndarray:
        self.predictor.set_features(self.features[index])
        return self.predictor.predict_auto("box", min_region_area=min_region_area, allow_untrained=True).mask


def evaluate(model, family_name: str, data, args, features_dir: Path) -> dict:
    """``family_name`` ``sam``: the untrained model, its slices encoded as an image family's."""
    input_kind = "image" if family_name == "sam" else get_family(family_name).input_kind
    axis = data.split.axis
    dim = axis_dimension(axis)
    results = {s: [] for s in (("whole_box",) if family_name == "desam" else SETTINGS)}
    for portion in data.validation:
        case = data.cases[portion.case]
        spacing = tuple(float(s) for s in case.volume.geometry.spacing)[::-1]
        slab_spacing = tuple(s for d, s in enumerate(spacing) if d != dim)
        for run in slabs(portion.indices):
            answers = Answers(model, input_kind, case, axis, run, features_dir)
            truth = np.stack([np.asarray(slice_view(case.mask, axis, i)) for i in run])
            shape = truth.shape[1:]
            predicted = {s: np.zeros_like(truth) for s in results}
            for n, index in enumerate(run):
                if family_name == "desam":
                    predicted["whole_box"][n] = answers.desam_whole_box(index, args.min_region_area)
                    continue
                mask, _ = answers.box(index, whole_box(shape))
                predicted["whole_box"][n] = remove_small_regions(mask, args.min_region_area)
                if truth[n].any():
                    predicted["truth_box"][n] = answers.box(index, truth_box(truth[n]))[0]
                    predicted["point"][n] = answers.clicks(index, truth[n], 0)
                    predicted["points_3"][n] = answers.clicks(index, truth[n], CORRECTIONS)
            if "propagation" in results and truth.any():
                seed = int(np.argmax(truth.reshape(len(run), -1).sum(1)))
                walked = propagate(truth[seed], seed, 0, len(run), StopRules(),
                                   lambda n, neighbour, a=answers, r=run: a.box(r[n], box_around(neighbour)))
                for n, mask in walked.masks.items():
                    predicted["propagation"][n] = mask
            # the slab as a volume: slices along the split axis first
            spacing_3d = (spacing[dim], *slab_spacing)
            for setting, volume in predicted.items():
                dice, nsd = dice_and_nsd(volume, truth, spacing_3d, args.tolerance)
                results[setting].append({"case": case.case_id, "slices": [run[0], run[-1]], "dice": dice,
                                         "nsd": nsd})
    return {s: {"dice": float(np.mean([r["dice"] for r in rs])), "nsd": float(np.mean([r["nsd"] for r in rs])),
                "per_slab": rs} for s, rs in results.items()}


def evaluate_untrained(cases, args, features_dir: Path) -> dict:
    """The ``sam`` row: SAM as it comes, on the same validation slabs."""
    model = build_base(args.encoder, args.seed)
    data = prepare_data(cases, options(args, "dbsam"))
    t1 = time.perf_counter()
    scores = evaluate(model, "sam", data, args, features_dir)
    log.info("sam: %s", {s: (round(v["dice"], 4), round(v["nsd"], 4)) for s, v in scores.items()})
    return {"family": "sam", "label": LABELS["sam"], "train_seconds": 0.0,
            "evaluate_seconds": round(time.perf_counter() - t1, 1), "data": data.summary(), "scores": scores}


def train_and_evaluate(name: str, cases, args, features_dir: Path) -> dict:
    base = build_base(args.encoder, args.seed)
    out = args.work_dir / name
    t0 = time.perf_counter()
    result = run_training(base, cases, options(args, name), output_dir=out, features_dir=features_dir,
                          resume=False)
    seconds = time.perf_counter() - t0
    family = get_family(name)
    model = family.prepare_model(base)
    family.load(model, result.last_path)  # the budget's end (the whole-box validation Dice is no guide here)
    data = prepare_data(cases, options(args, name))
    t1 = time.perf_counter()
    scores = evaluate(model, name, data, args, features_dir)
    history = result.history
    images = sum(h["steps"] for h in history) * args.batch_size
    row = {"family": name, "label": LABELS[name], "train_seconds": round(seconds, 1),
           "evaluate_seconds": round(time.perf_counter() - t1, 1), "best_epoch": result.best_epoch,
           "best_validation_dice": result.best_dice,
           "loss": [round(h["loss"], 4) for h in history],
           "validation_dice": [round(h["validation_dice"], 4) for h in history],
           "step_seconds_per_image": round(sum(h["compute_seconds"] for h in history) / images, 3),
           "validation_seconds_per_epoch": round(float(np.mean([h["validation_seconds"] for h in history])), 1),
           "data": data.summary(), "scores": scores}
    log.info("%s: %s", name, {s: (round(v["dice"], 4), round(v["nsd"], 4)) for s, v in scores.items()})
    return row


def print_tables(report: dict) -> None:
    rows = report["rows"]
    print(f"\nBudget: {report['budget']}")
    print("\n| model | " + " | ".join(f"{HEADERS[s]} Dice | NSD" for s in SETTINGS) + " |")
    print("|---|" + "---:|---:|" * len(SETTINGS))
    for row in rows.values():
        s = row["scores"]
        cells = []
        for setting in SETTINGS:
            if setting in s:
                cells += [f"{100 * s[setting]['dice']:.2f}", f"{100 * s[setting]['nsd']:.2f}"]
            else:
                cells += ["—", "—"]
        print(f"| {row['label']} | " + " | ".join(cells) + " |")
    print("\n| model | step s / image | validation s / epoch | training s | loss by epoch |")
    print("|---|---:|---:|---:|---|")
    for row in rows.values():
        if row["family"] == "sam":
            continue
        print(f"| {row['label']} | {row['step_seconds_per_image']} | {row['validation_seconds_per_epoch']} | "
              f"{row['train_seconds']} | {' '.join(str(v) for v in row['loss'])} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="mobile_sam", choices=["mobile_sam", "lite_medsam"])
    parser.add_argument("--data", default="brain", choices=["brain", "head"])
    parser.add_argument("--families", default=",".join((*ROWS, "desam", "sam")))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--slice-step", type=int, default=24)
    parser.add_argument("--validation-fraction", type=float, default=0.03)
    parser.add_argument("--empty-ratio", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-region-area", type=int, default=64)
    parser.add_argument("--tolerance", type=float, default=1.0, help="NSD tolerance in mm")
    parser.add_argument("--work-dir", type=Path, default=Path("out") / "dbsam-evidence")
    parser.add_argument("--tiny", action="store_true", help="phantoms and the tiny encoder (a quick check only)")
    parser.add_argument("--json", type=Path, default=Path("out") / "evidence_dbsam.json")
    args = parser.parse_args(argv)
    if args.tiny:
        args.encoder, args.validation_fraction, args.slice_step = "tiny", 0.25, 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    cases = load_cases(args)
    features_dir = args.work_dir / "features"
    budget = (f"{args.data} data ({'tiny phantoms' if args.tiny else 'offline sample'}), encoder {args.encoder}, "
              f"every {args.slice_step}th training slice, empty ratio {args.empty_ratio}, validation fraction "
              f"{args.validation_fraction} in slabs, {args.epochs} epochs, batch {args.batch_size}, "
              f"lr {args.learning_rate}, precision {args.precision}, seed {args.seed}; NSD at {args.tolerance} mm")
    report = {"budget": budget, "args": {k: str(v) for k, v in vars(args).items()}, "rows": {}}
    t0 = time.perf_counter()
    for name in families:
        report["rows"][name] = (evaluate_untrained(cases, args, features_dir) if name == "sam"
                                else train_and_evaluate(name, cases, args, features_dir))
        report["wall_seconds"] = round(time.perf_counter() - t0, 1)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    print_tables(report)
    print(f"\nwall {report['wall_seconds']} s; JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
