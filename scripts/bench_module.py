"""The Slicer module's own cost on slicer-core against the real service (MobileSAM, CPU).

1. Click to segment: on a 512 x 512 slice (the sample head CT, 108 x 256 x 256, resampled
   2x in-plane by nearest neighbour to 108 x 512 x 512 with half the spacing), a markups
   point is placed in the scene, then ``prepare_prompt`` (markups world position -> slice
   frame, the segment's current mask read), ``request_prompt`` (the HTTP round trip,
   service decode included) and ``apply_prompt`` (undo record + the slice written into the
   segment). Module work = prepare + apply (target < 10 ms); one cold click (slice not
   encoded yet) then N timed clicks on the encoded slice, each a new point refining the
   slice's current mask.
2. The automatic run over the whole sample CT (108 slices of 256 x 256) with the trained
   'head' decoder from the user's decoder registry (copied into the service's own
   registry): a fresh service (features not cached), then the same run again (cached);
   total and per slice, and ``apply_auto`` (the 108-slice slab written into a segment).
   Without a 'head' decoder the run is skipped and the JSON says so.

Prints a table and writes JSON (default out/bench_module.json). No timed assertions.
Usage: PYTHONPATH=ModelServer:SlicerDeSAM python scripts/bench_module.py [--clicks 20]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import slicer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "Testing" / "ModelServer"))   # slicer_helpers: the slicer-core scene
sys.path.insert(0, str(REPO / "SlicerDeSAM"))

from desam_server.atomic import atomic_write_bytes  # noqa: E402
from desam_server.decoder_registry import default_registry_dir  # noqa: E402
from SlicerDeSAMLib import nodes  # noqa: E402
from SlicerDeSAMLib.requests import AutoOptions  # noqa: E402
from SlicerDeSAMLib.SegmentationLogic import SegmentationLogic  # noqa: E402

import bench_service_lib as lib  # noqa: E402 - after the paths above
from conftest import dice  # noqa: E402
from slicer_helpers import (  # noqa: E402
    add_markups_points,
    add_segmentation,
    add_volume,
    core_scene,
    cranium_head_mask,
    load_cranium,
)


def ms(seconds: float) -> float:
    return seconds * 1e3


def upsampled_cranium(scene):
    """The sample CT as a 108 x 512 x 512 volume node: each voxel split 2 x 2 in-plane,
    spacing halved, voxel centres moved so the volume covers the same space."""
    original, sample = load_cranium(scene)
    geometry = nodes.volume_geometry(original)
    array = np.repeat(np.repeat(slicer.util.arrayFromVolume(original), 2, axis=1), 2, axis=2)
    ijk_to_ras = geometry.local_ijk_to_ras.copy()
    ijk_to_ras[:3, 3] -= 0.25 * (ijk_to_ras[:3, 0] + ijk_to_ras[:3, 1])
    ijk_to_ras[:3, :2] /= 2
    volume = add_volume(scene, array, ijk_to_ras, name="Cranium 512", window=sample.window)
    return volume, original, sample


def click_benchmark(client, clicks: int) -> dict:
    with core_scene() as cs:
        volume, _, sample = upsampled_cranium(cs.scene)
        segmentation, segment_id = add_segmentation(cs.scene, volume, "Head")
        logic = SegmentationLogic(client)
        t0 = time.perf_counter()
        volume_id = logic.request_upload(logic.prepare_volume(volume))
        upload_s = time.perf_counter() - t0
        geometry = nodes.volume_geometry(volume)
        index = sample.reference_slice
        head = cranium_head_mask()[index]
        rows, cols = np.nonzero(np.repeat(np.repeat(head, 2, axis=0), 2, axis=1))
        rng = np.random.default_rng(0)
        markups = add_markups_points(cs.scene, [], name="Foreground")
        records = []
        for _ in range(clicks + 1):
            pick = rng.integers(len(rows))
            world = geometry.slice_pixel_to_world(cols[pick] + 0.5, rows[pick] + 0.5, "k", index)
            point = markups.AddControlPointWorld(*(float(v) for v in world))
            t0 = time.perf_counter()
            position = np.array(markups.GetNthControlPointPositionWorld(point))
            prompt = logic.prepare_prompt(volume, segmentation, segment_id, [position], [1], axis="k")
            t1 = time.perf_counter()
            answer = logic.request_prompt(volume_id, prompt)
            t2 = time.perf_counter()
            logic.apply_prompt(answer, segmentation, segment_id, volume)
            t3 = time.perf_counter()
            records.append({"prepare_ms": ms(t1 - t0), "round_trip_ms": ms(t2 - t1), "apply_ms": ms(t3 - t2),
                            "total_ms": ms(t3 - t0), "module_ms": ms((t1 - t0) + (t3 - t2)),
                            "server_total_ms": ms(answer.timing.get("total_s", float("nan"))),
                            "cached": bool(answer.timing.get("cached")), "mask_input": prompt.mask is not None})
        cold, timed = records[0], records[1:]
        out = {"slice_shape": list(geometry.slice_shape("k")), "volume_shape": list(geometry.shape),
               "upload_s": upload_s, "cold_click": cold, "clicks": len(timed)}
        for key in ("prepare_ms", "round_trip_ms", "apply_ms", "module_ms", "total_ms", "server_total_ms"):
            out[key] = lib.summary(r[key] for r in timed)
        out["cached_share"] = float(np.mean([r["cached"] for r in timed]))
        # In click order (round trip, the service's own time): this machine's speed drifts.
        out["series_ms"] = [[round(r["round_trip_ms"], 1), round(r["server_total_ms"], 1)] for r in timed]
        out["slice_io"] = slice_io_benchmark(logic.slices, segmentation, segment_id, volume, index)
        out["module_target_ms"] = 10.0
        out["module_target_met"] = out["module_ms"]["p50"] < 10.0
        return out


def slice_io_benchmark(io, segmentation, segment_id, volume, index: int, repeats: int = 30) -> dict:
    """SegmentSlices alone on the 512 x 512 slices of a segment that fills the head on every
    slice: ``write_slice`` (into the labelmap layer), ``read_slice``, and Slicer's general
    merge path (SetBinaryLabelmapToSegment MODE_MERGE_MIN then MODE_MERGE_MAX), which the
    writer falls back to for other grids and overlaps."""
    head = np.repeat(np.repeat(cranium_head_mask(), 2, axis=1), 2, axis=2)
    io.write_slab(segmentation, segment_id, volume, "k", 0, head)
    times = {"write_slice_ms": [], "read_slice_ms": [], "merge_path_write_ms": []}
    for n in range(repeats):
        mask = np.roll(head[index], n - repeats // 2, axis=1)
        t0 = time.perf_counter()
        io.write_slice(segmentation, segment_id, volume, "k", index, mask)
        t1 = time.perf_counter()
        back = io.read_slice(segmentation, segment_id, volume, "k", index)
        t2 = time.perf_counter()
        times["write_slice_ms"].append(ms(t1 - t0))
        times["read_slice_ms"].append(ms(t2 - t1))
        if not np.array_equal(back, mask):
            raise RuntimeError("read_slice did not return what write_slice wrote")
    for n in range(min(repeats, 10)):
        t0 = time.perf_counter()
        io._write_merged(segmentation, segment_id, volume, "k", index, np.roll(head[index], n, axis=0)[None])
        times["merge_path_write_ms"].append(ms(time.perf_counter() - t0))
    return {key: lib.summary(values) for key, values in times.items()}


def auto_run(client, logic, volume_id: str, volume_input, slices: int) -> dict:
    t0 = time.perf_counter()
    job = logic.request_auto(volume_id, AutoOptions(axis="k", decoder="head"), volume_input.window)
    while (state := logic.request_job(job["id"]))["state"] in ("queued", "running"):
        time.sleep(0.2)
    if state["state"] != "succeeded":
        raise RuntimeError(f"the automatic job {state['state']}: {state.get('error')}")
    outcome = logic.request_job_result(job["id"])
    total = time.perf_counter() - t0
    return {"total_s": total, "per_slice_ms": ms(total / slices), "service_elapsed_s": state.get("elapsed_s"),
            "outcome": outcome}


def auto_benchmark(workdir: Path) -> dict:
    source = default_registry_dir() / "head"
    if not (source / "versions.json").is_file():
        return {"skipped": f"no trained 'head' decoder in {source} (`make decoders` trains one)"}
    registry = workdir / "registry"
    shutil.copytree(source, registry / "head")
    env = {"DESAM_REGISTRY_DIR": str(registry)}
    with lib.ServiceProcess("mobile_sam", workdir / "auto", env=env) as service, core_scene() as cs:
        volume, _ = load_cranium(cs.scene)
        segmentation, segment_id = add_segmentation(cs.scene, volume, "Head")
        logic = SegmentationLogic(service.client)
        prepared = logic.prepare_volume(volume)
        volume_id = logic.request_upload(prepared)
        slices = prepared.array.shape[0]
        cold = auto_run(service.client, logic, volume_id, prepared, slices)
        warm = auto_run(service.client, logic, volume_id, prepared, slices)
        t0 = time.perf_counter()
        logic.apply_auto(warm["outcome"], segmentation, segment_id, volume)
        apply_s = time.perf_counter() - t0
        labelmap = slicer.util.arrayFromSegmentBinaryLabelmap(segmentation, segment_id, volume) > 0
        result = {"slices": slices, "slice_shape": list(prepared.array.shape[1:]), "apply_auto_ms": ms(apply_s),
                  "dice_vs_head_mask": dice(labelmap, cranium_head_mask()),
                  "review_lowest": logic.review_items(warm["outcome"])[:5]}
        for name, run in (("not_cached", cold), ("cached", warm)):
            result[name] = {k: v for k, v in run.items() if k != "outcome"}
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clicks", type=int, default=20, help="timed clicks (after one cold click)")
    parser.add_argument("--skip-auto", action="store_true", help="only the clicks")
    parser.add_argument("--json", type=Path, default=REPO / "out" / "bench_module.json")
    args = parser.parse_args()
    report = {"load_before": lib.load()}
    with lib.workdir("desam-bench-module-") as tmp:
        empty_registry = {"DESAM_REGISTRY_DIR": str(Path(tmp) / "no-decoders")}
        with lib.ServiceProcess("mobile_sam", Path(tmp) / "clicks", env=empty_registry) as service:
            report["clicks"] = click_benchmark(service.client, args.clicks)
        if not args.skip_auto:
            report["auto"] = auto_benchmark(Path(tmp))
    report["load_after"] = lib.load()
    print_table(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(report, indent=1, default=float).encode())
    print(f"wrote {args.json}")


def print_table(report: dict) -> None:
    c = report["clicks"]
    print(f"click on a {c['slice_shape'][0]} x {c['slice_shape'][1]} slice, median of {c['clicks']} "
          f"(load {report['load_before']}):")
    for key, label in (("prepare_ms", "prepare (markups -> prompt, current mask)"),
                       ("round_trip_ms", "service round trip"), ("server_total_ms", "  of which the service"),
                       ("apply_ms", "apply (undo record + slice write)"), ("module_ms", "module work"),
                       ("total_ms", "click to segment updated")):
        print(f"  {label:44s} p50 {c[key]['p50']:8.2f} ms   p95 {c[key]['p95']:8.2f} ms")
    print(f"  cold click (slice not encoded)               {c['cold_click']['total_ms']:8.1f} ms")
    for key, value in c["slice_io"].items():
        print(f"  SegmentSlices {key:30s} p50 {value['p50']:8.2f} ms   p95 {value['p95']:8.2f} ms")
    a = report.get("auto")
    if a is None:
        return
    if "skipped" in a:
        print(f"automatic run: skipped: {a['skipped']}")
        return
    for name in ("not_cached", "cached"):
        run = a[name]
        print(f"automatic run, {a['slices']} slices, features {name.replace('_', ' ')}: total {run['total_s']:.1f} s, "
              f"{run['per_slice_ms']:.0f} ms per slice")
    print(f"  apply_auto (slab into the segment) {a['apply_auto_ms']:.1f} ms; Dice vs head mask "
          f"{a['dice_vs_head_mask']:.3f}")


if __name__ == "__main__":
    main()
