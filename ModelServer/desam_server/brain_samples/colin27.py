"""The Colin27 T1 head ("ch2", Holmes et al. 1998: 27 scans of one person averaged, 1 mm,
skull, scalp, face and neck included), the cross-domain check for brain decoders trained
on the MNI152 template.

Source: Debian's package ``mricron-data`` (MRIcron's templates; the package's copyright
file puts its files under BSD-3-Clause), fetched with ``apt-get download`` (verified
against the signed archive index), members ``usr/share/mricron/templates/ch2.nii.gz``
and ``ch2bet.nii.gz`` (MRIcron's skull-stripped copy made with FSL BET), each pinned by
sha256. Cached in the data directory's ``colin27`` folder.

Grid: 181 x 217 x 181 voxels (i, j, k), 1 mm, uint8; LPS direction diag(-1, -1, 1) (i
towards the patient's right, j anterior, k superior), roughly MNI-aligned. It is another
source than the training template (one person, another scanner and averaging, real skull
and scalp), but in nearly the same space: a decoder that learned the template's position
of the brain is not caught out by it.

Reference brain mask: no expert label exists. ``MASK_RULE``, semi-automatic: the
thresholds were read off the histogram inside the BET mask (CSF below ~60, grey-matter
peak 84, white-matter peak 112, scalp fat and marrow above ~135):
candidate = 66 <= intensity <= 135; erode it by a 3-voxel ball (cuts the thin bridges to
scalp, muscle and optic nerves); keep the largest 26-connected component; grow it back
by reconstruction inside the candidate, at most 4 voxels from the eroded core; fill holes
in 3-D, then in every axial slice. Same definition of "brain" as the MNI152 mask (tissue
plus the CSF it encloses in an axial slice). 1662 ml; Dice 0.968 against the BET mask,
whose errors (straight cuts through the temporal lobes and along the midline) it does
not share. Checked by eye on overlays in all three orientations.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..debian import apt_download, deb_data_tar, tar_member
from ..hashing import sha256_file
from ..io import Volume, read_volume, write_volume
from .common import (
    BrainSample,
    dilate,
    erode,
    fill_holes_3d,
    fill_holes_axial,
    largest_component,
    locked,
    mr_window,
    read_manifest,
    write_manifest,
)

log = logging.getLogger(__name__)

__all__ = ["fetch_colin27", "reference_brain_mask", "bet_mask", "MASK_RULE", "SHAPE"]

PACKAGE = "mricron-data"
LICENSE = "BSD-3-Clause (Debian mricron-data copyright); Colin27 data: MNI, Holmes et al. 1998"
_MEMBER_DIR = "usr/share/mricron/templates/"
#: cache key -> (package member, cached file name, sha256)
MEMBERS = {
    "t1": ("ch2.nii.gz", "colin27_t1.nii.gz", "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309"),
    "bet": ("ch2bet.nii.gz", "colin27_bet.nii.gz", "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1"),
}
SUBDIR = "colin27"
MANIFEST_NAME = "colin27.json"
MANIFEST_FORMAT = 1
FILES = {**{key: name for key, (_, name, _) in MEMBERS.items()}, "brain_mask": "colin27_brain_mask.nrrd"}
SHAPE = (181, 217, 181)  # (k, j, i)
THRESHOLDS = (66, 135)
ERODE_RADIUS = 3
REGROW_RADIUS = 4
MASK_RULE = (f"candidate = {THRESHOLDS[0]} <= T1 <= {THRESHOLDS[1]}; eroded by a {ERODE_RADIUS}-voxel ball; "
             f"largest 26-connected component; regrown by reconstruction inside the candidate, at most "
             f"{REGROW_RADIUS} voxels from that core; holes filled in 3-D, then in each axial slice")


def reference_brain_mask(t1: np.ndarray) -> np.ndarray:
    """``MASK_RULE`` on the Colin27 T1 (uint8 0..255 as shipped); uint8 0/1."""
    import SimpleITK as sitk

    candidate = (t1 >= THRESHOLDS[0]) & (t1 <= THRESHOLDS[1])
    core = largest_component(erode(candidate, ERODE_RADIUS))
    regrown = sitk.GetArrayFromImage(sitk.BinaryReconstructionByDilation(
        sitk.GetImageFromArray(core.astype(np.uint8)), sitk.GetImageFromArray(candidate.astype(np.uint8)))) > 0
    brain = regrown & candidate & dilate(core, REGROW_RADIUS)
    return fill_holes_axial(fill_holes_3d(brain)).astype(np.uint8)


def _load(directory: Path, manifest: dict) -> BrainSample:
    volume = read_volume(directory / FILES["t1"])
    mask = read_volume(directory / FILES["brain_mask"])
    if volume.array.shape != SHAPE or mask.array.shape != SHAPE or not mask.geometry.is_close(volume.geometry, 1e-6):
        raise RuntimeError(f"{directory}: the cached Colin27 files do not share the expected {SHAPE} grid")
    return BrainSample(
        name="colin27", volume=volume, brain_mask=np.ascontiguousarray(mask.array, dtype=np.uint8),
        window=tuple(manifest["window"]), mask_rule=MASK_RULE, source=manifest["source"]["description"],
        license=LICENSE, files=tuple(directory / name for name in FILES.values()))


def bet_mask(sample: BrainSample) -> np.ndarray:
    """MRIcron's BET brain mask of Colin27 (``ch2bet.nii.gz`` > 0) from ``sample``'s cache,
    for comparison only: it has straight cuts through the temporal lobes and along the
    midline."""
    paths = [p for p in sample.files if p.name == FILES["bet"]]
    if sample.name != "colin27" or not paths:
        raise ValueError("bet_mask needs the sample returned by fetch_colin27")
    return (read_volume(paths[0]).array > 0).astype(np.uint8)


def fetch_colin27(cache_dir: Path | str | None = None, *, deb_file: Path | str | None = None) -> BrainSample:
    """The Colin27 T1 head and its reference brain mask (see the module docstring).

    ``cache_dir``: the data directory (default ``DESAM_DATA_DIR`` or
    ~/.cache/slicer-desam/data); files go to its ``colin27`` folder. The first call runs
    ``apt-get download mricron-data`` (``deb_file`` uses an already downloaded .deb);
    later calls verify the cache by sha256 and read it. Raises RuntimeError when apt is
    unavailable, the download fails or the package no longer ships the known files."""
    from ..samples import data_dir

    directory = (Path(cache_dir).expanduser() if cache_dir is not None else data_dir()) / SUBDIR
    directory.mkdir(parents=True, exist_ok=True)
    with locked(directory, "colin27"):
        manifest = read_manifest(directory, MANIFEST_NAME, MANIFEST_FORMAT, FILES)
        if manifest is not None:
            return _load(directory, manifest)
        with tempfile.TemporaryDirectory(prefix="desam-colin27-") as tmp:
            deb = Path(deb_file) if deb_file is not None else apt_download(Path(tmp), PACKAGE)
            if not deb.is_file():
                raise FileNotFoundError(f"{deb}: no such file")
            deb_name, deb_sha256 = deb.name, sha256_file(deb)
            data_tar = deb_data_tar(deb)
            for member, name, sha256 in MEMBERS.values():
                content = tar_member(data_tar, _MEMBER_DIR + member)
                if hashlib.sha256(content).hexdigest() != sha256:
                    raise RuntimeError(f"{deb_name}: {member} has unexpected content (sha256 mismatch): "
                                       "the package no longer ships the known Colin27 files")
                atomic_write_bytes(directory / name, content)
            del data_tar
        t1 = read_volume(directory / FILES["t1"])
        if t1.array.shape != SHAPE:
            raise RuntimeError(f"Colin27 T1 has shape {t1.array.shape}, expected {SHAPE}")
        mask = reference_brain_mask(t1.array)
        write_volume(directory / FILES["brain_mask"], Volume(mask, t1.geometry))
        version = deb_name[len(PACKAGE) + 1:].rsplit("_", 1)[0] if deb_name.startswith(PACKAGE + "_") else "unknown"
        manifest = write_manifest(directory, MANIFEST_NAME, {
            "format": MANIFEST_FORMAT,
            "name": "Colin27 (ch2) T1 head, 1 mm",
            "license": LICENSE,
            "source": {"description": f"Debian package {PACKAGE} {version}, {_MEMBER_DIR}ch2.nii.gz",
                       "package": PACKAGE, "version": version, "deb": deb_name, "deb_sha256": deb_sha256},
            "shape": list(SHAPE),
            "geometry": t1.geometry.to_dict(),
            "window": list(mr_window(t1.array)),
            "mask_rule": MASK_RULE,
            "brain_voxels": int(mask.sum()),
        }, FILES)
        log.info("Colin27 head ready in %s", directory)
        return _load(directory, manifest)
