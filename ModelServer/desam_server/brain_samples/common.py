"""What every brain sample shares: the ``BrainSample`` record, the binary-mask operations
the reference masks are built from (SimpleITK only), and the verified file cache.

A brain mask here is a uint8 K x J x I array (1 = brain) on the volume's grid. "Brain"
means the same thing in every sample: brain tissue (grey and white matter, brainstem,
cerebellum) plus the CSF it encloses in an axial slice (ventricles, the cisterns and
fissures closed off in that slice); the CSF between the brain surface and the skull and
in sulci open to the surface is not brain. Masks are defined on axial slices (the
trainer's slicing direction): near the midline a sagittal view shows the axial hole
filling as stripes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes
from ..engine.preprocess import IntensityWindow
from ..hashing import sha256_file
from ..io import Volume

log = logging.getLogger(__name__)

__all__ = ["BrainSample", "largest_component", "fill_holes_3d", "fill_holes_axial", "mask_volume_ml",
           "dice"]


@dataclass(frozen=True)
class BrainSample:
    """One T1 MR head or brain image with its brain mask.

    ``volume``: the image (``Volume``, LPS geometry); ``brain_mask``: uint8 K x J x I, 1 =
    brain (see the module docstring); ``window``: (center, width) for encoding, the MR
    default (0.5th..99.5th percentile of the whole volume); ``mask_rule``: how the mask was
    made; ``source`` / ``license``: where the data come from; ``files``: the cached files
    (empty for generated samples)."""

    name: str
    volume: Volume
    brain_mask: np.ndarray
    window: tuple[float, float]
    mask_rule: str
    source: str
    license: str
    files: tuple[Path, ...] = ()

    @property
    def brain_ml(self) -> float:
        return mask_volume_ml(self.brain_mask, self.volume.geometry.spacing)

    def intensity_window(self) -> IntensityWindow:
        return IntensityWindow(center=self.window[0], width=self.window[1])


def mr_window(array: np.ndarray) -> tuple[float, float]:
    """The service's MR default window for a volume, as (center, width)."""
    w = IntensityWindow.from_percentiles(array)
    return (float(w.center), float(w.width))


# ------------------------------------------------------------------------------ masks


def _image(mask: np.ndarray):
    import SimpleITK as sitk

    return sitk.GetImageFromArray(np.ascontiguousarray(mask, dtype=np.uint8))


def _array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image) > 0


def largest_component(mask: np.ndarray, *, full_connectivity: bool = True) -> np.ndarray:
    """The largest connected component of a binary mask (26-connected in 3-D by default)."""
    import SimpleITK as sitk

    labels = sitk.RelabelComponent(sitk.ConnectedComponent(_image(mask), full_connectivity))
    return sitk.GetArrayFromImage(labels) == 1


def fill_holes_3d(mask: np.ndarray) -> np.ndarray:
    """Fill the background regions not connected to the border, in 3-D."""
    import SimpleITK as sitk

    return _array(sitk.BinaryFillhole(_image(mask)))


def fill_holes_axial(mask: np.ndarray) -> np.ndarray:
    """Fill holes in each axial slice (index k) separately."""
    import SimpleITK as sitk

    return np.stack([_array(sitk.BinaryFillhole(_image(s))) if s.any() else s.astype(bool) for s in mask])


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    return _array(sitk.BinaryErode(_image(mask), [radius] * mask.ndim))


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import SimpleITK as sitk

    return _array(sitk.BinaryDilate(_image(mask), [radius] * mask.ndim))


def mask_volume_ml(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


# ------------------------------------------------------------------------------ cache


@contextlib.contextmanager
def locked(directory: Path, name: str) -> Iterator[None]:
    """Serialise fetches of one sample into one directory across processes (where fcntl
    exists)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(directory / f".{name}.lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def read_manifest(directory: Path, manifest_name: str, manifest_format: int, files: dict[str, str]) -> dict | None:
    """The manifest in ``directory`` if it has the expected format and every listed file
    exists with its recorded size and sha256; else None (and a warning when one existed)."""
    path = directory / manifest_name
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != manifest_format:
            raise ValueError("old manifest format")
        for key, name in files.items():
            entry = manifest["files"][key]
            file = directory / name
            if entry["name"] != name or not file.is_file() or file.stat().st_size != entry["size"]:
                raise ValueError(f"{name} is missing or has the wrong size")
            if sha256_file(file) != entry["sha256"]:
                raise ValueError(f"{name} does not match its recorded sha256")
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cached sample in %s is not usable (%s); fetching it again", directory, exc)
        return None


def write_manifest(directory: Path, manifest_name: str, manifest: dict, files: dict[str, str]) -> dict:
    """Add the files' names, sizes and sha256 to ``manifest`` and write it atomically."""
    manifest = dict(manifest)
    manifest["files"] = {key: {"name": name, "size": (directory / name).stat().st_size,
                               "sha256": sha256_file(directory / name)} for key, name in files.items()}
    atomic_write_bytes(directory / manifest_name, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest
