"""How much does storing encoder features in 16 bits change the masks?

On the sample head CT (InVesalius "Cranium") with pretrained MobileSAM, for ~15 axial
slices that contain the reference head mask: encode each slice once in float32, then
round-trip the features through each storage dtype of the feature cache (float32,
float16, bfloat16) and decode two prompts with each:

- box: the bounding box of the reference mask's largest component (as the demo does);
- click: one foreground point at the component's centre (its centroid, moved to the
  nearest mask pixel when outside), best of SAM's 3 masks by predicted IoU.

Prints a per-slice Dice table (against the reference head mask), the mean/max absolute
Dice change and the fraction of mask pixels that differ from float32, the features'
round-trip error and range, bytes per slice per dtype for MobileSAM and ViT-H, and the
checksum and read costs of a ViT-H-sized disk entry. Writes all of it as JSON
(``--json``, default out/cache_precision.json), atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import torch

DTYPES = ("float32", "float16", "bfloat16")
PROMPTS = ("box", "click")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    denom = int(a.sum()) + int(b.sum())
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(a, b).sum()) / denom


def prompts_for(mask: np.ndarray) -> dict:
    from desam_server.engine.postprocess import largest_component

    comp = largest_component(mask)
    ys, xs = np.nonzero(comp)
    h, w = mask.shape
    box = np.array([xs.min(), ys.min(), min(w, xs.max() + 1), min(h, ys.max() + 1)], dtype=np.float64)
    cy, cx = ys.mean(), xs.mean()
    if not comp[int(round(cy)), int(round(cx))]:
        nearest = np.argmin((ys - cy) ** 2 + (xs - cx) ** 2)
        cy, cx = ys[nearest], xs[nearest]
    point = np.array([[float(cx), float(cy)]])
    return {"box": dict(box=box, multimask_output=False),
            "click": dict(point_coords=point, point_labels=np.array([1]), multimask_output=True)}


def best_mask(pred, kwargs) -> np.ndarray:
    masks, ious, _ = pred.predict(**kwargs)
    return masks[int(np.argmax(ious))]


def feature_error(ref, other) -> dict:
    out = {}
    for name, a, b in zip(("embedding", "tap0", "tap1", "tap2"), [ref.embedding, *ref.taps],
                          [other.embedding, *other.taps], strict=True):
        diff = (a - b).abs()
        out[name] = {"max_abs": float(diff.max()), "rel_rms": float((diff.pow(2).mean() / a.pow(2).mean()).sqrt())}
    return out


def bytes_table() -> dict:
    from desam_server.engine.feature_packed import packed_nbytes_for_shapes
    from desam_server.modeling import get_spec

    table = {}
    for name, spec in (("mobile_sam", get_spec("mobile_sam")), ("vit_h", get_spec("vit_h"))):
        e = spec.embedding_size
        shapes = [(1, 256, e, e)] + [(1, c, s, s) for c, s in zip(spec.tap_channels, spec.tap_sizes, strict=True)]
        table[name] = {"channels_total": 256 + sum(spec.tap_channels),
                       **{d: packed_nbytes_for_shapes(shapes, d) for d in DTYPES}}
    return table


def entry_costs(repeats: int = 5) -> dict:
    """Checksums on a 32 MiB buffer and the cache's put/get costs for a ViT-H entry."""
    from desam_server.engine.feature_cache import FeatureCache, FeatureCacheSettings, FeatureKey
    from desam_server.modeling.desam import ImageFeatures

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3

    data = os.urandom(32 << 20)
    costs = {"checksum_ms_32MiB": {
        "zlib.crc32": best(lambda: zlib.crc32(data)),
        "blake2b": best(lambda: hashlib.blake2b(data, digest_size=16).digest()),
        "sha256": best(lambda: hashlib.sha256(data).digest()),
    }}
    g = torch.Generator().manual_seed(0)
    feats = ImageFeatures(torch.randn(1, 256, 64, 64, generator=g),
                          [torch.randn(1, 1280, 64, 64, generator=g) for _ in range(3)], (1024, 1024), (512, 512))
    key = FeatureKey("bench", "k", 0, 40.0, 400.0, 1, "vit_h", None)
    with tempfile.TemporaryDirectory() as tmp:
        settings = FeatureCacheSettings(directory=Path(tmp), host_bytes=1 << 30, disk_bytes=1 << 30)
        with FeatureCache(settings) as cache:
            t0 = time.perf_counter()
            cache.put(key, feats)
            put_ms = (time.perf_counter() - t0) * 1e3
            host_ms = best(lambda: cache.get(key))
            file_size = cache.stats()["tiers"]["disk"]["bytes_used"]
        with FeatureCache(FeatureCacheSettings(directory=Path(tmp), host_bytes=0, disk_bytes=1 << 30)) as cache:
            disk_ms = best(lambda: cache.get(key))
    costs["vit_h_entry_float16"] = {"file_bytes": file_size, "put_ms_incl_fsync": put_ms,
                                    "get_from_host_ms": host_ms, "get_from_disk_ms": disk_ms}
    return costs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("out/cache_precision.json"), help="JSON output")
    parser.add_argument("--step", type=int, default=6, help="use every n-th slice that contains the mask")
    parser.add_argument("--max-slices", type=int, default=15)
    args = parser.parse_args(argv)

    from desam_server.atomic import atomic_write_bytes
    from desam_server.engine import IntensityWindow, SlicePredictor
    from desam_server.engine.feature_packed import pack_features
    from desam_server.io import read_volume
    from desam_server.modeling import build_desam
    from desam_server.samples import fetch_cranium
    from desam_server.weights import fetch_weights

    sample = fetch_cranium()
    volume = read_volume(sample.volume).array
    head = read_volume(sample.head_mask).array > 0
    window = IntensityWindow(*sample.window)
    with_mask = [k for k in range(head.shape[0]) if head[k].any()]
    slices = with_mask[:: args.step][: args.max_slices]
    model = build_desam("mobile_sam", sam_checkpoint=fetch_weights("mobile_sam"))
    pred = SlicePredictor(model, precision="fp32")
    print(f"MobileSAM (fp32 encoder), {len(slices)} axial slices of {head.shape[0]}: {slices}", flush=True)

    rows, diffs, errors, ranges = [], {d: {p: [0, 0] for p in PROMPTS} for d in DTYPES}, {}, []
    encode_s = []
    for k in slices:
        t0 = time.perf_counter()
        pred.set_image(volume[k], window)
        encode_s.append(time.perf_counter() - t0)
        ref_feats = pred.features
        ranges.append(max(float(t.abs().max()) for t in [ref_feats.embedding, *ref_feats.taps]))
        prompts = prompts_for(head[k])
        row = {"slice": int(k), "mask_pixels": int(head[k].sum()), "dice": {}, "changed_pixels": {}}
        masks32 = {}
        for dtype in DTYPES:
            packed = pack_features(ref_feats, dtype)
            feats = packed.unpack()
            if dtype != "float32":
                errors.setdefault(dtype, []).append(feature_error(ref_feats, feats))
                row.setdefault("fallbacks", {})[dtype] = packed.float32_fallbacks
            pred.set_features(feats)
            for name, kwargs in prompts.items():
                mask = best_mask(pred, kwargs)
                row["dice"].setdefault(name, {})[dtype] = dice(mask, head[k])
                if dtype == "float32":
                    masks32[name] = mask
                changed = int((mask != masks32[name]).sum())
                row["changed_pixels"].setdefault(name, {})[dtype] = changed
                diffs[dtype][name][0] += changed
                diffs[dtype][name][1] += mask.size
        rows.append(row)
        d = row["dice"]
        print(f"  slice {k:3d}: box " + " ".join(f"{d['box'][t]:.4f}" for t in DTYPES)
              + "  click " + " ".join(f"{d['click'][t]:.4f}" for t in DTYPES), flush=True)

    summary = {}
    print("\nDice vs reference head mask (mean over slices) and change vs float32 features")
    print(f"{'prompt':6} {'dtype':9} {'mean Dice':>9} {'mean|dDice|':>11} {'max|dDice|':>10} {'pixels changed':>15}")
    for name in PROMPTS:
        for dtype in DTYPES:
            dices = np.array([r["dice"][name][dtype] for r in rows])
            delta = np.abs(dices - np.array([r["dice"][name]["float32"] for r in rows]))
            changed, total = diffs[dtype][name]
            summary.setdefault(name, {})[dtype] = {
                "mean_dice": float(dices.mean()), "mean_abs_dice_change": float(delta.mean()),
                "max_abs_dice_change": float(delta.max()), "changed_pixel_fraction": changed / total,
                "changed_pixels": changed,
            }
            s = summary[name][dtype]
            print(f"{name:6} {dtype:9} {s['mean_dice']:9.4f} {s['mean_abs_dice_change']:11.2e} "
                  f"{s['max_abs_dice_change']:10.2e} {s['changed_pixel_fraction']:15.2e}")

    feature_summary = {}
    for dtype, per_slice in errors.items():
        feature_summary[dtype] = {
            name: {"max_abs": max(e[name]["max_abs"] for e in per_slice),
                   "mean_rel_rms": float(np.mean([e[name]["rel_rms"] for e in per_slice]))}
            for name in per_slice[0]}
    print("\nFeature round-trip error (max |x - x16| over slices; mean relative RMS)")
    for dtype, table in feature_summary.items():
        print(f"  {dtype:9} " + "  ".join(f"{n}: {v['max_abs']:.2e} / {v['mean_rel_rms']:.2e}"
                                          for n, v in table.items()))
    print(f"  largest |feature| over slices: {max(ranges):.1f} (float16 max 65504)")

    sizes = bytes_table()
    print("\nBytes per slice (computed from shapes)")
    for model_name, row in sizes.items():
        print(f"  {model_name:10} {row['channels_total']:5d} channels: "
              + ", ".join(f"{d} {row[d] / 2**20:.2f} MiB" for d in DTYPES))
    costs = entry_costs()
    print("\nChecksum of 32 MiB: " + ", ".join(f"{k} {v:.1f} ms" for k, v in costs["checksum_ms_32MiB"].items()))
    vh = costs["vit_h_entry_float16"]
    print(f"ViT-H entry (float16, {vh['file_bytes'] / 2**20:.2f} MiB file): put {vh['put_ms_incl_fsync']:.0f} ms "
          f"(incl. fsync), get from host {vh['get_from_host_ms']:.0f} ms, from disk {vh['get_from_disk_ms']:.0f} ms")
    print(f"MobileSAM encode: {np.mean(encode_s):.2f} s per slice (mean)")

    result = {
        "model": "mobile_sam (pretrained), fp32 encoder", "sample": "InVesalius Cranium, axial",
        "window": list(sample.window), "slices": slices, "per_slice": rows, "summary": summary,
        "feature_error": feature_summary, "max_abs_feature": max(ranges), "bytes_per_slice": sizes,
        "costs": costs, "encode_seconds_mean": float(np.mean(encode_s)),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
