"""Does each part of the click fast path pay? Side by side, interleaved, through the service.

One ``desam-server serve`` child per configuration of ``modeling.FastPath`` (the
``fast_path`` setting: all parts, all but one part, and none), each with the sample head
CT uploaded and its reference slice encoded (MobileSAM, the pretrained weights). Then, in
rounds, every configuration gets the same click through ``ServerClient`` (in a shuffled
order each round), and the bench process runs ``segment_anything.SamPredictor.predict`` on
the same cached embedding (the float16 features the service holds, unpacked) -- SAM's
stock decoder, freshly built and loaded from the same checkpoint. Each turn is a block of
``--block`` consecutive clicks of one configuration, the first of them untimed: clicks
alternating between processes click by click evict each other's caches and wake sleeping
thread teams, which a user's clicks on an otherwise idle machine do not meet; blocks
alternate often enough (about every 0.3 s) that the machine's drift reaches every
configuration alike. Two click kinds:

- ``click``: one positive point, multimask (the service's plain click);
- ``refine``: two points plus the previous answer's logits as mask input (``logits_id``;
  in-process: the low-res logits), one mask (a correction click).

Per configuration: round-trip p50, and the median over rounds of its block's median round
trip divided by the all-parts block median of the same round (the machine's speed drifts
within seconds; a ratio within a round does not). A part pays when removing it makes clicks >= 5% slower.
Also: the all-parts click against SamPredictor.predict (target < 0.6), and whether the
service's masks equal SamPredictor's (pixels that differ, max IoU-score difference).

Nothing else may run on the machine meanwhile (background encoding competes for the
cores; the bench waits until every service is idle before the rounds). Prints a table and
writes JSON atomically (--json, default out/bench_fast_path.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

import bench_service_lib as lib

CONFIGS = ["all", "without:reassociate", "without:slice_cache", "without:matrix_upscaling",
           "without:factored_mask_input", "none"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds per click kind")
    p.add_argument("--block", type=int, default=8, help="consecutive clicks per configuration and round")
    p.add_argument("--configs", default=";".join(CONFIGS), help="fast_path settings, ';'-separated")
    p.add_argument("--upsample", type=int, default=1,
                   help="repeat each pixel of the CT's slices N x N (2: 512 x 512 slices of the same anatomy)")
    p.add_argument("--json", type=Path, default=Path("out/bench_fast_path.json"))
    return p.parse_args(argv)


def stock_predictor(embedding, input_size, original_size):
    """segment_anything's SamPredictor with SAM's own prompt encoder and mask decoder, built
    fresh from the MobileSAM checkpoint (no layout changes), its features set to ``embedding``."""
    import torch
    from segment_anything import SamPredictor
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from desam_server.modeling.tiny_vit import mobile_sam_encoder
    from desam_server.weights import fetch_weights

    state = torch.load(fetch_weights("mobile_sam"), map_location="cpu", weights_only=True)
    sam = Sam(image_encoder=mobile_sam_encoder(),
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
                  depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3,
                  iou_head_hidden_dim=256))
    for part in ("prompt_encoder", "mask_decoder"):
        getattr(sam, part).load_state_dict({k[len(part) + 1:]: v for k, v in state.items()
                                            if k.startswith(part + ".")}, strict=True)
    sam.eval()
    predictor = SamPredictor(sam)
    predictor.features = embedding
    predictor.input_size, predictor.original_size = tuple(input_size), tuple(original_size)
    predictor.is_image_set = True
    return predictor


def cached_embedding(ct, k):
    """The reference slice's embedding as the service holds it: MobileSAM encoded at the
    service's default precision ('auto': bf16 where the CPU has it natively), stored as
    float16 by the feature cache, unpacked to float32."""
    import torch

    from desam_server.engine import IntensityWindow, SlicePredictor
    from desam_server.modeling import build_desam
    from desam_server.weights import fetch_weights

    model = build_desam("mobile_sam", sam_checkpoint=fetch_weights("mobile_sam"))
    predictor = SlicePredictor(model, precision="auto")
    predictor.set_image(ct.array[k], IntensityWindow(*ct.window))
    f = predictor.features
    return f.embedding.to(torch.float16).float(), f.input_size, f.original_size, model


def main(argv=None) -> int:
    args = parse_args(argv)
    configs = [c.strip() for c in args.configs.split(";") if c.strip()]
    ct = lib.cranium()
    if args.upsample > 1:
        n = args.upsample
        ct.array = np.ascontiguousarray(ct.array.repeat(n, axis=1).repeat(n, axis=2))
        ct.head = np.ascontiguousarray(ct.head.repeat(n, axis=1).repeat(n, axis=2))
        s = ct.geometry["spacing"]
        ct.geometry = {**ct.geometry, "spacing": (s[0] / n, s[1] / n, s[2])}
    k = ct.reference_slice
    center = ct.centroid(k)
    window = ct.window  # (center, width), as ServerClient takes it
    click = [[center[0], center[1]]]
    refine_points = [[center[0], center[1]], [center[0] + 20.0, center[1] - 15.0]]
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": lib.load()},
                    "slice": k, "slice_shape": list(ct.array.shape[1:]), "click": click,
                    "refine_points": refine_points, "configs": configs}
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    with lib.workdir("desam-bench-fastpath-") as tmp, lib.sigterm_as_interrupt():
        tmp = Path(tmp)
        services = {}
        try:
            for i, config in enumerate(configs):
                svc = lib.ServiceProcess("mobile_sam", tmp / f"svc{i}", env={"DESAM_FAST_PATH": config})
                services[config] = svc.__enter__()
                svc.vid, _ = svc.client.upload_volume(ct.array, **ct.geometry)
                svc.client.segment_prompt(svc.vid, "k", k, points=click, window=window, multimask=True)
                lib.wait_idle(svc.client)
            embedding, input_size, original_size, model = cached_embedding(ct, k)
            stock = stock_predictor(embedding, input_size, original_size)
            result["in_process_agreement"] = in_process_agreement(model, stock, embedding, input_size,
                                                                  original_size, click, refine_points)
            result["load_rounds"] = lib.load()
            for kind in ("click", "refine"):
                result[kind] = run_rounds(kind, services, stock, k, click, refine_points, window, args.rounds,
                                          args.block)
        finally:
            for svc in services.values():
                svc.stop()
    result["load_after"] = lib.load()
    print_table(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    from desam_server.atomic import atomic_write_bytes

    atomic_write_bytes(args.json, json.dumps(result, indent=1).encode())
    print(f"\nwritten: {args.json}")
    return 0


def run_rounds(kind, services, stock, k, click, refine_points, window, rounds, block) -> dict:
    """Interleaved rounds of one click kind (one untimed warm-up round first): in each, every
    configuration and SamPredictor in a shuffled order, each a block of ``block`` clicks whose
    first is untimed. Per configuration its round trips and server decode times, and the
    median over rounds of its block median divided by the all-parts block median."""
    rng = random.Random(0)
    names = list(services)
    times = {name: [] for name in [*names, "stock"]}
    decode = {name: [] for name in names}
    block_medians = {name: [] for name in [*names, "stock"]}
    previous, stock_low = {}, None
    if kind == "refine":
        for name, svc in services.items():
            r = svc.client.segment_prompt(svc.vid, "k", k, points=click, window=window, multimask=False)
            previous[name] = r.logits_ids[0]
        _, _, stock_low = stock.predict(point_coords=np.array(click), point_labels=np.array([1]),
                                        multimask_output=False)
    answers = {}
    for r in range(rounds + 1):
        order = [*names, "stock"]
        rng.shuffle(order)
        for name in order:
            this_block = []
            for n in range(block):
                if name == "stock":
                    dt = stock_click(kind, stock, click, refine_points, stock_low)
                else:
                    svc = services[name]
                    t0 = time.perf_counter()
                    if kind == "click":
                        answer = svc.client.segment_prompt(svc.vid, "k", k, points=click, window=window,
                                                           multimask=True)
                    else:
                        answer = svc.client.segment_prompt(svc.vid, "k", k, points=refine_points, labels=[1, 0],
                                                           window=window, multimask=False, logits_id=previous[name])
                    dt = time.perf_counter() - t0
                    answers[name] = answer
                    if r and n:
                        decode[name].append(answer.timing["decode_s"] * 1e3)
                if r and n:
                    this_block.append(dt * 1e3)
            if r:
                times[name] += this_block
                block_medians[name].append(float(np.median(this_block)))
    stock_times = np.asarray(times.pop("stock"))
    out = {"configs": {}, "stock_predict_ms": lib.summary(stock_times), "block": block, "rounds": rounds}
    base = np.asarray(block_medians["all"]) if "all" in block_medians else None
    for name in names:
        t = np.asarray(times[name])
        entry = {"round_trip_ms": lib.summary(t), "server_decode_ms": lib.summary(decode[name]),
                 "block_medians_ms": [round(v, 2) for v in block_medians[name]]}
        if base is not None:
            entry["vs_all_median_ratio"] = float(np.median(np.asarray(block_medians[name]) / base))
        out["configs"][name] = entry
    if base is not None:
        out["all_vs_stock_median_ratio"] = float(np.median(base / np.asarray(block_medians["stock"])))
        out["agreement"] = agreement(kind, answers["all"], stock, click, refine_points, stock_low)
    return out


def stock_click(kind, stock, click, refine_points, low) -> float:
    t0 = time.perf_counter()
    if kind == "click":
        stock.predict(point_coords=np.array(click), point_labels=np.array([1]), multimask_output=True)
    else:
        stock.predict(point_coords=np.array(refine_points), point_labels=np.array([1, 0]), mask_input=low,
                      multimask_output=False)
    return time.perf_counter() - t0


def agreement(kind, answer, stock, click, refine_points, low) -> dict:
    """The service's (all parts) masks and IoU scores against SamPredictor's, same prompt.
    For ``refine`` the mask inputs differ in origin (the service's own previous answer,
    SamPredictor's own), so only ``click`` compares identical inputs."""
    if kind == "click":
        masks, ious, _ = stock.predict(point_coords=np.array(click), point_labels=np.array([1]), multimask_output=True)
    else:
        masks, ious, _ = stock.predict(point_coords=np.array(refine_points), point_labels=np.array([1, 0]),
                                       mask_input=low, multimask_output=False)
    diff = int(np.sum(answer.masks != masks))
    return {"pixels_differing": diff, "pixels": int(masks.size),
            "max_iou_difference": float(np.max(np.abs(np.asarray(answer.ious) - ious)))}


def in_process_agreement(model, stock, embedding, input_size, original_size, click, refine_points) -> dict:
    """Our ``SlicePredictor`` (all parts of the fast path) against SamPredictor on the very
    same embedding, in this process: the equality the service's answers rest on (the
    service encodes on its own, so its float16 features can differ from this process's in
    the last bit, and its answers by that much)."""
    from desam_server.engine import SlicePredictor
    from desam_server.modeling import ImageFeatures

    ours = SlicePredictor(model, precision="fp32")
    ours.set_features(ImageFeatures(embedding=embedding, taps=[], input_size=input_size,
                                    original_size=original_size))
    out = {}
    m1, s1, low1 = ours.predict(point_coords=np.array(click), point_labels=np.array([1]), multimask_output=True)
    m2, s2, low2 = stock.predict(point_coords=np.array(click), point_labels=np.array([1]), multimask_output=True)
    out["click"] = {"pixels_differing": int(np.sum(m1 != m2)), "pixels": int(m1.size),
                    "max_iou_difference": float(np.max(np.abs(s1 - s2))),
                    "max_low_res_logit_difference": float(np.max(np.abs(low1 - low2)))}
    args = dict(point_coords=np.array(refine_points), point_labels=np.array([1, 0]), mask_input=low2[:1],
                multimask_output=False)
    m1, s1, low1 = ours.predict(**args)
    m2, s2, low2 = stock.predict(**args)
    out["refine"] = {"pixels_differing": int(np.sum(m1 != m2)), "pixels": int(m1.size),
                     "max_iou_difference": float(np.max(np.abs(s1 - s2))),
                     "max_low_res_logit_difference": float(np.max(np.abs(low1 - low2)))}
    return out


def print_table(result: dict) -> None:
    print(f"machine: {result['machine']}; load before/rounds/after: {result['machine']['load_before']} / "
          f"{result.get('load_rounds')} / {result.get('load_after')}")
    print(f"in-process SlicePredictor vs SamPredictor, same embedding: {result.get('in_process_agreement')}")
    for kind in ("click", "refine"):
        if kind not in result:
            continue
        r = result[kind]
        print(f"\n{kind}: SamPredictor.predict p50 {r['stock_predict_ms']['p50']:.1f} ms; all parts / SamPredictor "
              f"{r.get('all_vs_stock_median_ratio', float('nan')):.2f}; agreement {r.get('agreement')}")
        print(f"{'fast_path':32s} {'round trip p50':>15s} {'decode p50':>11s} {'vs all':>8s}")
        for name, entry in r["configs"].items():
            print(f"{name:32s} {entry['round_trip_ms']['p50']:15.1f} {entry['server_decode_ms']['p50']:11.1f} "
                  f"{entry.get('vs_all_median_ratio', float('nan')):8.3f}")


if __name__ == "__main__":
    sys.exit(main())
