"""SAM-Mix's evidence (issue 14) on the offline sample data: prints tables, writes JSON
(--json). Nothing here asserts a result or a time.

Data: one synthetic T1 head around the MNI152 brain (``brain_cases(seeds=(0,))``),
structure "brain", sliced along k (axial): the brain is absent from the top slices (and
slice 0). Held-out slabs: ``split_cases`` with 3 slabs, validation fraction 0.15, seed 0
(the training issue's slab split; one slab crosses the top of the brain, so the
validation slabs hold empty slices). Training: N segmented slices (N = 5 and 50, evenly
spaced over the training slices holding the brain), presence labels for every
``--slice-step``-th training slice.

Compared, on the whole validation slabs (empty slices included; 3-D Dice over the slabs):
- SAM-Mix (``sammix`` family through ``run_training``; MobileSAM with LoRA rank 8, the
  mask decoder, a ResNet classifier of --classifier-depth; --strategy: the segmenter
  trained on the classifier's CAM boxes (``cam_box``, default: the boxes it will get at
  inference) or on jittered label boxes (``gt_box``); inference: classify -> CAM box ->
  SAM);
- SAM prompted by CAM boxes without segmentation training: the same run's classifier
  (it shares no parameter with the segmenter, so it is what training the classifier
  alone gives) with MobileSAM's own encoder and mask decoder;
- DeSAM's automatic whole-box mode trained (``desam`` family, features cached) on the
  same N segmented slices plus slices labelled absent (their mask is known: empty), at
  empty ratio 0.3.
Each segmented slice holding the structure is seen max(1, --segmented-passes // N) times
per epoch (SAM-Mix's ``segmented_repeat``; the same repeats for DeSAM): 5 slices 5 times
(25 passes), 50 slices once (50 passes) with the defaults.

Reported: Dice, slice-presence accuracy (SAM-Mix and CAM: the classifier's call at
probability 0.5; DeSAM: a non-empty mask), empty validation slices given a non-empty mask,
training seconds per step and per run. --tiny runs everything on a phantom with the tiny
test encoder (random weights): a check that the script runs, meaningless as evidence.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from desam_server.atomic import atomic_write_bytes
from desam_server.engine.sammix import build_sammix
from desam_server.io.slices import slice_view
from desam_server.training.config import TrainConfig
from desam_server.training.evaluate import volume_dice
from desam_server.training.family import get_family
from desam_server.training.features import FeatureReader
from desam_server.training.run import STORAGE_DTYPE, TrainingOptions, precompute, run_training
from desam_server.training.sammix_data import presence_from_mask, sammix_case_from_case
from desam_server.training.samples import SliceRef, TrainingData
from desam_server.training.slice_images import SliceImageReader
from desam_server.training.split import split_cases
from desam_server.training.trainer import Trainer

log = logging.getLogger("evidence_sammix")
AXIS = "k"
SPLIT = dict(validation_fraction=0.15, slabs=3)


def tiny_case():
    """A phantom of 40 slices: a bright ellipsoid in noise on slices ~6-34."""
    from desam_server.engine.preprocess import IntensityWindow
    from desam_server.io import Geometry, Volume
    from desam_server.training.cases import case_from_arrays

    shape = (40, 40, 48)
    r = np.random.default_rng(0)
    k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    mask = ((k - 20) / 14.0) ** 2 + ((j - 20) / 10.0) ** 2 + ((i - 24) / 10.0) ** 2 <= 1
    image = (r.normal(0, 20, shape) + 300 * mask).astype(np.int16)
    return case_from_arrays(Volume(image, Geometry.identity((1.0, 1.0, 2.0))), mask, None, structure="blob",
                            window=IntensityWindow(150.0, 500.0))


def base_model(tiny: bool):
    torch.manual_seed(0)
    if tiny:
        from desam_server.modeling import build_desam

        return build_desam("tiny")
    from desam_server.loading import build_model

    return build_model("mobile_sam", None, None, "cpu")[0]


def choose_segmented(case, split, n: int) -> list[int]:
    """n training slices holding the structure, evenly spaced."""
    present = presence_from_mask(case.mask, AXIS)
    candidates = [i for i in split.train[0].indices if present[i]]
    if n > len(candidates):
        raise SystemExit(f"{n} segmented slices asked for, the training part holds {len(candidates)} with the "
                         "structure")
    return sorted({candidates[int(round(x))] for x in np.linspace(0, len(candidates) - 1, n)})


def _step_seconds(history: list[dict]) -> float:
    steps = sum(h["steps"] for h in history)
    return (sum(h["compute_seconds"] + h["load_seconds"] for h in history) / steps) if steps else float("nan")


def score(case, split, predict) -> dict:
    """Whole validation slabs: predict(index) -> (mask, called_present)."""
    truth, predicted, calls, present = [], [], [], presence_from_mask(case.mask, AXIS)
    for index in split.validation[0].indices:
        mask, called = predict(index)
        predicted.append(mask)
        truth.append(np.asarray(slice_view(case.mask, AXIS, index)))
        calls.append(bool(called))
    idx = list(split.validation[0].indices)
    correct = [c == bool(present[i]) for c, i in zip(calls, idx, strict=True)]
    empty_fp = sum(1 for m, i in zip(predicted, idx, strict=True) if m.any() and not present[i])
    return {"dice": volume_dice(np.stack(predicted), np.stack(truth)), "presence_accuracy": float(np.mean(correct)),
            "empty_slices_with_mask": empty_fp, "slices": len(idx),
            "empty_slices": int(sum(not present[i] for i in idx))}


def run_sammix(args, case, split, n: int, segmented: list[int], repeat: int) -> tuple[dict, object]:
    # the validation slabs are segmented too: their truth scores the run (never trained on)
    known = sorted(set(segmented) | set(split.validation[0].indices))
    sm_case = sammix_case_from_case(case, axis=AXIS, segmented=known)
    options = {"classifier_depth": args.classifier_depth, "segmented_repeat": repeat,
               "classifier_lr_scale": args.classifier_lr_scale, "box_jitter": args.box_jitter,
               "bn_momentum": args.bn_momentum}
    config = TrainConfig(family="sammix", strategy=args.strategy, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=0, family_options=options)
    topts = TrainingOptions(axis=AXIS, slice_step=args.slice_step, config=config, **SPLIT)
    out = args.work_dir / f"sammix-{args.strategy}-{n}"
    t0 = time.perf_counter()
    result = run_training(base_model(args.tiny), [sm_case], topts, output_dir=out, resume=False,
                          events=lambda e: log.info("sammix-%d %s", n, {k: e[k] for k in ("event", "epoch", "step",
                                                    "loss", "validation_dice") if k in e}))
    seconds = time.perf_counter() - t0
    model = result.model.eval()
    reader = SliceImageReader()

    def predict(index):
        s = reader.load(case, AXIS, index)
        p = model.predict_slice(s.image, s.window)
        return p.mask, p.probability >= 0.5

    row = score(case, split, predict)
    row.update({"seconds_per_step": _step_seconds(result.history), "train_seconds": seconds,
                "epochs": len(result.history),
                "trainer_validation_dice": [h["validation_dice"] for h in result.history],
                "data": read_data(out)})
    return row, model


def read_data(out: Path) -> dict:
    return json.loads((out / "history.json").read_text())["record"]["data"]


def cam_zero_shot(args, case, split, trained) -> dict:
    """The trained classifier's CAM boxes prompting MobileSAM as it is (no LoRA effect: B =
    0; SAM's own mask decoder)."""
    plain = build_sammix(base_model(args.tiny), classifier_depth=args.classifier_depth)
    plain.classifier.load_state_dict(trained.classifier.state_dict())
    plain.eval()
    reader = SliceImageReader()

    def predict(index):
        s = reader.load(case, AXIS, index)
        p = plain.predict_slice(s.image, s.window)
        return p.mask, p.probability >= 0.5

    return score(case, split, predict)


def run_desam(args, case, split, n: int, segmented: list[int], repeat: int, strategy: str = "box") -> dict:
    """DeSAM's automatic mode ``strategy`` (``box``: whole box; ``grid``: grid points)
    trained on the same segmented slices (plus slices labelled absent, their mask empty)."""
    present = presence_from_mask(case.mask, AXIS)
    absent = [i for i in split.train[0].indices if not present[i]]
    n_empty = min(len(absent), math.ceil(0.3 * n * repeat))
    empties = sorted(np.random.default_rng(0).choice(absent, size=n_empty, replace=False).tolist())
    refs = [SliceRef(0, AXIS, i, True) for i in segmented for _ in range(repeat)]
    refs += [SliceRef(0, AXIS, i, False) for i in empties]
    data = TrainingData([case], refs, list(split.validation), split, (), 0.3, 1)
    model = base_model(args.tiny)
    features = args.work_dir / "features"
    precompute(model, data, features)
    reader = FeatureReader(model, features, storage_dtype=STORAGE_DTYPE)
    config = TrainConfig(family="desam", strategy=strategy, epochs=args.desam_epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=0)
    family = get_family("desam")
    t0 = time.perf_counter()
    result = Trainer(model, family, data, reader, config, args.work_dir / f"desam-{strategy}-{n}",
                     events=lambda e: log.info("desam-%d %s", n, {k: e[k] for k in ("event", "epoch", "loss",
                                               "validation_dice") if k in e})).run(resume=False)
    seconds = time.perf_counter() - t0
    model.eval()

    def predict(index):
        mask = family.predict(model, reader.load(case, AXIS, index, model.device), strategy,
                              config.prediction_options())
        return mask, mask.any()

    row = score(case, split, predict)
    row.update({"seconds_per_step": _step_seconds(result.history), "train_seconds": seconds,
                "epochs": len(result.history), "train_refs": len(refs), "empty_train_slices": n_empty})
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmented", default="5,50", help="numbers of segmented slices")
    parser.add_argument("--segmented-passes", type=int, default=25, help="segmentation passes per epoch (repeats)")
    parser.add_argument("--epochs", type=int, default=3, help="SAM-Mix epochs")
    parser.add_argument("--desam-epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--classifier-lr-scale", type=float, default=4.0)
    parser.add_argument("--classifier-depth", type=int, default=18)
    parser.add_argument("--box-jitter", type=float, default=0.1)
    parser.add_argument("--bn-momentum", type=float, default=0.3)
    parser.add_argument("--strategy", default="cam_box", choices=("gt_box", "cam_box"))
    parser.add_argument("--rows", default="sammix,cam-sam,desam-box",
                        help="what to run, of sammix, cam-sam (needs sammix), desam-box, desam-grid")
    parser.add_argument("--slice-step", type=int, default=1,
                        help="every n-th training slice carries its presence label")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "slicer-desam" / "runs" / "sammix")
    parser.add_argument("--tiny", action="store_true", help="a phantom and the tiny test encoder (a smoke test)")
    parser.add_argument("--json", type=Path, default=Path("out") / "evidence_sammix.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    counts = [int(s) for s in args.segmented.split(",") if s.strip()]
    rows = {r.strip() for r in args.rows.split(",") if r.strip()}
    unknown = rows - {"sammix", "cam-sam", "desam-box", "desam-grid"}
    if unknown or ("cam-sam" in rows and "sammix" not in rows):
        parser.error(f"--rows: unknown {sorted(unknown)} or cam-sam without sammix")
    if args.tiny:
        case = tiny_case()
    else:
        from desam_server.training.sample_cases import brain_cases

        case = brain_cases(seeds=(0,))[0]
    split = split_cases([case], axis=AXIS, seed=0, **SPLIT)
    report: dict = {"tiny": args.tiny, "args": {k: str(v) for k, v in vars(args).items()},
                    "split": split.description, "threads": torch.get_num_threads(), "runs": {}}
    print(f"data: {case.structure}, {case.volume.shape} ({AXIS}); {split.description}")
    t_all = time.perf_counter()
    for n in counts:
        segmented = choose_segmented(case, split, n)
        repeat = max(1, args.segmented_passes // n)
        if "sammix" in rows:
            row, model = run_sammix(args, case, split, n, segmented, repeat)
            report["runs"][f"sammix-{n}"] = row
            row.update({"strategy": args.strategy, "segmented_slices": segmented, "repeat": repeat})
            if "cam-sam" in rows:
                report["runs"][f"cam-sam-{n}"] = cam_zero_shot(args, case, split, model)
            del model
        for strategy in ("box", "grid"):
            if f"desam-{strategy}" in rows:
                report["runs"][f"desam-{strategy}-{n}"] = run_desam(args, case, split, n, segmented, repeat,
                                                                    strategy)
                report["runs"][f"desam-{strategy}-{n}"]["segmented_slices"] = segmented
    report["total_seconds"] = time.perf_counter() - t_all
    first = next(iter(report["runs"].values()))
    print("\nValidation slabs (whole, empty slices included):", {k: first[k] for k in ("slices", "empty_slices")})
    print(f"{'model':40}{'Dice':>8}{'presence acc.':>15}{'empty with mask':>17}{'s/step':>8}{'train s':>9}")
    for n in counts:
        for key, label in ((f"sammix-{n}", f"SAM-Mix ({args.strategy}), {n} segmented"),
                           (f"cam-sam-{n}", f"CAM boxes -> SAM (classifier of {n})"),
                           (f"desam-box-{n}", f"DeSAM whole box, {n} segmented"),
                           (f"desam-grid-{n}", f"DeSAM grid points, {n} segmented")):
            r = report["runs"].get(key)
            if r is None:
                continue
            step = f"{r['seconds_per_step']:8.2f}" if "seconds_per_step" in r else f"{'-':>8}"
            train = f"{r['train_seconds']:9.0f}" if "train_seconds" in r else f"{'-':>9}"
            print(f"{label:40}{r['dice']:8.4f}{r['presence_accuracy']:15.3f}{r['empty_slices_with_mask']:17d}"
                  f"{step}{train}")
    print(f"total {report['total_seconds']:.0f} s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(report, indent=1, default=str).encode())
    print(f"written {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
