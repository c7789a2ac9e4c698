"""``desam-server precompute``, ``train`` and ``evaluate`` (training/ does the work).

Cases are given as ``--case VOLUME LABEL`` pairs (NRRD, NIfTI, MHA, DICOM file or folder;
the label a labelmap image or a ``.seg.nrrd`` with ``--segment``). ``train`` runs under
``torchrun --nproc-per-node N -m desam_server.cli train ...`` as DDP (NCCL on GPUs, gloo
on CPUs); only process 0 prints and writes.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

log = logging.getLogger("desam_server")

__all__ = ["add_training_parsers"]


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} comma-separated numbers")
    return tuple(float(p) for p in parts)


#: The families whose files the service serves, and their default strategies.
SERVED_FAMILIES = ("desam", "dbsam", "sammix")
DEFAULT_STRATEGIES = {"desam": "grid", "dbsam": "box", "sammix": "gt_box"}


def _add_case_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--case", nargs=2, action="append", required=True, metavar=("VOLUME", "LABEL"),
                   help="a training case: volume file or DICOM folder, and its label (labelmap or .seg.nrrd); repeat")
    p.add_argument("--structure", required=True, help="structure name (the decoder's name in the service)")
    p.add_argument("--segment", default=None, help="segment name in .seg.nrrd labels (default: the structure)")
    p.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), default=None, metavar="CENTER,WIDTH",
                   help="intensity window for every case (default: each volume's: CT W400/L40, MR percentiles)")
    p.add_argument("--modality", choices=["auto", "CT", "MR"], default="auto")
    p.add_argument("--features-dir", type=Path, default=None,
                   help="training feature cache (default ~/.cache/slicer-desam/training-features)")
    p.add_argument("--features-bytes", default="20GiB", help="its disk budget (e.g. 20GiB)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    from .training.variants import AUGMENTATIONS

    p.add_argument("--axis", choices=["k", "j", "i"], default="k", help="slice along this index axis")
    p.add_argument("--validation-fraction", type=float, default=0.1)
    p.add_argument("--slabs", type=int, default=2, help="validation slabs of a single-volume source")
    p.add_argument("--gap", type=int, default=None, help="guard slices around each validation slab")
    p.add_argument("--empty-ratio", type=float, default=0.3, help="slices without the structure per slice with it")
    p.add_argument("--slice-step", type=int, default=1, help="train on every n-th slice (validation: all)")
    p.add_argument("--augment", default="none",
                   help=f"image-changing augmentations, comma-separated: {', '.join(AUGMENTATIONS)} (default none)")
    p.add_argument("--family", choices=list(SERVED_FAMILIES), default="desam",
                   help="the model family: desam (PRIM + PDMM on cached features), dbsam (DB-SAM's encoder adapters "
                        "and SAM's mask decoder, box prompts; docs/DBSAM.md), sammix (SAM-Mix: slice classifier + "
                        "LoRA SAM; docs/SAMMIX.md)")
    p.add_argument("--strategy", default=None,
                   help="the family's prompt strategy (desam: grid (default) or box; dbsam: box; sammix: gt_box "
                        "(default) or cam_box)")
    p.add_argument("--segmented-slices", action="append", default=None, metavar="I,J,...",
                   help="sammix: the slices of a case whose segmentation trains SAM (the other slices give presence "
                        "labels only, from the case's label); once per --case, in order")
    p.add_argument("--present-slices", action="append", default=None, metavar="I,J,A-B,...",
                   help="sammix: the slices of a case holding the structure (indices and ranges; every other slice "
                        "is labelled absent); default: the slices where the case's label is not empty; once per "
                        "--case, in order")
    p.add_argument("--family-option", action="append", default=[], metavar="KEY=JSON",
                   help="an option of the family (training.family.get_family), e.g. classifier_depth=18; repeat")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=8, help="global batch (over all torchrun processes)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="decoder training precision (auto: bf16/fp16 autocast on CUDA, fp32 on CPU)")
    p.add_argument("--validation-grid-size", type=int, default=9)
    p.add_argument("--min-region-area", type=int, default=64)


def _progress(quiet: bool):
    from .training.progress import TrainingProgress

    return TrainingProgress(quiet)


def _cases(args):
    from .engine.preprocess import IntensityWindow
    from .training.cases import load_case

    window = IntensityWindow(*args.window) if args.window else None
    cases = [load_case(v, lab, structure=args.structure, segment=args.segment, window=window,
                       modality=args.modality) for v, lab in args.case]
    segmented = getattr(args, "segmented_slices", None)
    present = getattr(args, "present_slices", None)
    if getattr(args, "family", "desam") != "sammix":
        if segmented or present:
            raise ValueError("--segmented-slices and --present-slices are for --family sammix")
        return cases
    from .training.sammix_data import sammix_case_from_case

    if not segmented or len(segmented) != len(cases):
        raise ValueError(f"--family sammix needs one --segmented-slices per --case ({len(cases)}), got "
                         f"{len(segmented or [])}")
    if present is not None and len(present) != len(cases):
        raise ValueError(f"give one --present-slices per --case ({len(cases)}) or none, got {len(present)}")
    return [sammix_case_from_case(case, axis=args.axis, segmented=_ints(text, "--segmented-slices"),
                                  present_slices=None if present is None else _ints(present[n], "--present-slices"))
            for n, (case, text) in enumerate(zip(cases, segmented, strict=True))]


def _ints(text: str, what: str) -> list[int]:
    """Slice indices from ``I,J,A-B`` (a range A-B includes both ends)."""
    out: list[int] = []
    try:
        for part in text.replace(" ", "").split(","):
            if "-" in part[1:]:
                first, last = (int(v) for v in part.split("-", 1))
                if last < first:
                    raise ValueError
                out.extend(range(first, last + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ValueError(f"{what}: comma-separated slice indices or ranges (12-40), got {text!r}") from None
    return out


def _family_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--family-option: KEY=JSON, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"--family-option {key}: the value must be JSON (a number, true/false, a quoted "
                             f"string), got {value!r}") from None
    return options


def _options(args):
    from .training.config import TrainConfig
    from .training.run import TrainingOptions

    strategy = args.strategy or DEFAULT_STRATEGIES[args.family]
    config = TrainConfig(family=args.family, family_options=_family_options(args.family_option),
                         strategy=strategy, epochs=args.epochs, batch_size=args.batch_size,
                         learning_rate=args.learning_rate, seed=args.seed, precision=args.train_precision,
                         validation_grid_size=args.validation_grid_size, min_region_area=args.min_region_area)
    return TrainingOptions(axis=args.axis, validation_fraction=args.validation_fraction, slabs=args.slabs,
                           gap=args.gap, empty_ratio=args.empty_ratio, slice_step=args.slice_step,
                           augmentations=args.augment, config=config)


def _model(args, ctx=None):
    """The model the flags ask for; PDMM's random start is seeded by --seed (when the
    command has one), so that runs and processes start from the same weights."""
    import torch

    from .engine import resolve_device
    from .loading import build_model

    torch.manual_seed(getattr(args, "seed", 0))
    device = args.device
    if ctx is not None and ctx.enabled:
        device = str(ctx.device(resolve_device(device)))
    model, _ = build_model(args.encoder, args.sam_checkpoint, args.decoder, device)
    return model


def _registry(directory: Path | None):
    """The decoder registry the service uses (its settings: config file, DESAM_REGISTRY_DIR,
    default), or ``directory``."""
    from .api.settings import ServiceSettings
    from .decoder_registry import DecoderRegistry

    root = directory or ServiceSettings.load().registry_dir
    if root is None:
        raise ValueError("the decoder registry is off in the service's settings: give --registry-dir")
    return DecoderRegistry(root)


def cmd_precompute(args: argparse.Namespace) -> int:
    from .engine.feature_config import parse_bytes
    from .training.family import get_family
    from .training.run import default_training_features_dir, precompute, prepare_data

    if get_family(args.family, _family_options(args.family_option)).input_kind == "image":
        raise ValueError(f"the {args.family} family trains with its encoder in the loop: it reads the slices "
                         "themselves, there is nothing to precompute")
    model = _model(args)
    data = prepare_data(_cases(args), _options(args))
    progress = _progress(args.quiet)
    directory = args.features_dir or default_training_features_dir()
    report = precompute(model, data, directory, events=progress, precision=args.precision,
                        features_bytes=parse_bytes(args.features_bytes, "--features-bytes"))
    progress.close()
    print(json.dumps({"data": data.summary(), "precompute": report.to_json()}, indent=1))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .engine.feature_config import parse_bytes
    from .training.distributed import DistributedContext
    from .training.run import run_training

    ctx = DistributedContext.from_environment(args.device)
    try:
        model = _model(args, ctx)
        progress = _progress(args.quiet or not ctx.is_main)
        result = run_training(model, _cases(args), _options(args), output_dir=args.output,
                              features_dir=args.features_dir, events=progress if ctx.is_main else None,
                              resume=not args.restart, distributed=ctx, encoder_precision=args.precision,
                              features_bytes=parse_bytes(args.features_bytes, "--features-bytes"))
        progress.close()
        if ctx.is_main:
            answer = {"best": str(result.best_path), "last": str(result.last_path), "best_epoch": result.best_epoch,
                      "best_validation_dice": result.best_dice, "resumed_from": result.resumed_from}
            if args.install:
                registry = _registry(args.registry_dir)
                info = registry.register(result.best_path, curve_png=result.output_dir / "curve.png", activate=True)
                answer["installed"] = f"{info.structure} {info.version}"
            print(json.dumps(answer, indent=1))
    finally:
        ctx.close()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine.feature_cache import FeatureCache, FeatureCacheSettings
    from .engine.feature_config import parse_bytes
    from .training.evaluate import evaluate_cases, write_evaluation
    from .training.family import get_family
    from .training.features import FeatureReader, TrainingFeatures
    from .training.run import STORAGE_DTYPE, default_training_features_dir
    from .wire import axis_dimension

    if args.decoder is None:
        raise ValueError("evaluate needs --decoder (a trained decoder file)")
    model = _model(args)
    cases = _cases(args)
    directory = args.features_dir or default_training_features_dir()
    progress = _progress(args.quiet)
    settings = FeatureCacheSettings(directory=directory, host_bytes=0, storage_dtype=STORAGE_DTYPE,
                                    disk_bytes=parse_bytes(args.features_bytes, "--features-bytes"))
    dim = axis_dimension(args.axis)
    with FeatureCache(settings) as cache:
        TrainingFeatures(model, cache, precision=args.precision).precompute(
            [(c, args.axis, i) for c in cases for i in range(c.volume.shape[dim])],
            progress=lambda d, t: progress({"event": "precompute", "done": d, "total": t}))
    progress.close()
    family = get_family("desam")
    options = {"grid_size": args.grid_size, "min_region_area": args.min_region_area}
    bar = _progress(args.quiet)
    scores = evaluate_cases(model, family, cases, FeatureReader(model, directory, storage_dtype=STORAGE_DTYPE),
                            axis=args.axis, mode=args.mode, options=options, tolerance_mm=args.tolerance_mm,
                            progress=lambda d, t: bar({"event": "precompute", "done": d, "total": t}))
    bar.close()
    report = write_evaluation(args.output, cases, scores, axis=args.axis, mode=args.mode,
                              tolerance_mm=args.tolerance_mm,
                              extra={"decoder": (model.decoder_metadata or {}).get("structure"),
                                     "structure": args.structure})
    print(json.dumps({k: report[k] for k in ("mode", "volumes", "mean_dice", "mean_nsd", "tolerance_mm")}, indent=1))
    return 0


def add_training_parsers(sub, add_model_args) -> None:
    pre = sub.add_parser("precompute", help="encode the slices a training run needs into the training feature cache")
    add_model_args(pre)
    _add_case_args(pre)
    _add_data_args(pre)
    pre.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=cmd_precompute)

    tr = sub.add_parser("train", help="fine-tune decoders on cached features (torchrun for several processes)")
    add_model_args(tr)
    _add_case_args(tr)
    _add_data_args(tr)
    tr.add_argument("--output", type=Path, required=True, help="run folder: decoder files, state, curve")
    tr.add_argument("--restart", action="store_true", help="start over instead of resuming the folder's run")
    tr.add_argument("--install", action="store_true",
                    help="register the best decoder as the next version of its structure in the decoder registry "
                         "(and make it the active one): the service serves it at its next start or registry change")
    tr.add_argument("--registry-dir", type=Path, default=None,
                    help="decoder registry (default: the service's registry_dir setting: DESAM_REGISTRY_DIR, "
                         "the config file, else ~/.local/share/slicer-desam/decoders)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    tr.set_defaults(func=cmd_train)

    ev = sub.add_parser("evaluate", help="Dice and surface Dice of a decoder on whole volumes")
    add_model_args(ev)
    _add_case_args(ev)
    ev.add_argument("--axis", choices=["k", "j", "i"], default="k")
    ev.add_argument("--mode", choices=["box", "grid"], default="box")
    ev.add_argument("--grid-size", type=int, default=9)
    ev.add_argument("--min-region-area", type=int, default=64)
    ev.add_argument("--tolerance-mm", type=float, default=2.0, help="surface distance tolerance of the NSD")
    ev.add_argument("--output", type=Path, required=True, help="folder for evaluation.json/.csv and worst_slices.png")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_evaluate)
