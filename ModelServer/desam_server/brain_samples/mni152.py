"""The MNI ICBM152 2009a nonlinear symmetric T1 template (1 mm, skull-stripped) with a
brain mask from its grey- and white-matter probability maps.

Source: the ``nilearn`` wheel (0.14.1, BSD-3), files
``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``. The
wheel is fetched with ``pip download --no-deps`` (nilearn is not installed and never
imported), checked against its sha256, and only these three members are copied, byte for
byte and verified by their own sha256, into the data cache (``DESAM_DATA_DIR``, else
~/.cache/slicer-desam/data, sub-folder ``mni152``). The template's own licence is not
stated in nilearn; use it from the cache, do not redistribute it.

Grid: 197 x 233 x 189 voxels (i, j, k), 1 mm, uint8 0..255. The NIfTI files are RAS with
an identity direction; read through ``read_volume`` they are LPS with direction
diag(-1, -1, 1): i grows towards the patient's right, j towards anterior, k towards
superior, and MNI (0, 0, 0) (the anterior commissure) is voxel (98, 134, 72).

Brain mask (``MASK_RULE``): voxels where the grey- plus white-matter probability exceeds
50 % (gm + wm > 127 on the 0..255 maps), the largest 26-connected component, holes filled
in 3-D and then in every axial slice. It holds brain tissue and the CSF it encloses in an
axial slice (ventricles), not the CSF over the surface or in open sulci; 1780 ml (MNI
space is larger than an average native brain).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..hashing import sha256_file
from ..io import Volume, read_volume, write_volume
from ..pypi import pip_download
from .common import (
    BrainSample,
    fill_holes_3d,
    fill_holes_axial,
    largest_component,
    locked,
    mr_window,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = ["fetch_mni152", "MASK_RULE", "SHAPE"]

PACKAGE = "nilearn"
VERSION = "0.14.1"
WHEEL_NAME = f"nilearn-{VERSION}-py3-none-any.whl"
WHEEL_SHA256 = "725206484e9fb3f6691f9c2d20204a068759d5072f12055324702ee0cb2bbe8a"
LICENSE = "nilearn BSD-3-Clause; template licence not stated (use locally, do not redistribute)"
_MEMBER_DIR = "nilearn/datasets/data/"
#: cache key -> (wheel member, cached file name, sha256 of the member)
MEMBERS = {
    "t1": ("mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni152_t1.nii.gz",
           "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6"),
    "gm": ("mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz", "mni152_gm.nii.gz",
           "97a5ca69bd24db37a9cb7b32525e1733a209af904129bf1cd36da06d24243bed"),
    "wm": ("mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz", "mni152_wm.nii.gz",
           "382d92812de4744f9c86c7a0e4f680dc317a0a50e4da1f0153618a6798c7b7db"),
}
SUBDIR = "mni152"
MANIFEST_NAME = "mni152.json"
MANIFEST_FORMAT = 1
FILES = {**{key: name for key, (_, name, _) in MEMBERS.items()}, "brain_mask": "mni152_brain_mask.nrrd"}
SHAPE = (189, 233, 197)  # (k, j, i)
MASK_RULE = ("grey + white matter probability > 50 % (gm + wm > 127 of 255), largest 26-connected component, "
             "holes filled in 3-D, then in each axial slice")


def brain_mask_from_tissue_maps(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """``MASK_RULE`` applied to the 0..255 probability maps; uint8 0/1."""
    tissue = (gm.astype(np.int32) + wm.astype(np.int32)) > 127
    return fill_holes_axial(fill_holes_3d(largest_component(tissue))).astype(np.uint8)


def _extract_members(wheel: Path, directory: Path) -> None:
    """Copy the three template files out of the wheel, each verified by its sha256."""
    with zipfile.ZipFile(wheel) as zf:
        for member, name, sha256 in MEMBERS.values():
            try:
                data = zf.read(_MEMBER_DIR + member)
            except KeyError:
                raise RuntimeError(f"{wheel.name} has no {_MEMBER_DIR + member}") from None
            if hashlib.sha256(data).hexdigest() != sha256:
                raise RuntimeError(f"{wheel.name}: {member} has unexpected content (sha256 mismatch)")
            atomic_write_bytes(directory / name, data)


def _load(directory: Path, manifest: dict) -> BrainSample:
    volume = read_volume(directory / FILES["t1"])
    mask = read_volume(directory / FILES["brain_mask"])
    if volume.array.shape != SHAPE or mask.array.shape != SHAPE or not mask.geometry.is_close(volume.geometry, 1e-6):
        raise RuntimeError(f"{directory}: the cached MNI152 files do not share the expected {SHAPE} grid")
    return BrainSample(
        name="mni152", volume=volume, brain_mask=np.ascontiguousarray(mask.array, dtype=np.uint8),
        window=tuple(manifest["window"]), mask_rule=MASK_RULE, source=manifest["source"]["description"],
        license=LICENSE, files=tuple(directory / name for name in FILES.values()))


def fetch_mni152(cache_dir: Path | str | None = None, *, wheel_file: Path | str | None = None) -> BrainSample:
    """The MNI152 2009a T1 template and its brain mask (see the module docstring).

    ``cache_dir``: the data directory (default ``DESAM_DATA_DIR`` or
    ~/.cache/slicer-desam/data); files go to its ``mni152`` folder. The first call runs
    ``pip download --no-deps nilearn==0.14.1`` (``wheel_file`` uses an already downloaded
    wheel instead); later calls verify the cache by sha256 and read it. Raises
    RuntimeError when the download fails or the wheel is not the known one."""
    from ..samples import data_dir

    directory = (Path(cache_dir).expanduser() if cache_dir is not None else data_dir()) / SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory, "mni152"):
        manifest = read_manifest(directory, MANIFEST_NAME, MANIFEST_FORMAT, FILES)
        if manifest is not None:
            return _load(directory, manifest)
        with tempfile.TemporaryDirectory(prefix="desam-mni152-") as tmp:
            wheel = Path(wheel_file) if wheel_file is not None else pip_download(Path(tmp), PACKAGE, VERSION,
                                                                                 binary_only=True)
            if not wheel.is_file():
                raise FileNotFoundError(f"{wheel}: no such file")
            digest = sha256_file(wheel)
            if digest != WHEEL_SHA256:
                raise RuntimeError(f"{wheel.name}: sha256 {digest} is not that of {WHEEL_NAME} ({WHEEL_SHA256})")
            _extract_members(wheel, directory)
        t1 = read_volume(directory / FILES["t1"])
        gm = read_volume(directory / FILES["gm"])
        wm = read_volume(directory / FILES["wm"])
        for other in (gm, wm):
            if other.array.shape != t1.array.shape or not other.geometry.is_close(t1.geometry, 1e-6):
                raise RuntimeError("the MNI152 tissue maps are not on the T1 template's grid")
        mask = brain_mask_from_tissue_maps(gm.array, wm.array)
        write_volume(directory / FILES["brain_mask"], Volume(mask, t1.geometry))
        manifest = write_manifest(directory, MANIFEST_NAME, {
            "format": MANIFEST_FORMAT,
            "name": "MNI ICBM152 2009a nonlinear symmetric T1 template, 1 mm",
            "license": LICENSE,
            "source": {"description": f"PyPI wheel {WHEEL_NAME}, {_MEMBER_DIR}",
                       "package": PACKAGE, "version": VERSION, "wheel_sha256": WHEEL_SHA256},
            "shape": list(SHAPE),
            "geometry": t1.geometry.to_dict(),
            "window": list(mr_window(t1.array)),
            "mask_rule": MASK_RULE,
            "brain_voxels": int(mask.sum()),
        }, FILES)
        log.info("MNI152 template ready in %s", directory)
        return _load(directory, manifest)
