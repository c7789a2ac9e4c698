"""Click timings of scripts/bench_service.py, through the Slicer module's ``ServerClient``.

- ``timed_clicks``: n independent clicks on a cached slice (multimask, the point jittered
  by up to 6 px per click): the target's measurement.
- ``refine_clicks``: a correction session on a cached slice as a user runs it: every
  click adds a point (alternately negative and positive) to the previous ones and refines
  the previous answer by its ``logits_id`` (SAM's mask input, one mask per answer).
- ``cold_click``: one click whose slice still has to be encoded.
- ``clicks_during_job``: clicks on a cached slice while a batch-segmentation job runs on
  the same compute thread (they run at the job's serve points).
"""

from __future__ import annotations

import time

import numpy as np

import bench_service_lib as lib

TARGETS = {"click_p50_ms": 40.0, "click_p95_ms": 60.0, "grid_speedup": 10.0}


def ms(seconds: float) -> float:
    return seconds * 1e3


def prompt_kwargs(x: float, y: float, points: bool) -> dict:
    """A click at (x, y), or a 60-pixel box around it for box-only encoders (LiteMedSAM)."""
    return {"points": [[x, y]]} if points else {"box": [x - 30, y - 30, x + 30, y + 30]}


def _report(rtt, results) -> dict:
    timing = [r.timing for r in results]
    out = {"round_trip_ms": lib.summary(rtt),
           "server_decode_ms": lib.summary(ms(t["decode_s"]) for t in timing),
           "server_total_ms": lib.summary(ms(t["total_s"]) for t in timing),
           "server_features_ms": lib.summary(ms(t["features_s"]) for t in timing),
           "overhead_ms": lib.summary(np.subtract(rtt, [ms(t["total_s"]) for t in timing])),
           "cached_share": float(np.mean([bool(t["cached"]) for t in timing])),
           "masks": len(results[-1].masks), "slice_shape": list(results[-1].masks.shape[1:]),
           # In click order: this machine's speed drifts within seconds, which the
           # percentiles hide and the series shows (round trip, server decode).
           "series_ms": [[round(a, 1), round(ms(t["decode_s"]), 1)] for a, t in zip(rtt, timing, strict=True)]}
    p50, p95 = out["round_trip_ms"]["p50"], out["round_trip_ms"]["p95"]
    out["target"] = {"p50_ms": TARGETS["click_p50_ms"], "p95_ms": TARGETS["click_p95_ms"],
                     "p50_met": p50 <= TARGETS["click_p50_ms"], "p95_met": p95 <= TARGETS["click_p95_ms"]}
    return out


def timed_clicks(client, vid: str, k: int, center, n: int, points: bool, window=None, seed: int = 0) -> dict:
    """One untimed click (warms decoder and caches), then n timed ones on slice k; the
    slice must be encoded already."""
    rng = np.random.default_rng(seed)
    rtt, results = [], []
    for i in range(n + 1):
        x, y = np.asarray(center, float) + rng.uniform(-6, 6, 2)
        t0 = time.perf_counter()
        r = client.segment_prompt(vid, "k", k, multimask=True, window=window, **prompt_kwargs(x, y, points))
        dt = time.perf_counter() - t0
        if i:
            rtt.append(ms(dt))
            results.append(r)
    return _report(rtt, results)


def refine_clicks(client, vid: str, k: int, center, n: int, points: bool, window=None, seed: int = 0) -> dict:
    """A first click (untimed), then n timed refinements of the previous answer (its
    logits_id), each adding a point within 25 px of the first (a box of the same size
    for box-only encoders); after 8 points the list starts again from the first."""
    rng = np.random.default_rng(seed)
    c = np.asarray(center, float)
    first = prompt_kwargs(*c, points)
    r = client.segment_prompt(vid, "k", k, multimask=True, window=window, **first)
    logits_id = r.logits_ids[r.best]
    clicks, labels = [list(c)], [1]
    rtt, results = [], []
    for i in range(n):
        x, y = c + rng.uniform(-25, 25, 2)
        if points:
            if len(clicks) == 8:
                clicks, labels = clicks[:1], labels[:1]
            clicks.append([x, y])
            labels.append(i % 2)
            prompt = {"points": clicks, "labels": labels}
        else:
            prompt = prompt_kwargs(x, y, False)
        t0 = time.perf_counter()
        r = client.segment_prompt(vid, "k", k, multimask=False, window=window, logits_id=logits_id, **prompt)
        rtt.append(ms(time.perf_counter() - t0))
        results.append(r)
        logits_id = r.logits_ids[0]
    return _report(rtt, results)


def cold_click(client, vid, k, center, points, window=None) -> float:
    t0 = time.perf_counter()
    client.segment_prompt(vid, "k", k, multimask=True, window=window, **prompt_kwargs(*center, points))
    return ms(time.perf_counter() - t0)


def clicks_during_job(client, vid: str, k: int, center, points: bool, window, job: dict, n: int = 30,
                      seed: int = 0) -> dict:
    """Start the job (``segment_auto`` keyword arguments), then click on slice k (cached)
    every 50-150 ms until it ends or n clicks were made. Round trips of clicks sent while
    the job was running."""
    rng = np.random.default_rng(seed)
    started = client.segment_auto(vid, window=window, **job)
    rtt = []
    while len(rtt) < n and client.job(started["id"])["state"] in ("queued", "running"):
        x, y = np.asarray(center, float) + rng.uniform(-6, 6, 2)
        t0 = time.perf_counter()
        client.segment_prompt(vid, "k", k, multimask=True, window=window, **prompt_kwargs(x, y, points))
        rtt.append(ms(time.perf_counter() - t0))
        time.sleep(rng.uniform(0.05, 0.15))
    final = client.wait_job(started["id"], poll=0.1, timeout=1800)
    return {"clicks": len(rtt), "round_trip_ms": lib.summary(rtt) if rtt else None,
            "max_ms": max(rtt) if rtt else None, "job_state": final["state"], "job_elapsed_s": final["elapsed_s"]}
