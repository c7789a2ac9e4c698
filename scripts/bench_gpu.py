"""The engine on a GPU: encoder throughput, click latency, and what bf16 changes.

In-process (no service), on ``--device`` (default cuda):

1. encoder throughput, slices per second, per encoder (``--encoders``; MobileSAM with its
   pretrained weights, SAM ViTs with random weights -- the arithmetic is the same) and
   precision (fp32; bf16 autocast, what ``auto`` picks on a GPU), at batch 1 and
   ``--batch``;
2. a click's decode (MobileSAM, one point, multimask) on a cached embedding, interleaved:
   ``SlicePredictor.predict`` with the fast path, without it (the modules), and
   ``segment_anything.SamPredictor.predict`` (SAM's stock decoder, loaded from the same
   checkpoint), each call synchronised;
3. bf16 against fp32 on several slices of the sample head CT (MobileSAM, box prompt from
   the reference head mask): Dice between the two masks and against the reference, and
   our predictor against SamPredictor on the same embedding (pixels that differ).

The CT comes from the sample cache (``desam-server fetch-sample``), or from ``--ct-npz``
(arrays ``volume``, ``head``, ``window``, ``slices``: for a machine without the sample
cache or SimpleITK). Prints tables and writes JSON (--json, default out/bench_gpu.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--encoders", default="mobile_sam,vit_b,vit_h")
    p.add_argument("--batch", type=int, default=8, help="second batch size for the throughput")
    p.add_argument("--repeats", type=int, default=20, help="timed encoder calls per setting")
    p.add_argument("--clicks", type=int, default=200, help="timed clicks per decoder")
    p.add_argument("--ct-npz", type=Path, default=None)
    p.add_argument("--json", type=Path, default=Path("out/bench_gpu.json"))
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def stats(ms: list[float]) -> dict:
    v = np.asarray(ms)
    return {"n": int(v.size), "p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)),
            "min": float(v.min())}


def build(name: str, device: torch.device):
    from desam_server.modeling import build_desam
    from desam_server.weights import fetch_weights

    torch.manual_seed(0)
    checkpoint = fetch_weights(name) if name in ("mobile_sam", "lite_medsam") else None
    return build_desam(name, sam_checkpoint=checkpoint).to(device)


def encoder_throughput(names, device, batch: int, repeats: int) -> dict:
    from desam_server.engine.runtime import choose_precision

    out = {}
    for name in names:
        model = build(name, device)
        side = model.img_size
        for precision in ("fp32", "bf16"):
            p = choose_precision(device, precision)
            for b in (1, batch):
                x = torch.randn(b, 3, side, side, device=device)

                def run(model=model, x=x, p=p):
                    with torch.inference_mode(), p.autocast():
                        model.encode(x)

                for _ in range(3):
                    run()
                ms = timed(run, device, repeats)
                s = stats(ms)
                s["slices_per_s"] = b * 1e3 / s["p50"]
                out[f"{name}/{precision}/batch{b}"] = s
                print(f"encode {name:10s} {precision} batch {b:2d}: {s['p50']:8.2f} ms p50, "
                      f"{s['slices_per_s']:7.1f} slices/s", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def load_ct(path: Path | None) -> dict:
    if path is not None:
        data = np.load(path)
        return {"volume": data["volume"], "head": data["head"].astype(bool), "window": tuple(data["window"]),
                "slices": [int(s) for s in data["slices"]]}
    from desam_server.io import read_volume
    from desam_server.samples import fetch_cranium

    sample = fetch_cranium()
    volume = read_volume(sample.volume).array
    head = read_volume(sample.head_mask).array > 0
    slices = [int(s) for s in np.linspace(15, volume.shape[0] - 15, 7).round()]
    return {"volume": volume, "head": head, "window": tuple(sample.window), "slices": slices}


def stock_predictor(model, features):
    """SamPredictor with SAM's own prompt encoder and mask decoder classes, loaded from
    the model's (MobileSAM) modules' weights, on the model's device, features set."""
    from segment_anything import SamPredictor
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    sam = Sam(image_encoder=model.image_encoder,
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64),
                                           input_image_size=(1024, 1024), mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256,
                  iou_head_depth=3, iou_head_hidden_dim=256))
    sam.prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    sam.mask_decoder.load_state_dict(model.mask_decoder.state_dict())
    sam = sam.to(model.device).eval()
    predictor = SamPredictor(sam)
    predictor.features = features.embedding
    predictor.input_size, predictor.original_size = tuple(features.input_size), tuple(features.original_size)
    predictor.is_image_set = True
    return predictor


def box_of(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def clicks_and_precision(device, ct: dict, clicks: int) -> dict:
    from desam_server.engine import IntensityWindow, SlicePredictor

    model = build("mobile_sam", device)
    window = IntensityWindow(*ct["window"])
    k = ct["slices"][len(ct["slices"]) // 2]
    fast, plain = SlicePredictor(model, precision="bf16"), SlicePredictor(model, precision="bf16", fast=None)
    fast.set_image(ct["volume"][k], window)
    plain.set_features(fast.features)
    stock = stock_predictor(model, fast.features)
    ys, xs = np.nonzero(ct["head"][k])
    point = dict(point_coords=np.array([[float(xs.mean()), float(ys.mean())]]), point_labels=np.array([1]))
    runs = {"fast_path": lambda: fast.predict(**point), "modules": lambda: plain.predict(**point),
            "stock_SamPredictor": lambda: stock.predict(**point)}
    times = {name: [] for name in runs}
    for r in range(clicks + 10):
        for name, fn in runs.items():
            ms = timed(fn, device, 1)[0]
            if r >= 10:
                times[name].append(ms)
    click = {name: stats(v) for name, v in times.items()}
    click["fast_vs_stock_median_ratio"] = statistics.median(
        a / b for a, b in zip(times["fast_path"], times["stock_SamPredictor"], strict=True))
    for name, s in click.items():
        if isinstance(s, dict):
            print(f"click decode {name:20s}: {s['p50']:7.2f} ms p50, {s['p95']:7.2f} p95", flush=True)
    print(f"click fast path / SamPredictor: {click['fast_vs_stock_median_ratio']:.3f}", flush=True)

    per_slice = []
    for k in ct["slices"]:
        head = ct["head"][k]
        if not head.any():
            continue
        box = box_of(head)
        masks = {}
        for precision in ("fp32", "bf16"):
            pred = SlicePredictor(model, precision=precision)
            pred.set_image(ct["volume"][k], window)
            masks[precision] = pred.predict(box=box, multimask_output=False)[0][0]
            if precision == "bf16":
                theirs = stock_predictor(model, pred.features).predict(box=box, multimask_output=False)[0][0]
                ours = masks["bf16"]
        row = {"slice": k, "head_pixels": int(head.sum()), "dice_bf16_vs_fp32": dice(masks["bf16"], masks["fp32"]),
               "dice_fp32_vs_reference": dice(masks["fp32"], head), "dice_bf16_vs_reference": dice(masks["bf16"], head),
               "pixels_ours_vs_stock_differing": int(np.sum(ours != theirs))}
        per_slice.append(row)
        print(f"slice {k:3d}: Dice bf16/fp32 {row['dice_bf16_vs_fp32']:.4f}, vs reference fp32 "
              f"{row['dice_fp32_vs_reference']:.4f} bf16 {row['dice_bf16_vs_reference']:.4f}, ours vs stock "
              f"{row['pixels_ours_vs_stock_differing']} px", flush=True)
    return {"click_decode_ms": click, "slices": per_slice}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    from desam_server.engine.runtime import configure_malloc

    configure_malloc()
    env = {"torch": torch.__version__, "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    print(env, flush=True)
    result = {"environment": env}
    ct = load_ct(args.ct_npz)
    result["mobile_sam"] = clicks_and_precision(device, ct, args.clicks)
    result["encoders"] = encoder_throughput([e for e in args.encoders.split(",") if e], device, args.batch,
                                            args.repeats)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"written: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
