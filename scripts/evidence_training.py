"""Evidence items 2, 3 and 5 of issue #11 on the sample head CT, with the embedded default
encoder (MobileSAM): prints tables and writes JSON (--json). Nothing here asserts a time.

- item 2 (grid-size robustness): validation Dice (the head's validation slabs, whole slabs,
  empty slices included) at grid sizes 1, 5, 9, 15, 25 of DeSAM grid-trained and of SAM's
  own mask decoder fine-tuned on the same data (family ``sam_decoder``), both selected by
  the same grid procedure; the spread (max - min) in Dice points.
- item 3 (ablation): DeSAM against PDMM without PRIM's mask-embedding fusion (family
  ``desam_no_fusion``), grid 9, same data and epochs.
- item 5: DeSAM's grid mode (lazy) against the naive procedure (every prompt through the
  whole decoder, then the procedure as written), side by side on the same validation
  slices: mean time each, speed-up, and the slices whose final masks differ.

Runs: each family's run folder under --work-dir (``head-grid`` for DeSAM: the folder that
``scripts/make_decoders.py --strategy grid`` writes, so its decoder is reused;
``head-grid-sam_decoder``, ``head-grid-desam_no_fusion``), or given with --desam-run,
--sam-decoder-run, --no-fusion-run. A folder holding ``best.safetensors`` is used as it
is (its training record must show the same data); otherwise the family is trained there
(resuming an interrupted run). Data: ``head_cases()`` with make_decoders' head options
(slice_step 2, flip_lr, empty_ratio 0.3; the split and validation slices depend on the
seed only). --tiny runs the whole script on phantom volumes with the tiny test encoder
(random weights): the tests' end-to-end check, meaningless as evidence.
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

from desam_server.atomic import atomic_write_bytes
from desam_server.training.config import TrainConfig
from desam_server.training.evidence import compare_grid_modes, grid_size_dice
from desam_server.training.family import get_family
from desam_server.training.features import FeatureReader
from desam_server.training.run import (
    STORAGE_DTYPE,
    TrainingOptions,
    default_training_features_dir,
    precompute,
    prepare_data,
    run_training,
)
from desam_server.training.trainer import validation_dice

log = logging.getLogger("evidence_training")

FAMILIES = ("desam", "sam_decoder", "desam_no_fusion")
RUN_NAMES = {"desam": "head-grid", "sam_decoder": "head-grid-sam_decoder",
             "desam_no_fusion": "head-grid-desam_no_fusion"}
#: make_decoders.py's head plan (PLANS['head']), grid strategy.
HEAD_DATA = dict(slice_step=2, augmentations=("flip_lr",), empty_ratio=0.3)


# ---- data and models -----------------------------------------------------------------------
def tiny_cases(n: int = 3, shape=(8, 40, 48)):
    """Phantom volumes (a bright ellipsoid in noise, exact labels), seeded."""
    from desam_server.engine.preprocess import IntensityWindow
    from desam_server.io import Geometry, Volume
    from desam_server.training.cases import case_from_arrays

    cases = []
    for seed in range(n):
        r = np.random.default_rng(seed)
        k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
        centre = np.array(shape) / 2 + np.array([0.0, *r.normal(0, 2, 2)])
        radii = np.array([shape[0] * 0.36, shape[1] * 0.25, shape[2] * 0.22]) * np.array([1.0, *r.uniform(0.8, 1.2, 2)])
        mask = sum(((g - c) / rad) ** 2 for g, c, rad in zip((k, j, i), centre, radii, strict=True)) <= 1
        image = (r.normal(0, 20, shape) + 300 * mask).astype(np.int16)
        cases.append(case_from_arrays(Volume(image, Geometry.identity((1.0, 1.0, 2.0))), mask, None,
                                      structure="blob", window=IntensityWindow(150.0, 500.0)))
    return cases


def build_base_model(tiny: bool, seed: int):
    """A freshly built DeSAM (PDMM's random start seeded as make_decoders does)."""
    torch.manual_seed(seed)
    if tiny:
        from desam_server.modeling import build_desam

        return build_desam("tiny")
    from desam_server.loading import build_model

    model, _ = build_model("mobile_sam", None, None, "auto")
    return model


def training_options(args, family: str) -> TrainingOptions:
    if args.tiny:
        config = TrainConfig(family=family, strategy="grid", epochs=args.epochs, batch_size=args.batch_size,
                             learning_rate=1e-3, seed=args.seed, validation_grid_size=3,
                             iou_threshold=args.iou_threshold, min_region_area=args.min_region_area)
        return TrainingOptions(validation_fraction=0.25, empty_ratio=0.5, config=config)
    config = TrainConfig(family=family, strategy="grid", epochs=args.epochs, batch_size=args.batch_size,
                         seed=args.seed, iou_threshold=args.iou_threshold, min_region_area=args.min_region_area)
    return TrainingOptions(**{**HEAD_DATA, "slice_step": args.slice_step}, config=config)


def _epoch_log(family: str):
    def events(event: dict) -> None:
        if event["event"] == "epoch":
            log.info("%s epoch %d/%d: loss %.4f, validation Dice %.4f", family, event["epoch"], event["epochs"],
                     event["loss"], event["validation_dice"])
        elif event["event"] == "precomputed":
            log.info("features: %s", event)
    return events


def trained_model(args, family_name: str, cases, run_dir: Path, features_dir: Path):
    """(the family's model with its best epoch's weights, the file's training record,
    training seconds or None when the folder's decoder was reused)."""
    family = get_family(family_name)
    best = run_dir / "best.safetensors"
    seconds = None
    base = build_base_model(args.tiny, args.seed)
    if best.is_file():
        log.info("%s: using %s", family_name, best)
        model = family.prepare_model(base)
    else:
        log.info("%s: training in %s", family_name, run_dir)
        t0 = time.perf_counter()
        result = run_training(base, cases, training_options(args, family_name), output_dir=run_dir,
                              features_dir=features_dir, events=_epoch_log(family_name))
        seconds = time.perf_counter() - t0
        model = result.model
    meta = family.load(model, best)
    model.eval()
    return model, meta.get("training", {}), seconds


# ---- the items ---------------------------------------------------------------------------------
def points(values) -> str:
    return " ".join(f"{100 * v:7.2f}" for v in values)


def item2(models, data, reader, args) -> dict:
    rows = {}
    for name in ("desam", "sam_decoder"):
        model, family = models[name]
        t0 = time.perf_counter()
        rows[name] = grid_size_dice(model, family, data, reader, args.grid_sizes, iou_threshold=args.iou_threshold,
                                    min_region_area=args.min_region_area)
        log.info("item 2: %s done in %.1f s", name, time.perf_counter() - t0)
    out = {"grid_sizes": list(args.grid_sizes), "validation_volumes": len(data.validation)}
    for name, per_size in rows.items():
        values = [per_size[s]["dice"] for s in args.grid_sizes]
        out[name] = {"dice": {str(s): per_size[s]["dice"] for s in args.grid_sizes},
                     "per_volume": {str(s): per_size[s]["per_volume"] for s in args.grid_sizes},
                     "spread_points": 100 * (max(values) - min(values))}
    print("\nItem 2: validation Dice (%) by grid size (points per side), same grid procedure")
    print(f"{'model':14}" + "".join(f"{s:>8}" for s in args.grid_sizes) + f"{'spread':>9}")
    for name, label in (("desam", "DeSAM"), ("sam_decoder", "SAM decoder")):
        values = [out[name]["dice"][str(s)] for s in args.grid_sizes]
        print(f"{label:14} {points(values)} {out[name]['spread_points']:8.2f}")
    return out


def item3(models, data, reader, args) -> dict:
    options = {"grid_size": args.grid_size, "iou_threshold": args.iou_threshold,
               "min_region_area": args.min_region_area}
    out = {"grid_size": args.grid_size}
    for name in ("desam", "desam_no_fusion"):
        model, family = models[name]
        dice, per_volume = validation_dice(model, family, data, reader, "grid", options)
        out[name] = {"dice": dice, "per_volume": per_volume}
    print(f"\nItem 3: ablation, validation Dice (%) at grid {args.grid_size}")
    print(f"{'DeSAM (full)':28} {100 * out['desam']['dice']:7.2f}")
    print(f"{'PDMM without mask fusion':28} {100 * out['desam_no_fusion']['dice']:7.2f}")
    return out


def item5(models, data, reader, args) -> dict:
    model, _ = models["desam"]
    refs = data.validation_refs()
    picks = np.unique(np.linspace(0, len(refs) - 1, min(args.naive_slices, len(refs))).round().astype(int))

    def slices():
        for n in picks:
            ref = refs[int(n)]
            yield f"{ref.case}:{ref.axis}{ref.index}", reader.load(data.cases[ref.case], ref.axis, ref.index,
                                                                    model.device)

    comparison = compare_grid_modes(model, slices(), grid_size=args.grid_size, iou_threshold=args.iou_threshold,
                                    min_region_area=args.min_region_area)
    out = comparison.summary()
    n = args.grid_size
    print(f"\nItem 5: grid {n} x {n}, lazy grid mode vs the naive procedure ({n * n} full decoder passes), "
          f"{out['slices']} validation slices, interleaved")
    print(f"lazy {out['lazy_mean_seconds']:.3f} s/slice, naive {out['naive_mean_seconds']:.3f} s/slice, "
          f"speed-up {out['speedup']:.1f}x; final masks differ in {out['slices_differing']} of {out['slices']} "
          f"slices (pixels: {out['differing_pixels'] or '-'})")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="2,3,5", help="comma-separated evidence items: 2, 3, 5")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "slicer-desam" / "runs")
    parser.add_argument("--features-dir", type=Path, default=None)
    parser.add_argument("--desam-run", type=Path, default=None)
    parser.add_argument("--sam-decoder-run", type=Path, default=None)
    parser.add_argument("--no-fusion-run", type=Path, default=None)
    parser.add_argument("--epochs", type=int, default=12, help="when a family is trained here (make_decoders': 12)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slice-step", type=int, default=HEAD_DATA["slice_step"])
    parser.add_argument("--grid-sizes", default="1,5,9,15,25")
    parser.add_argument("--grid-size", type=int, default=9, help="grid of items 3 and 5")
    parser.add_argument("--iou-threshold", type=float, default=0.5)
    parser.add_argument("--min-region-area", type=int, default=64)
    parser.add_argument("--naive-slices", type=int, default=8, help="validation slices of item 5 (evenly spaced)")
    parser.add_argument("--tiny", action="store_true", help="phantom data and the tiny test encoder (tests only)")
    parser.add_argument("--json", type=Path, default=Path("out") / "evidence_training.json")
    args = parser.parse_args(argv)
    args.grid_sizes = [int(s) for s in args.grid_sizes.split(",") if s.strip()]
    items = {s.strip() for s in args.items.split(",") if s.strip()}
    if not items or not items <= {"2", "3", "5"}:
        parser.error("--items takes 2, 3 and/or 5")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.tiny:
        from desam_server.engine import configure_malloc

        configure_malloc()
    features_dir = args.features_dir or default_training_features_dir()
    if args.tiny:
        cases = tiny_cases()
    else:
        from desam_server.training.sample_cases import head_cases

        cases = head_cases()
    needed = {"desam"} | ({"sam_decoder"} if "2" in items else set()) | ({"desam_no_fusion"} if "3" in items else set())
    given = {"desam": args.desam_run, "sam_decoder": args.sam_decoder_run, "desam_no_fusion": args.no_fusion_run}
    report: dict = {"tiny": args.tiny, "items": sorted(items), "runs": {}}
    models = {}
    for name in FAMILIES:
        if name not in needed:
            continue
        run_dir = given[name] or args.work_dir / RUN_NAMES[name]
        model, record, seconds = trained_model(args, name, cases, run_dir, features_dir)
        models[name] = (model, get_family(name))
        report["runs"][name] = {"run_dir": str(run_dir), "trained_here_seconds": seconds,
                                "best_epoch": record.get("best_epoch"),
                                "best_validation_dice": record.get("best_validation_dice"),
                                "config": record.get("config"), "data": record.get("data")}
    data_records = {json.dumps(r["data"], sort_keys=True) for r in report["runs"].values()}
    report["same_data"] = len(data_records) == 1
    if not report["same_data"]:
        log.warning("the runs' training records show different data: the comparisons are not like for like")
    epochs = {n: (r["config"] or {}).get("epochs") for n, r in report["runs"].items()}
    report["epochs"] = epochs
    # The validation slices (whole slabs) depend on the cases and the seed only.
    base_model = models["desam"][0]
    data = prepare_data(cases, training_options(args, "desam"))
    precompute(base_model, data, features_dir)  # only what is missing (nothing when the runs used this folder)
    reader = FeatureReader(base_model, features_dir, storage_dtype=STORAGE_DTYPE)
    report["validation"] = {"volumes": len(data.validation), "slices": len(data.validation_refs()),
                            "split": data.split.to_json().get("description")}
    print(f"\nvalidation: {report['validation']['slices']} slices in {report['validation']['volumes']} "
          f"volume portions; epochs {epochs}; same data: {report['same_data']}")
    timings = {}
    for item, fn in (("2", item2), ("3", item3), ("5", item5)):
        if item in items:
            t0 = time.perf_counter()
            report[f"item{item}"] = fn(models, data, reader, args)
            timings[f"item{item}"] = round(time.perf_counter() - t0, 1)
    report["seconds"] = timings
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    print(f"\nwritten {args.json}; seconds per item {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
