"""Time writing and reading a Slicer segmentation (.seg.nrrd) of the sample head mask.

The sample's head mask (108 x 256 x 256 uint8, one segment) is written with
``desam_server.io.write_segmentation`` (slicerio) and read back with
``read_segmentation``, ``--repeats`` times each, alternating. Prints best and median
times and the file size, and writes JSON (--json, default out/bench_seg_nrrd.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--json", type=Path, default=Path("out/bench_seg_nrrd.json"))
    args = p.parse_args(argv)

    from desam_server.atomic import atomic_write_bytes
    from desam_server.io import SegmentInfo, read_segmentation, read_volume, write_segmentation
    from desam_server.samples import fetch_cranium

    head = read_volume(fetch_cranium().head_mask)
    write_s, read_s = [], []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "head.seg.nrrd"
        for _ in range(args.repeats):
            t = time.perf_counter()
            write_segmentation(path, head.array, head.geometry, [SegmentInfo("Head", (0.9, 0.7, 0.6))])
            write_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            read_segmentation(path)
            read_s.append(time.perf_counter() - t)
        size = path.stat().st_size
    result = {"shape": list(head.array.shape), "repeats": args.repeats,
              "write_min_ms": round(1e3 * min(write_s), 1),
              "write_median_ms": round(1e3 * statistics.median(write_s), 1),
              "read_min_ms": round(1e3 * min(read_s), 1), "read_median_ms": round(1e3 * statistics.median(read_s), 1),
              "bytes": size}
    print(json.dumps(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.json, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
