"""Benchmark the DeSAM service end to end: a real ``desam-server serve`` child process,
driven only through the Slicer module's ``ServerClient``, as the module would drive it.

Per model (--models, default mobile_sam,vit_b; ViTs run with random weights):

1. click round trip p50/p95/mean on a cached slice of the sample head CT (multimask, the
   point jittered per click), with the service's own decode_s / total_s so that the
   client + HTTP overhead shows; a correction session on that slice (each click adds a
   point and refines the previous answer by its logits_id); the clicks on a 512 x 512
   slice of the synthetic CT (scripts/bench_clicks.py);
3. encode throughput: precompute of an N-slice volume, polled until all are cached;
4. upload of a 512 x 512 x 300 int16 synthetic CT (scripts/bench_wire.py's phantom):
   volume id, client-side encode, the whole upload_volume call, and a repeat (skipped);
5. feature-cache bytes per slice and tier (/info before and after step 3);
6. DeSAM grid (and box) mode through the service as a job, with a decoder file written
   from untrained weights (iou_threshold 0, the API's floor; the engine bench uses -inf),
   and the engine bench's in-process grid vs the naive 81-pass procedure
   (desam_server.bench.bench_model) for the speedup. Jobs run on already-cached slices.

2. A scripted scroll-and-click session on the head CT (--session-models, default
mobile_sam only: a random ViT-B encodes too slowly for a scroll to mean anything): scroll
slice by slice with --dwell seconds per slice, clicking right after arriving on every
5th; once calling set_view on every slice (view priority: the service encodes the slice
on screen and its neighbours first) and once not. Every pass uses a fresh service (cold
cache), warmed up on a different intensity window so that its first encoder pass is not
a cold start. Reports first-click latency and the share of clicks whose slice was cached.

Targets (printed, never asserted): click p50 <= 40 ms, p95 <= 60 ms; grid >= 10x naive.
Prints tables and writes JSON atomically (--json, default out/bench_service.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from SlicerDeSAMLib import wire

import bench_service_lib as lib
from bench_clicks import TARGETS, clicks_during_job, cold_click, ms, prompt_kwargs, refine_clicks, timed_clicks

OTHER_WINDOW = (40.0, 400.0)   # warm-up window: its features never serve the session's clicks


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobile_sam,vit_b", help="comma-separated encoders")
    p.add_argument("--session-models", default="mobile_sam", help="models for the scroll session ('' skips it)")
    p.add_argument("--clicks", type=int, default=50, help="timed clicks per slice type")
    p.add_argument("--dwell", type=float, default=0.5, help="seconds on each slice in the scroll session")
    p.add_argument("--encode-slices", type=int, default=8, help="slices precomputed for the throughput")
    p.add_argument("--upload-slices", type=int, default=300, help="K of the 512 x 512 x K upload")
    p.add_argument("--auto-slices", type=int, default=3, help="slices per automatic (grid/box) job")
    p.add_argument("--session-slices", type=int, default=20, help="slices scrolled per session pass")
    p.add_argument("--session-passes", type=int, default=3, help="passes per variant (each on a fresh service)")
    p.add_argument("--click-every", type=int, default=5, help="click on every n-th slice of the scroll")
    p.add_argument("--engine-repeats", type=int, default=3, help="repeats of the in-process engine bench")
    p.add_argument("--no-engine", action="store_true",
                   help="skip the in-process engine bench (its naive grid pass takes minutes)")
    p.add_argument("--quick", action="store_true", help="small counts, no engine bench: a smoke run")
    p.add_argument("--json", type=Path, default=Path("out/bench_service.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.clicks, args.encode_slices, args.upload_slices, args.auto_slices = 10, 3, 40, 1
        args.session_slices, args.session_passes, args.no_engine = 10, 1, True
    return args


def bench_upload(client, slices: int) -> dict:
    """Step 4; returns the result and (volume id, array) for the 512 x 512 clicks."""
    vol, geom = lib.phantom(slices)
    t0 = time.perf_counter()
    wire.volume_id(vol, **geom)
    t_id = time.perf_counter() - t0
    t0 = time.perf_counter()
    payload = wire.encode_volume(vol, **geom)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    vid, sent = client.upload_volume(vol, **geom)
    t_total = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, sent_again = client.upload_volume(vol, **geom)
    t_again = time.perf_counter() - t0
    return {"shape": list(vol.shape), "raw_mb": vol.nbytes / 1e6, "payload_mb": len(payload) / 1e6,
            "volume_id_s": t_id, "client_encode_s": t_enc, "upload_volume_s": t_total,
            "post_s_estimate": t_total - t_id - t_enc, "sent": sent,
            "repeat_upload_volume_ms": ms(t_again), "repeat_sent": sent_again}, (vid, vol)


def cache_tiers(info: dict) -> dict:
    return {name: (t.get("entries", 0), t.get("bytes_used", 0)) for name, t in info["cache"]["tiers"].items()}


def bench_encode_and_cache(client, ct: lib.Cranium, n: int) -> tuple[dict, dict, str]:
    """Steps 3 and 5 on an n-slice crop of the head CT (a volume of its own: cold cache)."""
    k0 = max(0, ct.reference_slice - n // 2)
    vid, _ = client.upload_volume(np.ascontiguousarray(ct.array[k0:k0 + n]), **ct.geometry)
    before = lib.wait_idle(client)
    t0 = time.perf_counter()
    client.precompute(vid, "k", window=ct.window)
    while (prog := client.progress(vid, "k", window=ct.window))["cached"] < prog["total"]:
        time.sleep(0.1)
    elapsed = time.perf_counter() - t0
    after = lib.wait_idle(client)
    encoded = after["scheduler"]["encoded"] - before["scheduler"]["encoded"]
    enc_s = after["scheduler"]["encode_seconds"] - before["scheduler"]["encode_seconds"]
    encode = {"slices": prog["total"], "elapsed_s": elapsed, "slices_per_s": prog["total"] / elapsed,
              "server_encode_s_per_slice": enc_s / encoded if encoded else None}
    b, a = cache_tiers(before), cache_tiers(after)
    cache = {"storage_dtype": after["cache"]["storage_dtype"]}
    for tier in a:
        entries, nbytes = a[tier][0] - b[tier][0], a[tier][1] - b[tier][1]
        cache[tier] = {"entries_added": entries, "bytes_added": nbytes,
                       "bytes_per_slice": nbytes / entries if entries else None}
    return encode, cache, vid


def bench_auto(client, vid: str, decoder: str, mode: str, n: int, window) -> dict:
    """Step 6 through the service: one job over n cached slices."""
    t0 = time.perf_counter()
    job = client.segment_auto(vid, axis="k", start=0, stop=n, mode=mode, decoder=decoder, window=window,
                              grid_size=9, iou_threshold=0.0, min_region_area=0)
    final = client.wait_job(job["id"], poll=0.1, timeout=1800)
    wall = time.perf_counter() - t0
    out = {"mode": mode, "slices": n, "state": final["state"], "error": final["error"],
           "job_elapsed_s": final["elapsed_s"], "client_wall_s": wall}
    if final["state"] == "succeeded":
        out["s_per_slice"] = final["elapsed_s"] / n
        out["result_shape"] = list(client.job_result(job["id"]).mask.shape)
    return out


def engine_grid(name: str, repeats: int) -> dict:
    """The engine bench's in-process numbers (desam_server.bench.bench_model)."""
    import torch

    from desam_server.bench import bench_model

    ns = argparse.Namespace(repeats=repeats, grid_size=9, bf16=False, encoder_only=False)
    r = bench_model(name, ns, torch.device("cpu"))
    return {k: r[k] for k in ("encode_fp32", "click_decode", "box_mode", "grid_mode", "grid_mode_naive",
                              "grid_decoded_prompts", "grid_speedup_vs_naive") if k in r}


def bench_model(name: str, args, ct: lib.Cranium, files: dict, work: Path, res: dict) -> None:
    """Steps 1 and 3-6 for one model, filling ``res`` as it goes (partial on Ctrl-C)."""
    from desam_server.modeling import get_spec

    points = get_spec(name).convention.supports_points
    checkpoint, decoder, pretrained = files[name]
    res.update({"encoder": name, "pretrained": pretrained, "prompt": "point" if points else "box",
                "load_start": lib.load()})
    with lib.ServiceProcess(name, work / name, sam_checkpoint=checkpoint, decoder=decoder) as svc:
        c = svc.client
        res["startup_s"] = svc.startup_s
        info = c.info()
        res["service"] = {"model": info["model"], "settings_neighbours": info["settings"]["neighbours"]}
        print(f"[{name}] service up in {svc.startup_s:.1f} s; clicks on the head CT ...", file=sys.stderr)
        k = ct.reference_slice
        vid, _ = c.upload_volume(ct.array, **ct.geometry)
        res["cold_click_ms"] = cold_click(c, vid, k, ct.centroid(k), points, ct.window)
        lib.wait_idle(c)
        res["click_ct"] = timed_clicks(c, vid, k, ct.centroid(k), args.clicks, points, ct.window)
        res["refine_ct"] = refine_clicks(c, vid, k, ct.centroid(k), args.clicks, points, ct.window)
        print(f"[{name}] upload 512x512x{args.upload_slices} ...", file=sys.stderr)
        res["upload"], (vid512, vol) = bench_upload(c, args.upload_slices)
        k512 = vol.shape[0] // 2
        res["cold_click_512_ms"] = cold_click(c, vid512, k512, (300.0, 250.0), points)
        lib.wait_idle(c)
        res["click_512"] = timed_clicks(c, vid512, k512, (300.0, 250.0), args.clicks, points, seed=1)
        del vol
        print(f"[{name}] encode throughput, {args.encode_slices} slices ...", file=sys.stderr)
        res["encode"], res["cache_bytes"], sub = bench_encode_and_cache(c, ct, args.encode_slices)
        print(f"[{name}] grid and box mode through the service ...", file=sys.stderr)
        n_auto = min(args.auto_slices, args.encode_slices)
        res["grid_service"] = bench_auto(c, sub, decoder.stem, "grid", n_auto, ct.window)
        res["box_service"] = bench_auto(c, sub, decoder.stem, "box", n_auto, ct.window)
        res["click_during_grid_job"] = clicks_during_job(
            c, sub, 0, ct.centroid(ct.reference_slice), points, ct.window,
            dict(axis="k", start=0, stop=n_auto, mode="grid", decoder=decoder.stem, grid_size=9,
                 iou_threshold=0.0, min_region_area=0))
        res["info_after"] = {"scheduler": (i := c.info())["scheduler"], "logits_kept": i["logits_kept"]}
        res["service_log_problems"] = svc.log_problems()
        res["load_service_end"] = lib.load()
    if args.no_engine:
        return
    print(f"[{name}] in-process engine bench (grid vs naive) ...", file=sys.stderr)
    res["engine"] = eng = engine_grid(name, args.engine_repeats)
    g = res["grid_service"]
    if "grid_mode_naive" in eng and g.get("s_per_slice"):
        res["grid_service_speedup_vs_naive"] = eng["grid_mode_naive"]["median_ms"] / ms(g["s_per_slice"])
    res["grid_target_met"] = eng.get("grid_speedup_vs_naive", 0) >= TARGETS["grid_speedup"]


def scroll_pass(name, args, ct, files, work: Path, view: bool, start: int) -> dict:
    """Step 2, one pass on a fresh service: scroll [start, start + session_slices)."""
    from desam_server.modeling import get_spec

    checkpoint, _, _ = files[name]
    points = get_spec(name).convention.supports_points
    with lib.ServiceProcess(name, work, sam_checkpoint=checkpoint) as svc:
        c = svc.client
        vid, _ = c.upload_volume(ct.array, **ct.geometry)
        cold_click(c, vid, 0, ct.centroid(0), points, OTHER_WINDOW)   # warm-up; other window, other features
        lib.wait_idle(c)
        clicks = []
        for n, k in enumerate(range(start, start + args.session_slices)):
            arrived = time.perf_counter()
            if view:
                c.set_view(vid, "k", k, window=ct.window)
            if (n + 1) % args.click_every == 0:
                t0 = time.perf_counter()
                r = c.segment_prompt(vid, "k", k, window=ct.window, **prompt_kwargs(*ct.centroid(k), points))
                clicks.append({"slice": k, "latency_ms": ms(time.perf_counter() - t0), "cached": r.timing["cached"],
                               "features_ms": ms(r.timing["features_s"]), "decode_ms": ms(r.timing["decode_s"])})
            time.sleep(max(0.0, args.dwell - (time.perf_counter() - arrived)))
        sched = c.info()["scheduler"]
        problems = svc.log_problems()
    return {"start": start, "load_end": lib.load(), "clicks": clicks, "encoded": sched["encoded"] - 1,
            "cancelled_obsolete": sched["cancelled_obsolete"], "log_problems": problems}


def session(name, args, ct, files, work: Path, out: list) -> None:
    """Step 2 for one model: both variants, ``session_passes`` passes each; appends to ``out``."""
    k_max = ct.array.shape[0] - args.session_slices
    starts = np.linspace(min(5, k_max), k_max - min(5, k_max), args.session_passes).astype(int).tolist()
    for view in (True, False):
        entry = {"encoder": name, "view_priority": view, "dwell_s": args.dwell, "passes": []}
        out.append(entry)
        for p, start in enumerate(starts):
            print(f"[{name}] scroll session, view priority {'on' if view else 'off'}, pass {p + 1}/{len(starts)} "
                  f"(slices {start}..{start + args.session_slices - 1}) ...", file=sys.stderr)
            entry["passes"].append(scroll_pass(name, args, ct, files, work / f"session_{int(view)}_{p}", view, start))
            clicks = [c for q in entry["passes"] for c in q["clicks"]]
            entry["first_click_ms"] = lib.summary(c["latency_ms"] for c in clicks)
            entry["cached_share"] = float(np.mean([c["cached"] for c in clicks])) if clicks else None


def print_tables(report: dict) -> None:
    m = report["machine"]
    print(f"\n{m['platform']}, {m['cpus']} CPUs, load {m['load_start']} -> {m['load_end']}")
    models = [r for r in report["models"] if "encoder" in r]

    def row(label, fn):
        cells = []
        for r in models:
            try:
                cells.append(fn(r))
            except (KeyError, TypeError, ZeroDivisionError):
                cells.append("-")
        print(f"{label:<44}" + "".join(f"{c:>30}" for c in cells))

    def dist(d):
        return f"{d['p50']:.1f} / {d['p95']:.1f} / {d['mean']:.1f}"

    def met(ok):
        return "pass" if ok else "MISS"

    if not models:
        return print_session(report)
    row("metric", lambda r: r["encoder"] + ("" if r["pretrained"] else " (random)"))
    row("service startup (s) / torch threads",
        lambda r: f"{r['startup_s']:.1f} / {r['service']['model']['threads']}")
    row("cold click, encode + decode (ms)", lambda r: f"{r['cold_click_ms']:.0f}")
    row("click CT 256² p50/p95/mean (ms)", lambda r: dist(r["click_ct"]["round_trip_ms"]))
    row(f"  target p50 <= {TARGETS['click_p50_ms']:.0f} ms / p95 <= {TARGETS['click_p95_ms']:.0f} ms",
        lambda r: f"{met(r['click_ct']['target']['p50_met'])} / {met(r['click_ct']['target']['p95_met'])}")
    row("  server decode_s p50 (ms)", lambda r: f"{r['click_ct']['server_decode_ms']['p50']:.1f}")
    row("  server total_s p50 (ms)", lambda r: f"{r['click_ct']['server_total_ms']['p50']:.1f}")
    row("  client + HTTP overhead p50 (ms)", lambda r: f"{r['click_ct']['overhead_ms']['p50']:.1f}")
    row("refinement click CT (logits_id) p50/p95/mean", lambda r: dist(r["refine_ct"]["round_trip_ms"]))
    row("  server decode_s p50 (ms)", lambda r: f"{r['refine_ct']['server_decode_ms']['p50']:.1f}")
    row("click 512² p50/p95/mean (ms)", lambda r: dist(r["click_512"]["round_trip_ms"]))
    row("  target p50 / p95", lambda r: f"{met(r['click_512']['target']['p50_met'])} / "
                                         f"{met(r['click_512']['target']['p95_met'])}")
    row("  server decode_s / overhead p50 (ms)", lambda r: f"{r['click_512']['server_decode_ms']['p50']:.1f} / "
                                                          f"{r['click_512']['overhead_ms']['p50']:.1f}")
    row("encode throughput (slices/s)", lambda r: f"{r['encode']['slices_per_s']:.2f}")
    row("  server encoder s/slice", lambda r: f"{r['encode']['server_encode_s_per_slice']:.2f}")
    row("upload shape", lambda r: "x".join(map(str, r["upload"]["shape"])))
    row("  payload MB (raw MB)", lambda r: f"{r['upload']['payload_mb']:.1f} ({r['upload']['raw_mb']:.0f})")
    row("  volume id / client encode (s)", lambda r: f"{r['upload']['volume_id_s']:.2f} / "
                                                    f"{r['upload']['client_encode_s']:.2f}")
    row("  upload_volume total (s)", lambda r: f"{r['upload']['upload_volume_s']:.2f}")
    row("  repeat upload_volume (ms, sent?)", lambda r: f"{r['upload']['repeat_upload_volume_ms']:.0f} "
                                                       f"({r['upload']['repeat_sent']})")
    for tier in ("device", "host", "disk"):
        row(f"cache KiB/slice, {tier}", lambda r, t=tier: f"{r['cache_bytes'][t]['bytes_per_slice'] / 1024:.0f}")
    row("grid mode via service (s/slice)", lambda r: f"{r['grid_service']['s_per_slice']:.3f}")
    row("box mode via service (s/slice)", lambda r: f"{r['box_service']['s_per_slice']:.3f}")
    row("click during a grid job p50/p95/mean (ms)", lambda r: dist(r["click_during_grid_job"]["round_trip_ms"]))
    row("  clicks / max (ms)", lambda r: f"{r['click_during_grid_job']['clicks']} / "
                                        f"{r['click_during_grid_job']['max_ms']:.0f}")
    row("engine grid / naive (ms)", lambda r: f"{r['engine']['grid_mode']['median_ms']:.0f} / "
                                              f"{r['engine']['grid_mode_naive']['median_ms']:.0f}")
    row(f"engine grid speedup (target >= {TARGETS['grid_speedup']:.0f}x)",
        lambda r: f"{r['engine']['grid_speedup_vs_naive']:.1f}x {met(r['grid_target_met'])}")
    row("naive / service grid per slice", lambda r: f"{r['grid_service_speedup_vs_naive']:.1f}x")
    row("engine encode / click decode (ms)", lambda r: f"{r['engine']['encode_fp32']['median_ms']:.0f} / "
                                                       f"{r['engine']['click_decode']['median_ms']:.1f}")
    row("service log warnings/errors", lambda r: str(len(r["service_log_problems"])))
    row("1-min load: start / service part end", lambda r: f"{r['load_start'][0]:.1f} / {r['load_service_end'][0]:.1f}")
    print_session(report)


def print_session(report: dict) -> None:
    if report["session"]:
        print("\nscroll-and-click session: first click after arriving on every n-th slice")
        print(f"{'encoder':<12}{'dwell s':>8}{'view priority':>15}{'clicks':>8}{'p50 ms':>9}{'p95 ms':>9}"
              f"{'cached':>8}{'encoded':>9}")
        for s in report["session"]:
            d = s.get("first_click_ms", {"n": 0})
            print(f"{s['encoder']:<12}{s['dwell_s']:>8.2f}{'on' if s['view_priority'] else 'off':>15}{d['n']:>8}"
                  f"{d.get('p50', float('nan')):>9.0f}{d.get('p95', float('nan')):>9.0f}"
                  f"{(s['cached_share'] or 0) * 100:>7.0f}%{sum(p['encoded'] for p in s['passes']):>9}")


def main(argv=None) -> int:
    from desam_server.atomic import atomic_write_bytes

    args = parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    session_models = [m.strip() for m in args.session_models.split(",") if m.strip()]
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "load_start": lib.load()},
              "options": {k: str(v) for k, v in vars(args).items()},
              "desam_env": {k: v for k, v in os.environ.items() if k.startswith("DESAM_")
                            and k not in lib.DROPPED_ENV},
              "targets": TARGETS, "models": [], "session": [], "interrupted": False}
    rc = 0
    with lib.sigterm_as_interrupt():
        try:
            with lib.workdir() as tmp:   # a Ctrl-C during its removal counts as one during the run
                work = Path(tmp)
                ct = lib.cranium()
                files = {n: lib.model_files(n, work / "files") for n in dict.fromkeys(models + session_models)}
                for name in models:
                    report["models"].append(res := {})
                    bench_model(name, args, ct, files, work, res)
                for name in session_models:
                    session(name, args, ct, files, work / f"session_{name}", report["session"])
        except KeyboardInterrupt:
            print("interrupted: the service was stopped; writing the partial results", file=sys.stderr)
            report["interrupted"], rc = True, 130
        except Exception:  # noqa: BLE001 - a bench bug or a service failure: keep what was measured
            traceback.print_exc()
            print("failed: writing the partial results", file=sys.stderr)
            report["error"], rc = traceback.format_exc(limit=-3), 1
    report["machine"]["load_end"] = lib.load()
    atomic_write_bytes(args.json, json.dumps(report, indent=2, default=str).encode())
    print_tables(report)
    print(f"\nresults: {args.json}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
