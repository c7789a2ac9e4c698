"""Benchmark the wire codec (desam_server.wire) on a CT-sized volume and a slice mask.

The volume is a synthetic 512 x 512 x 300 int16 chest-like CT: smooth anatomy (body
outline, fat, soft tissue, lungs, spine, aorta, all varying slowly along k), a
reconstruction circle padded with -1024 outside, and Gaussian noise of a few HU inside it,
so that zlib sees data as hard to compress as a real scan, not random bytes and not a
noiseless phantom. Prints a table and writes JSON (default out/bench_wire.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from desam_server import wire

GEOMETRY = dict(spacing=(0.78125, 0.78125, 1.25), origin=(-200.0, -200.0, -380.0),
                direction=np.eye(3))

# name -> encode_volume keyword arguments
SETTINGS = {
    "none": dict(compression="none"),
    "zlib-1 rle shuffle (default)": dict(),
    "zlib-1 rle shuffle 1-thread": dict(threads=1),
    "zlib-1 shuffle": dict(level=1, strategy="default"),
    "zlib-6 shuffle": dict(level=6, strategy="default"),
    "zlib-6 rle shuffle": dict(level=6),
    "zlib-1 no shuffle": dict(level=1, strategy="default", shuffle=False),
    "zlib-6 no shuffle": dict(level=6, strategy="default", shuffle=False),
}


def ct_phantom(shape=(300, 512, 512), noise_hu: float = 12.0, seed: int = 0) -> np.ndarray:
    """int16 HU volume [k, j, i]; see the module docstring."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    y, x = np.mgrid[0:nj, 0:ni].astype(np.float32)
    yc, xc = (y - nj / 2) / (nj / 2), (x - ni / 2) / (ni / 2)        # -1..1
    fov = xc ** 2 + yc ** 2 <= 0.98 ** 2
    out = np.empty(shape, np.int16)
    for k in range(nk):
        t = k / max(nk - 1, 1)
        breathe = 1.0 + 0.08 * np.sin(2 * np.pi * t)                    # smooth change with k
        ax, ay = 0.78 * breathe, 0.55 + 0.05 * np.cos(np.pi * t)
        body = (xc / ax) ** 2 + ((yc - 0.05) / ay) ** 2
        hu = np.full((nj, ni), -1000.0, np.float32)
        hu[body <= 1.0] = -100.0                                        # subcutaneous fat
        hu[body <= 0.85] = 40.0                                         # muscle, organs
        lung_r = 0.22 + 0.12 * np.sin(np.pi * t)
        for side in (-1, 1):
            lung = ((xc - side * 0.33 * breathe) / (lung_r * 1.1)) ** 2 + ((yc + 0.02) / (lung_r * 1.6)) ** 2
            hu[lung <= 1.0] = -850.0 + 30.0 * (1 - lung[lung <= 1.0])   # denser near the hilum
        spine = (xc / 0.09) ** 2 + ((yc - 0.42) / 0.08) ** 2
        hu[spine <= 1.0] = 1100.0                                        # cortical shell
        hu[spine <= 0.6] = 300.0                                         # cancellous bone
        aorta = ((xc + 0.08) / 0.06) ** 2 + ((yc - 0.25) / 0.06) ** 2
        hu[aorta <= 1.0] = 180.0                                         # contrast-filled
        hu += rng.standard_normal((nj, ni), dtype=np.float32) * noise_hu
        hu[~fov] = -1024.0                                               # outside the scan circle
        out[k] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out


def timed(fn, repeat: int):
    best, result = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def bench_volume(volume: np.ndarray, names, repeat: int) -> list[dict]:
    rows = []
    for name in names:
        kwargs = SETTINGS[name]
        enc_s, payload = timed(lambda kwargs=kwargs: wire.encode_volume(volume, **GEOMETRY, **kwargs), repeat)
        dec_s, decoded = timed(lambda payload=payload: wire.decode_volume(payload), repeat)
        assert np.array_equal(decoded.array, volume)
        header = decoded.header
        rows.append(dict(setting=name, kwargs={k: v for k, v in kwargs.items()},
                         compression=header["compression"], filter=header["filter"],
                         bytes=len(payload), ratio=round(len(payload) / volume.nbytes, 4),
                         encode_ms=round(enc_s * 1e3, 1), decode_ms=round(dec_s * 1e3, 1),
                         encode_mb_s=round(volume.nbytes / enc_s / 1e6, 1),
                         decode_mb_s=round(volume.nbytes / dec_s / 1e6, 1)))
        print(f"{name:32s} {len(payload) / 2 ** 20:9.1f} MiB  {rows[-1]['ratio']:6.3f}  "
              f"encode {enc_s * 1e3:8.1f} ms  decode {dec_s * 1e3:8.1f} ms", flush=True)
        payload = decoded = None           # free ~200 MiB before the next setting
    return rows


def bench_mask(repeat: int) -> list[dict]:
    yy, xx = np.mgrid[0:512, 0:512]
    mask = ((yy - 240) / 90.0) ** 2 + ((xx - 300) / 120.0) ** 2 <= 1          # one organ
    mask |= ((yy - 300) / 40.0) ** 2 + ((xx - 150) / 30.0) ** 2 <= 1
    rows = []
    for compression in ("zlib", "none"):
        n = max(repeat, 1) * 200
        payload = wire.encode_mask(mask, axis="k", offset=150, compression=compression)
        t0 = time.perf_counter()
        for _ in range(n):
            wire.encode_mask(mask, axis="k", offset=150, compression=compression)
        enc = (time.perf_counter() - t0) / n
        t0 = time.perf_counter()
        for _ in range(n):
            decoded = wire.decode_mask(payload)
        dec = (time.perf_counter() - t0) / n
        assert np.array_equal(decoded.mask, mask)
        rows.append(dict(shape=[512, 512], compression=compression, bytes=len(payload),
                         header_bytes=len(payload) - decoded.header["encoded_length"],
                         encode_ms=round(enc * 1e3, 3), decode_ms=round(dec * 1e3, 3)))
        print(f"mask 512x512 {compression:5s} {len(payload):7d} bytes  encode {enc * 1e3:7.3f} ms  "
              f"decode {dec * 1e3:7.3f} ms")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("out/bench_wire.json"), help="output JSON")
    parser.add_argument("--repeat", type=int, default=1, help="runs per setting (the best is kept)")
    parser.add_argument("--slices", type=int, default=300, help="K (default 300)")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated subset of: " + ", ".join(SETTINGS))
    args = parser.parse_args(argv)
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}")

    t0 = time.perf_counter()
    volume = ct_phantom((args.slices, 512, 512))
    print(f"phantom {volume.shape} int16, {volume.nbytes / 2 ** 20:.1f} MiB raw, "
          f"built in {time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs, zlib {zlib.ZLIB_RUNTIME_VERSION}")
    id_s, vid = timed(lambda: wire.volume_id(volume, **GEOMETRY), args.repeat)
    print(f"volume_id {vid[:16]}... in {id_s * 1e3:.1f} ms")
    rows = bench_volume(volume, names, args.repeat)
    masks = bench_mask(args.repeat)
    report = dict(
        volume=dict(shape=list(volume.shape), dtype="int16", raw_bytes=volume.nbytes,
                    hu_min=int(volume.min()), hu_max=int(volume.max())),
        volume_id_ms=round(id_s * 1e3, 1), settings=rows, mask=masks,
        host=dict(cpus=os.cpu_count(), python=sys.version.split()[0], numpy=np.__version__,
                  zlib=zlib.ZLIB_RUNTIME_VERSION, machine=platform.machine()),
        repeat=args.repeat,
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
