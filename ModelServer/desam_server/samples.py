"""The sample head CT for demos and tests: InVesalius "Cranium" (GPL-2).

Source: Debian's package ``invesalius-examples`` (fetched with ``apt-get download``, which
verifies it against the signed archive index), file
``usr/share/doc/invesalius-examples/examples/Cranium.inv3``: an InVesalius 3 project, a
gzip tar holding

- ``main.plist``: shape (108, 256, 256), dtype int16, spacing (x, y, z) =
  (0.9570312, 0.9570312, 1.5) mm, modality CT, default window W406 / L-18;
- ``matrix.dat``: the CT, raw little-endian int16, HU -1024..2986, indexed [k, j, i];
- ``mask_0.dat`` / ``mask_1.dat``: raw uint8 (109, 257, 257), 255 = inside; plane 0 of
  each axis holds InVesalius' "slice edited" flags, so the mask is ``[1:, 1:, 1:]``.
  mask_0 = threshold 226..3071 HU (bone), mask_1 = threshold -142..2986 HU (head,
  including the head holder under the back of the head).

Orientation. The project stores no patient coordinates. InVesalius keeps each DICOM row
order reversed (its slices go through VTK's bottom-up image order), so in ``matrix.dat``
row j grows from posterior to anterior (the head holder is at row 0, the nose at high
rows), slice k grows from inferior (maxilla, teeth) to superior (vertex) and column i is
the DICOM column (towards the patient's left for a standard axial acquisition). We flip
the rows back, which gives the standard DICOM/LPS layout: i -> L, j -> P, k -> S, identity
direction, and put the volume's centre at the LPS origin.

Files written to the data directory (``DESAM_DATA_DIR``, else
``~/.cache/slicer-desam/data``), atomically, with their sha256 in ``cranium.json``:
``cranium.nrrd`` (int16 HU), ``cranium_head.seg.nrrd`` (Slicer segmentation, segment
"Head"), ``cranium_head_mask.nrrd`` and ``cranium_bone_mask.nrrd`` (uint8 0/1), all on
one grid.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import os
import plistlib
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes
from .debian import apt_download, deb_data_tar, tar_member
from .hashing import sha256_file
from .io import Geometry, SegmentInfo, Volume, write_segmentation, write_volume

log = logging.getLogger(__name__)

__all__ = ["CraniumSample", "fetch_cranium", "data_dir", "main"]

PACKAGE = "invesalius-examples"
LICENSE = "GPL-2"
INV3_MEMBER = "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
MANIFEST_NAME = "cranium.json"
MANIFEST_FORMAT = 1
FILES = {
    "volume": "cranium.nrrd",
    "head_segmentation": "cranium_head.seg.nrrd",
    "head_mask": "cranium_head_mask.nrrd",
    "bone_mask": "cranium_bone_mask.nrrd",
}
#: Window from the InVesalius project (center, width) in HU.
WINDOW = (-18.0, 406.0)
#: The slice the reference numbers refer to (axial, k index; identical in the source).
REFERENCE_SLICE = 54

_MATRIX_SHAPE = (108, 256, 256)
_MASK_SHAPE = (109, 257, 257)
# sha256 of the raw arrays inside Cranium.inv3 of invesalius-examples 3.1.99998-4: the
# sample (and every number measured on it) is exactly this data or nothing.
_RAW_SHA256 = {
    "matrix.dat": "d87fd5e6aaf2c4fdf4f3fe28ee3335192fc2464ed8e9682fc78530cb837938da",
    "mask_0.dat": "e543f574020089cf227a1aaa61ba7b9f120e3f20eaed8676c080f447139e0b31",
    "mask_1.dat": "f793c2f7896906db170595595713eb6d2b9530f3b151cd9780d908c40edea29c",
}
_HEAD_COLOR = (1.0, 0.5019607843137255, 0.25098039215686274)  # InVesalius' colour of mask_1


@dataclass(frozen=True)
class CraniumSample:
    """Paths and facts of the cached sample (all files share one grid)."""

    volume: Path
    head_segmentation: Path
    head_mask: Path
    bone_mask: Path
    manifest: Path
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[tuple[float, float, float], ...]
    window: tuple[float, float]
    reference_slice: int
    source: str
    license: str

    @property
    def geometry(self) -> Geometry:
        return Geometry(spacing=self.spacing, origin=self.origin, direction=np.asarray(self.direction))


def data_dir() -> Path:
    """``DESAM_DATA_DIR``, else ~/.cache/slicer-desam/data."""
    env = os.environ.get("DESAM_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "slicer-desam" / "data"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise fetches into one directory across processes (where fcntl exists)."""
    try:
        import fcntl
    except ImportError:  # Windows: no apt there anyway
        yield
        return
    with open(directory / ".cranium.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ------------------------------------------------------------------------------ cache


def _sample_from_manifest(directory: Path, manifest: dict) -> CraniumSample:
    g = manifest["geometry"]
    return CraniumSample(
        volume=directory / FILES["volume"],
        head_segmentation=directory / FILES["head_segmentation"],
        head_mask=directory / FILES["head_mask"],
        bone_mask=directory / FILES["bone_mask"],
        manifest=directory / MANIFEST_NAME,
        shape=tuple(manifest["shape"]),
        spacing=tuple(g["spacing"]),
        origin=tuple(g["origin"]),
        direction=tuple(tuple(row) for row in g["direction"]),
        window=tuple(manifest["window"]),
        reference_slice=int(manifest["reference_slice"]),
        source=manifest["source"]["description"],
        license=manifest["license"],
    )


def _cached(directory: Path) -> CraniumSample | None:
    """The sample in ``directory`` if its manifest and every file's sha256 check out."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError("old manifest format")
        for key, name in FILES.items():
            entry = manifest["files"][key]
            path = directory / name
            if entry["name"] != name or not path.is_file() or path.stat().st_size != entry["size"]:
                raise ValueError(f"{name} is missing or has the wrong size")
            if sha256_file(path) != entry["sha256"]:
                raise ValueError(f"{name} does not match its recorded sha256")
        return _sample_from_manifest(directory, manifest)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cached sample in %s is not usable (%s); fetching it again", directory, exc)
        return None


# ------------------------------------------------------------------------------ download


def _inv3_files(inv3: bytes) -> dict[str, bytes]:
    """The files of an InVesalius project (tar.gz with one top folder), by base name; read
    in memory, nothing is extracted to disk."""
    wanted = {"main.plist", "matrix.dat", "mask_0.dat", "mask_0.plist", "mask_1.dat", "mask_1.plist"}
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(inv3), mode="r:gz") as tar:
        for member in tar:
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in wanted and base not in found:
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[base] = extracted.read()
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"Cranium.inv3 lacks {', '.join(sorted(missing))}")
    return found


# ------------------------------------------------------------------------------ conversion


def _convert(files: dict[str, bytes]) -> tuple[Volume, np.ndarray, np.ndarray, dict]:
    main_plist = plistlib.loads(files["main.plist"])
    matrix = main_plist["matrix"]
    shape = tuple(int(v) for v in matrix["shape"])
    if shape != _MATRIX_SHAPE or matrix.get("dtype") != "int16":
        raise RuntimeError(f"unexpected Cranium matrix {shape} {matrix.get('dtype')}; expected {_MATRIX_SHAPE} int16")
    for name, expected in _RAW_SHA256.items():
        if hashlib.sha256(files[name]).hexdigest() != expected:
            raise RuntimeError(f"Cranium.inv3 {name} has unexpected content (sha256 mismatch): "
                               "the package no longer ships the known sample")
    spacing_xyz = tuple(float(v) for v in main_plist["spacing"])  # (i, j, k)

    ct = np.frombuffer(files["matrix.dat"], dtype="<i2").reshape(shape)
    masks = {}
    for name in ("mask_0", "mask_1"):
        info = plistlib.loads(files[name + ".plist"])
        if tuple(info["mask_shape"]) != _MASK_SHAPE:
            raise RuntimeError(f"unexpected {name} shape {info['mask_shape']}")
        raw = np.frombuffer(files[name + ".dat"], dtype=np.uint8).reshape(_MASK_SHAPE)
        masks[name] = (raw[1:, 1:, 1:] > 127, info)

    # Rows back to DICOM order (j: anterior -> posterior); see the module docstring.
    def to_lps_layout(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(a[:, ::-1, :])

    ct_lps = to_lps_layout(ct).astype(np.int16)
    bone = to_lps_layout(masks["mask_0"][0]).astype(np.uint8)
    head = to_lps_layout(masks["mask_1"][0]).astype(np.uint8)
    size_ijk = np.asarray(shape[::-1], dtype=np.float64)
    origin = -(size_ijk - 1.0) / 2.0 * np.asarray(spacing_xyz)  # volume centre at (0, 0, 0)
    geometry = Geometry(spacing=spacing_xyz, origin=tuple(origin), direction=np.eye(3))
    facts = {
        "modality": main_plist.get("modality"),
        "hu_range": [int(ct.min()), int(ct.max())],
        "masks": {
            "head": {"source": "mask_1.dat", "threshold_hu": list(masks["mask_1"][1]["threshold_range"]),
                     "voxels": int(head.sum()),
                     "note": "includes the head holder (two separate arcs behind the head)"},
            "bone": {"source": "mask_0.dat", "threshold_hu": list(masks["mask_0"][1]["threshold_range"]),
                     "voxels": int(bone.sum()), "note": "includes the dense parts of the head holder"},
        },
        "layout": ("InVesalius matrix.dat with rows reversed (j: anterior -> posterior); "
                   "i -> patient left, j -> posterior, k -> superior"),
    }
    return Volume(array=ct_lps, geometry=geometry), head, bone, facts


# ------------------------------------------------------------------------------ public


def fetch_cranium(cache_dir: Path | str | None = None, *, deb_file: Path | str | None = None) -> CraniumSample:
    """Return the cached Cranium sample, fetching and converting it first if needed.

    ``cache_dir``: default ``DESAM_DATA_DIR`` or ~/.cache/slicer-desam/data. The package
    is fetched with ``apt-get download`` (``apt-get update`` runs once if the package lists
    are missing); ``deb_file`` uses an already downloaded ``invesalius-examples`` .deb
    instead. Raises RuntimeError when apt is unavailable or the download fails."""
    directory = Path(cache_dir).expanduser() if cache_dir is not None else data_dir()
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory):
        sample = _cached(directory)
        if sample is not None:
            return sample
        with tempfile.TemporaryDirectory(prefix="desam-cranium-") as tmp:
            deb = Path(deb_file) if deb_file is not None else apt_download(Path(tmp), PACKAGE)
            if not deb.is_file():
                raise FileNotFoundError(f"{deb}: no such file")
            deb_name = deb.name
            deb_sha256 = sha256_file(deb)
            inv3 = tar_member(deb_data_tar(deb), INV3_MEMBER)
        files = _inv3_files(inv3)
        del inv3
        volume, head, bone, facts = _convert(files)
        del files

        paths = {key: directory / name for key, name in FILES.items()}
        write_volume(paths["volume"], volume)
        write_volume(paths["head_mask"], Volume(head, volume.geometry))
        write_volume(paths["bone_mask"], Volume(bone, volume.geometry))
        write_segmentation(paths["head_segmentation"], head, volume.geometry,
                           [SegmentInfo(name="Head", color=_HEAD_COLOR, label_value=1, segment_id="Head")])
        version = deb_name[len(PACKAGE) + 1:].rsplit("_", 1)[0] if deb_name.startswith(PACKAGE + "_") else "unknown"
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": "InVesalius Cranium head CT",
            "license": LICENSE,
            "source": {
                "description": f"Debian package {PACKAGE} {version}, {INV3_MEMBER}",
                "package": PACKAGE, "version": version, "deb": deb_name, "deb_sha256": deb_sha256,
                "raw_sha256": _RAW_SHA256,
            },
            "shape": list(volume.array.shape),
            "dtype": "int16",
            "geometry": volume.geometry.to_dict(),
            "window": list(WINDOW),
            "reference_slice": REFERENCE_SLICE,
            **facts,
            "files": {key: {"name": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}
                      for key, path in paths.items()},
        }
        atomic_write_bytes(directory / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        log.info("sample CT ready in %s", directory)
        return _sample_from_manifest(directory, manifest)


def main(argv: list[str] | None = None) -> int:
    """``python -m desam_server.samples [--dest DIR]``: fetch the sample, print its paths."""
    parser = argparse.ArgumentParser(prog="python -m desam_server.samples", description=main.__doc__)
    parser.add_argument("--dest", type=Path, default=None, help="data directory (default: DESAM_DATA_DIR "
                        "or ~/.cache/slicer-desam/data)")
    parser.add_argument("--deb", type=Path, default=None, help="use this invesalius-examples .deb")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        sample = fetch_cranium(args.dest, deb_file=args.deb)
    except (RuntimeError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key in ("volume", "head_segmentation", "head_mask", "bone_mask", "manifest"):
        print(f"{key}: {getattr(sample, key)}")
    print(f"shape (k, j, i): {sample.shape}; spacing (i, j, k): {sample.spacing} mm; "
          f"window (center, width): {sample.window}; licence {sample.license}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
