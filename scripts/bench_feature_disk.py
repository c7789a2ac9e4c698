"""Benchmark the feature cache's disk entry formats side by side: writing and reading
(with full verification) one MobileSAM-sized and one ViT-H-sized entry, float16.

Variants, all run once per round and interleaved (their order rotates from round to round),
medians over the rounds:

write (atomic: temporary file, fsync, rename; each includes its CRC pass)
  v1-dsfc         format version 1, the home-made .dsfc container, as of --baseline-rev
                  (its source is read with ``git show``, so the comparison needs no copy)
  safetensors     ``feature_disk.write_entry``: the safetensors file written from the tensors
  st.save         ``safetensors.torch.save`` (bytes in memory) + ``atomic_write``
  st.save_file    ``safetensors.torch.save_file`` into ``atomic_output_path``
read (every check the cache makes, tensors copied out; the file was just written, so its
pages are in the page cache)
  v1-dsfc         version 1's ``read_entry`` (numpy.memmap)
  safetensors     ``feature_disk.read_entry`` (safe_open: torch mapping of the file)
  st.load         ``safetensors.torch.load(file bytes)``, for reference: it takes ``bytes``
                  only (not an mmap) and returns no metadata, so it is not verified here
cold read (Linux: the file's pages dropped with posix_fadvise(DONTNEED) before each read)
  v1-dsfc, safetensors as above
header (the startup scan's check of one entry: header only, no data CRC)
  v1-dsfc, safetensors: ``read_entry_info``

Prints a table and writes JSON (default out/bench_feature_disk.json). Run it while the
machine is otherwise idle: ``python scripts/bench_feature_disk.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from desam_server.atomic import atomic_output_path, atomic_write
from desam_server.engine import feature_disk
from desam_server.engine.feature_packed import TENSOR_NAMES, PackedFeatures
from desam_server.modeling.build import PROMPT_EMBED_DIM, get_spec

ROOT = Path(__file__).resolve().parents[1]
V1_PATH = "ModelServer/desam_server/engine/feature_disk.py"
BASELINE_REV = "fdaf2f97e770e3235d47711090a9d6aedddb9eaa"  # the last commit with format version 1


def load_v1(rev: str):
    """Format version 1's module, from ``git show rev:...``, as a module of the engine
    package (its relative imports resolve there)."""
    source = subprocess.run(["git", "show", f"{rev}:{V1_PATH}"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout
    name = "desam_server.engine._feature_disk_v1"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "desam_server.engine"
    sys.modules[name] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:{V1_PATH}", "exec"), module.__dict__)
    if getattr(module, "FORMAT_VERSION", None) != 1:
        raise SystemExit(f"{rev}:{V1_PATH} is not format version 1")
    return module


def entry_shapes(encoder: str) -> list[tuple[int, ...]]:
    spec = get_spec(encoder)
    grid = spec.embedding_size
    return [(1, PROMPT_EMBED_DIM, grid, grid)] + [(1, c, s, s) for c, s in zip(spec.tap_channels, spec.tap_sizes,
                                                                                 strict=True)]


def make_entry(shapes, seed: int = 0) -> PackedFeatures:
    g = torch.Generator().manual_seed(seed)
    tensors = tuple(torch.randn(*s, generator=g).to(torch.float16) for s in shapes)
    return PackedFeatures(tensors=tensors, input_size=(1024, 1024), original_size=(512, 512),
                          storage_dtype="float16")


def drop_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Variants:
    """Every variant as a function of (path, digest, packed) or (path, digest)."""

    def __init__(self, v1) -> None:
        self.v1 = v1

    # ---- writes ----------------------------------------------------------------------------
    def write_v1(self, path, digest, packed):
        return self.v1.write_entry(path, digest, packed)

    def write_safetensors(self, path, digest, packed):
        return feature_disk.write_entry(path, digest, packed)

    @staticmethod
    def _metadata(digest, packed) -> dict[str, str]:
        """The same metadata (both CRCs computed) that write_entry stores."""
        head, _, _ = feature_disk.encode_header(digest, packed)
        return json.loads(head[8:])["__metadata__"]

    def write_st_save(self, path, digest, packed):
        blob = st_save(dict(zip(TENSOR_NAMES, packed.tensors, strict=True)), metadata=self._metadata(digest, packed))
        with atomic_write(path, "wb") as handle:
            handle.write(blob)

    def write_st_save_file(self, path, digest, packed):
        meta = self._metadata(digest, packed)
        with atomic_output_path(path) as tmp:
            st_save_file(dict(zip(TENSOR_NAMES, packed.tensors, strict=True)), tmp, metadata=meta)

    # ---- reads -------------------------------------------------------------------------------
    def read_v1(self, path, digest):
        return self.v1.read_entry(path, digest, "float16")

    def read_safetensors(self, path, digest):
        return feature_disk.read_entry(path, digest, "float16")

    def read_st_load(self, path, digest):
        with open(path, "rb") as handle:
            return st_load(handle.read())

    def header_v1(self, path, digest):
        return self.v1.read_entry_info(path, digest)

    def header_safetensors(self, path, digest):
        return feature_disk.read_entry_info(path, digest)


WRITES = {"v1-dsfc": "write_v1", "safetensors": "write_safetensors", "st.save": "write_st_save",
          "st.save_file": "write_st_save_file"}
READS = {"v1-dsfc": ("read_v1", "v1-dsfc"), "safetensors": ("read_safetensors", "safetensors"),
         "st.load": ("read_st_load", "safetensors")}  # variant -> (method, whose file it reads)
COLD_READS = {"v1-dsfc": ("read_v1", "v1-dsfc"), "safetensors": ("read_safetensors", "safetensors")}
HEADERS = {"v1-dsfc": ("header_v1", "v1-dsfc"), "safetensors": ("header_safetensors", "safetensors")}


def bench_entry(name: str, packed: PackedFeatures, variants: Variants, directory: Path, rounds: int,
                cold: bool) -> dict:
    digest = hashlib.sha256(name.encode()).hexdigest()
    suffix = {"v1-dsfc": ".dsfc"}
    phases = {"read": READS, "cold_read": COLD_READS if cold else {}, "header": HEADERS}
    times: dict[str, dict[str, list[float]]] = {"write": {k: [] for k in WRITES}}
    times.update({phase: {k: [] for k in table} for phase, table in phases.items()})
    expected = packed.tensors
    sizes = {}
    for r in range(rounds):
        paths = {k: directory / f"{name}-{r}-{k}{suffix.get(k, '.safetensors')}" for k in WRITES}
        order = list(WRITES)
        order = order[r % len(order):] + order[: r % len(order)]
        for k in order:
            t0 = time.perf_counter()
            getattr(variants, WRITES[k])(paths[k], digest, packed)
            times["write"][k].append(time.perf_counter() - t0)
        if r == 0:  # every writer's file is a valid entry (the library writers' too)
            sizes = {k: p.stat().st_size for k, p in paths.items()}
            for k in ("safetensors", "st.save", "st.save_file"):
                got = feature_disk.read_entry(paths[k], digest, "float16")
                assert all(torch.equal(a, b) for a, b in zip(got.tensors, expected, strict=True)), k
        for phase, table in phases.items():
            order = list(table)
            order = order[r % len(order):] + order[: r % len(order)]
            for k in order:
                method, source = table[k]
                if phase == "cold_read":
                    drop_page_cache(paths[source])
                t0 = time.perf_counter()
                got = getattr(variants, method)(paths[source], digest)
                times[phase][k].append(time.perf_counter() - t0)
                if r == 0 and phase != "header" and k != "st.load":
                    assert all(torch.equal(a, b) for a, b in zip(got.tensors, expected, strict=True)), k
                del got
        for p in paths.values():
            p.unlink()
    result = {"bytes": packed.nbytes, "shapes": [list(t.shape) for t in packed.tensors], "file_bytes": sizes,
              "rounds": rounds}
    for phase, table in times.items():
        result[phase] = {k: {"median_ms": round(statistics.median(v) * 1e3, 3),
                             "min_ms": round(min(v) * 1e3, 3),
                             "p90_ms": round(sorted(v)[int(0.9 * (len(v) - 1))] * 1e3, 3),
                             "all_ms": [round(x * 1e3, 3) for x in v]} for k, v in table.items()}
    return result


def print_entry(name: str, result: dict) -> None:
    print(f"\n{name}: {result['bytes'] / 2 ** 20:.2f} MiB of tensors, {result['rounds']} rounds (median / min ms)")
    for phase in ("write", "read", "cold_read", "header"):
        rows = result.get(phase) or {}
        if not rows:
            continue
        base = rows["v1-dsfc"]["median_ms"]
        for k, row in rows.items():
            print(f"  {phase:9s} {k:13s} {row['median_ms']:8.3f} {row['min_ms']:8.3f}   "
                  f"x{row['median_ms'] / base:5.2f} of v1")


def machine() -> dict:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {"platform": platform.platform(), "cpu": model, "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "safetensors": safetensors.__version__,
            "torch_threads": torch.get_num_threads(), "git_head": rev.stdout.strip(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=Path("out/bench_feature_disk.json"), help="output JSON")
    parser.add_argument("--rounds", type=int, default=61, help="rounds per entry size (default 61)")
    parser.add_argument("--encoders", default="mobile_sam,vit_h", help="entry sizes, by encoder (default %(default)s)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision with format version 1")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to write the entries (default: a temporary folder beside --json)")
    parser.add_argument("--no-cold", action="store_true", help="skip the cold reads")
    args = parser.parse_args(argv)
    cold = not args.no_cold and hasattr(os, "posix_fadvise")
    variants = Variants(load_v1(args.baseline_rev))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": shlex.join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "baseline_rev": args.baseline_rev, "entries": {}}
    with tempfile.TemporaryDirectory(dir=args.dir or args.json.parent, prefix="bench_feature_disk.") as tmp:
        for encoder in [e.strip() for e in args.encoders.split(",") if e.strip()]:
            packed = make_entry(entry_shapes(encoder))
            result = bench_entry(encoder, packed, variants, Path(tmp), args.rounds, cold)
            report["entries"][encoder] = result
            print_entry(encoder, result)
    report["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
