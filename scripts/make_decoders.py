"""Train the first DeSAM decoders for the embedded default encoder (MobileSAM) from the
offline sample data and install them in the decoder registry, so that `desam-server
serve` serves automatic segmentation at its next start (`make decoders`).

- head: the InVesalius Cranium CT and its head mask (one volume: slab split);
- brain: synthetic T1 heads around the MNI152 template's brain (skull, scalp, muscle and
  fat present, so that "not black" is not "brain"), checked cross-domain on the Colin27
  T1 head (another person and scanner).

Prints a table and writes JSON (--json): validation Dice per decoder, whole-volume Dice
and surface Dice of the brain decoder on Colin27, and the times. See docs/TRAINING.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

from desam_server.atomic import atomic_write_bytes
from desam_server.engine import configure_malloc
from desam_server.engine.feature_cache import FeatureCache, FeatureCacheSettings
from desam_server.loading import build_model
from desam_server.training.config import TrainConfig
from desam_server.training.evaluate import evaluate_cases, write_evaluation
from desam_server.training.family import get_family
from desam_server.training.features import FeatureReader, TrainingFeatures
from desam_server.training.progress import TrainingProgress
from desam_server.training.run import STORAGE_DTYPE, TrainingOptions, default_training_features_dir, run_training
from desam_server.training.sample_cases import brain_cases, colin27_case, head_cases

log = logging.getLogger("make_decoders")

#: Per structure: the cases and the data options (slice_step keeps a 2-core CPU run short).
PLANS = {
    "head": dict(cases=head_cases, options=dict(slice_step=2, augmentations=("flip_lr",), empty_ratio=0.3)),
    "brain": dict(cases=brain_cases, options=dict(slice_step=4, augmentations=(), empty_ratio=0.3)),
}


def model_for(seed: int):
    torch.manual_seed(seed)  # PDMM's random start
    model, _ = build_model("mobile_sam", None, None, "auto")
    return model


def cross_domain(model, strategy: str, features_dir: Path, out_dir: Path, quiet: bool, options: dict) -> dict:
    """The brain decoder on Colin27, whole volume along k."""
    case = colin27_case()
    settings = FeatureCacheSettings(directory=features_dir, host_bytes=0, storage_dtype=STORAGE_DTYPE)
    progress = TrainingProgress(quiet)
    with FeatureCache(settings) as cache:
        TrainingFeatures(model, cache).precompute(
            [(case, "k", i) for i in range(case.volume.shape[0])],
            progress=lambda d, t: progress({"event": "precompute", "done": d, "total": t}))
    progress.close()
    scores = evaluate_cases(model, get_family("desam"), [case], FeatureReader(model, features_dir), axis="k",
                            mode=strategy, options=options, tolerance_mm=2.0)
    return write_evaluation(out_dir, [case], scores, axis="k", mode=strategy, tolerance_mm=2.0,
                            extra={"case": "Colin27 T1 (mricron-data), semi-automatic brain mask"})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--structures", default="head,brain")
    parser.add_argument("--strategy", choices=["box", "grid"], default="box")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "slicer-desam" / "runs")
    parser.add_argument("--features-dir", type=Path, default=None)
    parser.add_argument("--registry-dir", type=Path, default=None)
    parser.add_argument("--no-install", action="store_true")
    parser.add_argument("--json", type=Path, default=Path("out") / "decoders.json")
    parser.add_argument("--slice-steps", default="",
                        help="override the plans' slice steps, e.g. head=4,brain=8 (shorter runs)")
    parser.add_argument("--validation-grid-size", type=int, default=9)
    parser.add_argument("-q", "--quiet", action="store_true")
    args = parser.parse_args(argv)
    steps = dict(item.split("=") for item in args.slice_steps.split(",") if item)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_malloc()
    features_dir = args.features_dir or default_training_features_dir()
    report: dict = {"strategy": args.strategy, "epochs": args.epochs, "decoders": {}}
    registry = None
    if not args.no_install:
        from desam_server.cli_training import _registry

        registry = _registry(args.registry_dir)
    for structure in [s.strip() for s in args.structures.split(",") if s.strip()]:
        plan = PLANS[structure]
        t0 = time.perf_counter()
        model = model_for(args.seed)
        config = TrainConfig(strategy=args.strategy, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                             validation_grid_size=args.validation_grid_size)
        data_options = {**plan["options"], **({"slice_step": int(steps[structure])} if structure in steps else {})}
        options = TrainingOptions(**data_options, config=config)
        progress = TrainingProgress(args.quiet)
        run_dir = args.work_dir / f"{structure}-{args.strategy}"
        result = run_training(model, plan["cases"](), options, output_dir=run_dir, features_dir=features_dir,
                              events=progress)
        progress.close()
        entry = {"options": options.to_json(), "best_epoch": result.best_epoch,
                 "best_validation_dice": result.best_dice,
                 "validation_dice_per_epoch": [h["validation_dice"] for h in result.history],
                 "train_seconds": round(time.perf_counter() - t0, 1), "run_dir": str(run_dir)}
        if registry is not None:
            info = registry.register(result.best_path, curve_png=run_dir / "curve.png", activate=True)
            entry["installed"] = f"{info.structure} {info.version}"
        if structure == "brain":
            from desam_server.modeling.checkpoint import load_decoder

            load_decoder(model, result.best_path)
            t1 = time.perf_counter()
            # Evaluated with the default grid (9 x 9) whatever grid validated the run.
            evaluation = cross_domain(model, args.strategy, features_dir, run_dir / "colin27", args.quiet,
                                      {**config.prediction_options(), "grid_size": 9})
            entry["cross_domain"] = {"case": "Colin27", "dice": evaluation["mean_dice"],
                                     "nsd_2mm": evaluation["mean_nsd"],
                                     "seconds": round(time.perf_counter() - t1, 1)}
        report["decoders"][structure] = entry
        print(json.dumps({structure: entry}, indent=1), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(report, indent=1).encode())
    print(f"\n{'decoder':8} {'val Dice':>9} {'best ep':>8} {'Colin27 Dice':>13} {'NSD@2mm':>8} {'installed':>12}")
    for name, e in report["decoders"].items():
        cd = e.get("cross_domain", {})
        print(f"{name:8} {e['best_validation_dice']:9.4f} {e['best_epoch']:8d} "
              f"{cd.get('dice', float('nan')):13.4f} {cd.get('nsd_2mm', float('nan')):8.4f} "
              f"{e.get('installed', '-'):>12}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
