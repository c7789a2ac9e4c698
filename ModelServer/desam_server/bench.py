"""``desam-server bench``: engine timings per model, printed as a table and written as JSON.

Measured side by side in one run: encoder time per slice (fp32, optionally bf16), a click
(prompted decode), DeSAM box mode, DeSAM grid mode as implemented (PRIM scores every
prompt, PDMM decodes candidates in IoU order until one survives, its image part once per
slice) against the naive procedure (every prompt through the whole decoder), and,
in child processes, the encoder with and without the glibc malloc tuning.
Automatic-mode timings use a decoder file written from the current (untrained) weights:
the arithmetic is the same as for a trained decoder; the masks are not meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_write_bytes


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", default="mobile_sam,lite_medsam,vit_b",
                   help="comma-separated encoders; mobile_sam/lite_medsam use pretrained weights, ViTs random ones")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--grid-size", type=int, default=9)
    p.add_argument("--bf16", action="store_true", help="also time the encoder under bf16 autocast")
    p.add_argument("--no-mallopt-compare", action="store_true", help="skip the malloc on/off child runs")
    p.add_argument("--encoder-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", type=Path, default=Path("bench_engine.json"), help="where to write the results")


def _timeit(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "n": repeats}


def _build(name: str, device: torch.device):
    from .modeling import build_desam, get_spec
    from .weights import fetch_weights

    spec = get_spec(name)
    ckpt = fetch_weights(spec.weights) if spec.family == "tiny_vit" and spec.weights else None
    return build_desam(name, sam_checkpoint=ckpt).to(device), ckpt is not None


def _slice() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    img = np.where((yy - 256) ** 2 + (xx - 256) ** 2 < 200**2, 40.0, -1000.0)
    img += np.where((yy - 230) ** 2 + (xx - 300) ** 2 < 60**2, 60.0, 0.0)
    return (img + rng.normal(0, 15, img.shape)).astype(np.int16)


def bench_model(name: str, args, device: torch.device) -> dict:
    from .engine import IntensityWindow, SlicePredictor, apply_window
    from .engine.preprocess import prepare_input
    from .modeling import SliceDecoderState, load_decoder, save_decoder

    model, pretrained = _build(name, device)
    image = apply_window(_slice(), IntensityWindow.ct_soft_tissue())
    result: dict = {"encoder": name, "pretrained": pretrained}
    fp32 = SlicePredictor(model, precision="fp32")
    x, _ = prepare_input(model, np.repeat(image[:, :, None], 3, axis=2))

    def encode(pred=fp32):
        with torch.no_grad(), pred.precision.autocast():
            model.encode(x)

    result["encode_fp32"] = _timeit(encode, args.repeats)
    if args.bf16:
        bf16 = SlicePredictor(model, precision="bf16")
        result["encode_bf16"] = _timeit(lambda: encode(bf16), max(1, args.repeats // 2))
    if args.encoder_only:
        return result

    fp32.set_image(image)
    if model.convention.supports_points:
        click = dict(point_coords=np.array([[300.0, 230.0]]), point_labels=np.array([1]))
    else:
        click = dict(box=np.array([230.0, 160.0, 370.0, 300.0]))
    result["click_decode"] = _timeit(lambda: fp32.predict(**click, multimask_output=True), args.repeats * 4)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timing_only.safetensors"
        save_decoder(model, path, structure="timing-only", training={"note": "untrained, timing only"})
        load_decoder(model, path)
    n = args.grid_size

    def auto(mode, **kw):
        fp32.features.decoder_state = SliceDecoderState()  # per slice: its shared decoder work is part of the cost
        fp32.predict_auto(mode, **kw)

    result["box_mode"] = _timeit(lambda: auto("box"), args.repeats)
    # iou_threshold -inf: every prompt is a candidate (an untrained PRIM's IoUs say nothing).
    grid_kw = dict(grid_size=n, iou_threshold=float("-inf"), min_region_area=0)
    result["grid_mode"] = _timeit(lambda: auto("grid", **grid_kw), args.repeats)
    result["grid_decoded_prompts"] = fp32.predict_auto("grid", **grid_kw).decoded

    feats = fp32.features

    def naive():
        from .engine.postprocess import grid_points
        from .engine.preprocess import to_input_frame

        pts = to_input_frame(grid_points(n, *feats.original_size), feats.original_size, model.img_size)
        with torch.no_grad():
            for px, py in pts:
                points = (torch.tensor([[[px, py]]], dtype=torch.float, device=device),
                          torch.ones(1, 1, dtype=torch.int, device=device))
                _, logits = model.desam_forward(feats.embedding, feats.taps, points=points)
                model.postprocess_logits(logits, feats.input_size, feats.original_size)

    result["grid_mode_naive"] = _timeit(naive, 1, warmup=0)
    result["grid_speedup_vs_naive"] = result["grid_mode_naive"]["median_ms"] / result["grid_mode"]["median_ms"]
    model.decoder_metadata = None
    return result


def _child_encoder_times(name: str, args, mallopt: bool) -> dict:
    env = dict(os.environ, DESAM_MALLOPT="1" if mallopt else "0")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [sys.executable, "-m", "desam_server.cli", "bench", "--models", name, "--encoder-only",
               "--no-mallopt-compare", "--repeats", str(args.repeats), "--device", args.device, "--json", str(out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["models"][0]["encode_fp32"]


def run_bench(args) -> int:
    from .engine import configure_malloc, cpu_has_native_bf16, resolve_device

    device = resolve_device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    report = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": torch.get_num_threads(), "device": str(device),
                    "cpu_native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
                    "mallopt_applied": configure_malloc()},
        "models": [],
    }
    for name in models:
        print(f"benchmarking {name} ...", file=sys.stderr)
        entry = bench_model(name, args, device)
        if not args.no_mallopt_compare and not args.encoder_only and device.type == "cpu":
            entry["encode_fp32_mallopt_on"] = _child_encoder_times(name, args, True)
            entry["encode_fp32_mallopt_off"] = _child_encoder_times(name, args, False)
        report["models"].append(entry)
    atomic_write_bytes(args.json, json.dumps(report, indent=2).encode())
    if not args.encoder_only:
        _print_table(report)
        print(f"results: {args.json}")
    return 0


def _print_table(report: dict) -> None:
    m = report["machine"]
    print(f"device {m['device']}, {m['threads']} threads, native bf16: {m['cpu_native_bf16']}, torch {m['torch']}")
    cols = ["encoder", "encode fp32", "encode bf16", "click", "box mode", "grid", "grid naive", "speedup",
            "malloc on", "malloc off"]
    print(" | ".join(cols))
    for r in report["models"]:
        def ms(key, r=r):
            return f"{r[key]['median_ms']:.0f} ms" if key in r else "-"
        row = [r["encoder"] + ("" if r["pretrained"] else " (random)"), ms("encode_fp32"), ms("encode_bf16"),
               f"{r['click_decode']['median_ms']:.1f} ms" if "click_decode" in r else "-",
               ms("box_mode"), ms("grid_mode"), ms("grid_mode_naive"),
               f"{r['grid_speedup_vs_naive']:.2f}x" if "grid_speedup_vs_naive" in r else "-",
               ms("encode_fp32_mallopt_on"), ms("encode_fp32_mallopt_off")]
        print(" | ".join(row))
