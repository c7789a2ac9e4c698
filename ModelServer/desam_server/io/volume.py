"""Volumes in, segmentations out: NRRD, NIfTI, MetaImage and DICOM with exact geometry.

Conventions (the same as 3D Slicer's, ITK's and DICOM's):

- ``Volume.array`` is indexed ``[k, j, i]`` (numpy ``[z, y, x]``); index axis ``i`` is the
  fastest-varying one in every file.
- ``Geometry`` is in LPS (DICOM patient coordinates, millimetres): ``origin`` is the centre
  of voxel (0, 0, 0), ``spacing`` is along ``(i, j, k)`` and column ``c`` of ``direction``
  is the unit vector of index axis ``c``. Direction matrices may be oblique and may have a
  negative determinant; nothing here rounds or "fixes" them.
- NIfTI files are RAS: ``ijk_to_ras = diag(-1, -1, 1, 1) @ ijk_to_lps`` on the way out, and
  the inverse on the way in. NIfTI-1 stores that matrix as float32, so NIfTI round trips are
  exact only to float32 precision (~1e-7 relative, i.e. ~1e-5 mm on a 100 mm origin);
  NRRD and MetaImage keep float64 (NRRD stores direction x spacing, so splitting it back
  costs at most a few ulps, ~1e-15).

Reading goes through SimpleITK (the ITK readers 3D Slicer itself uses), so a file means
here what it means in Slicer. Scalar NRRD volumes are written by this module: a plain NRRD
header (``space: left-posterior-superior``, ``space directions``, ``space origin``,
``kinds``) with gzip data compressed in chunks, without a copy of the voxels. Slicer
``.seg.nrrd`` segmentations are read and written with slicerio (``segmentation.py``).

Every write is atomic (temporary file in the target directory, fsync, rename). Nothing
here logs voxel values or DICOM attributes.
"""

from __future__ import annotations

import gzip
import logging
import os
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_output_path, atomic_write, atomic_write_bytes
from .geometry import LPS_TO_RAS, Geometry, Volume

log = logging.getLogger(__name__)

__all__ = [
    "Geometry",
    "Volume",
    "read_volume",
    "write_volume",
    "write_labelmap_nifti",
    "LPS_TO_RAS",
]


_NRRD_COMPRESSION_LEVEL = 6
_CHUNK = 1 << 22


# --------------------------------------------------------------------------- reading


def read_volume(path: str | os.PathLike) -> Volume:
    """Read a scalar volume: NRRD (.nrrd/.nhdr), NIfTI (.nii/.nii.gz), MetaImage
    (.mha/.mhd), a single DICOM file, or a folder holding a DICOM series (the series with
    the most files wins; sub-folders are searched too). 2-D images become one slice;
    4-D, vector and RGB images raise ValueError."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder")
    if p.is_dir():
        image = _read_dicom_folder(p)
    else:
        image = _read_image_file(p)
    volume = _volume_from_sitk(image, p)
    log.debug("read %s: shape %s, %s, spacing %s", p, volume.array.shape, volume.array.dtype,
              tuple(round(s, 4) for s in volume.geometry.spacing))
    return volume


def _itk_reason(exc: Exception) -> str:
    """The useful sentence of an ITK exception (they carry source paths and addresses)."""
    text = str(exc)
    if "Unable to determine ImageIO reader" in text:
        return "not a NRRD, NIfTI, MetaImage or DICOM file that ITK can read"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, line in enumerate(lines):
        if "ITK ERROR" in line or "ERROR:" in line:
            reason = line.split("): ", 1)[-1]
            if reason.endswith(":") or len(reason) < 12:
                reason = " ".join([reason] + lines[i + 1:i + 2])
            return reason[:300]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def _file_reader(p: Path):
    import SimpleITK as sitk

    if not os.access(p, os.R_OK):
        raise ValueError(f"{p}: file is not readable (permission denied)")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ValueError(f"{p}: cannot read as an image volume ({_itk_reason(exc)})") from None
    return reader


def _check_scalar_3d(p: Path, dimension: int, size: Sequence[int], components: int, pixel_type: str) -> None:
    if components != 1:
        raise ValueError(f"{p}: {components}-component (vector or RGB) image of size {tuple(size)}; "
                         "only scalar 3-D volumes are supported")
    if "complex" in pixel_type.lower():
        raise ValueError(f"{p}: complex-valued image; only real scalar volumes are supported")
    if dimension not in (2, 3) and not (dimension == 4 and size[3] == 1):
        raise ValueError(f"{p}: {dimension}-D image of size {tuple(size)}; only 3-D scalar volumes "
                         "(or 2-D images, read as one slice) are supported")


def _pixel_type(reader) -> str:
    import SimpleITK as sitk

    try:
        return sitk.GetPixelIDValueAsString(reader.GetPixelID())
    except (RuntimeError, TypeError, ValueError):
        return ""


def _read_image_file(p: Path):
    reader = _file_reader(p)
    _check_scalar_3d(p, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(),
                     _pixel_type(reader))
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"{p}: cannot read the image data ({_itk_reason(exc)})") from None


def _read_dicom_folder(folder: Path):
    import SimpleITK as sitk

    candidates: list[tuple[int, str, list[str]]] = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        try:
            series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath)
        except RuntimeError:
            continue
        for series_id in series_ids:
            files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, series_id))
            if files:
                candidates.append((len(files), dirpath, files))
    if not candidates:
        raise ValueError(f"{folder}: no DICOM series found (no readable DICOM image files in the folder "
                         "or its sub-folders)")
    count, where, files = max(candidates, key=lambda c: c[0])  # first of the largest on ties
    if len(candidates) > 1:
        log.info("%s holds %d DICOM series; reading the largest (%d files, in %s)",
                 folder, len(candidates), count, where)
    first = _file_reader(Path(files[0]))
    _check_scalar_3d(Path(files[0]), 3, (*first.GetSize()[:2], count), first.GetNumberOfComponents(),
                     _pixel_type(first))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"{folder}: cannot read the DICOM series in {where} ({_itk_reason(exc)})") from None


def _geometry_from_sitk(image) -> Geometry:
    dim = image.GetDimension()
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    if dim == 2:
        d3 = np.eye(3)
        d3[:2, :2] = direction
        return Geometry(spacing=(spacing[0], spacing[1], 1.0), origin=(origin[0], origin[1], 0.0), direction=d3)
    return Geometry(spacing=tuple(spacing[:3]), origin=tuple(origin[:3]), direction=direction[:3, :3])


def _volume_from_sitk(image, p: Path) -> Volume:
    import SimpleITK as sitk

    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{p}: vector image; only scalar volumes are supported")
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:
        array = array[np.newaxis]
    elif image.GetDimension() == 4:
        array = array[0]
    array = np.ascontiguousarray(array)
    try:
        geometry = _geometry_from_sitk(image)
    except ValueError as exc:
        raise ValueError(f"{p}: invalid geometry ({exc})") from None
    return Volume(array=array, geometry=geometry)


# --------------------------------------------------------------------------- writing


def write_volume(path: str | os.PathLike, volume: Volume) -> Path:
    """Write ``volume`` by extension: .nrrd (gzip), .nii.gz / .nii, or .mha (compressed)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(".nrrd"):
        _write_nrrd(p, volume.array, volume.geometry)
    elif name.endswith(".nii.gz") or name.endswith(".nii"):
        _write_nifti(p, volume.array, volume.geometry)
    elif name.endswith(".mha"):
        _write_sitk(p, volume.array, volume.geometry)
    else:
        raise ValueError(f"{p}: unsupported output format; use .nrrd, .nii.gz, .nii or .mha")
    return p


def write_labelmap_nifti(path: str | os.PathLike, labelmap: np.ndarray, geometry: Geometry) -> Path:
    """Write a K x J x I labelmap as NIfTI-1 (.nii.gz or .nii) with the volume's geometry
    (converted to RAS; sform and qform both set, code 1 = scanner) and the NIfTI label
    intent."""
    p = Path(path)
    if not (p.name.lower().endswith(".nii.gz") or p.name.lower().endswith(".nii")):
        raise ValueError(f"{p}: a NIfTI labelmap needs the extension .nii.gz or .nii")
    _write_nifti(p, _as_label_array(labelmap), geometry, label=True)
    return p


def _as_label_array(labelmap: np.ndarray) -> np.ndarray:
    lab = np.asarray(labelmap)
    if lab.ndim != 3:
        raise ValueError(f"a labelmap must be 3-D (K x J x I), got shape {lab.shape}")
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        if np.issubdtype(lab.dtype, np.floating) and np.all(np.isfinite(lab)) and np.all(lab == np.round(lab)):
            lab = lab.astype(np.int64)
        else:
            raise ValueError(f"a labelmap must hold integer labels, got dtype {lab.dtype}")
    if lab.size and lab.min() < 0:
        raise ValueError("a labelmap must not hold negative labels")
    top = int(lab.max()) if lab.size else 0
    if top <= 255:
        return lab.astype(np.uint8, copy=False)
    if top <= 65535:
        return lab.astype(np.uint16, copy=False)
    raise ValueError(f"label values up to {top} do not fit a labelmap (max 65535)")


def _check_array_for(array: np.ndarray, geometry: Geometry) -> np.ndarray:
    a = np.asarray(array)
    if a.ndim != 3:
        raise ValueError(f"expected a 3-D K x J x I array, got shape {a.shape}")
    if not isinstance(geometry, Geometry):
        raise TypeError("geometry must be a Geometry")
    if a.dtype == bool:
        a = a.astype(np.uint8)
    return a


# NRRD ------------------------------------------------------------------------------

_NRRD_TYPES = {
    "int8": "signed char", "uint8": "unsigned char", "int16": "short", "uint16": "unsigned short",
    "int32": "int", "uint32": "unsigned int", "int64": "long long int", "uint64": "unsigned long long int",
    "float32": "float", "float64": "double",
}


def _num(x: float) -> str:
    """Shortest text that reads back as the same float64 (``repr``), integers without
    a trailing ``.0``, and never ``-0``."""
    x = float(x) + 0.0
    if x.is_integer() and abs(x) < 1e15:
        return str(int(x))
    return repr(x)


def _vec(values: Iterable[float]) -> str:
    return "(" + ",".join(_num(v) for v in values) + ")"


def _nrrd_header(array: np.ndarray, geometry: Geometry) -> bytes:
    k, j, i = array.shape
    columns = geometry.direction * np.asarray(geometry.spacing)
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        f"type: {_NRRD_TYPES[array.dtype.name]}",
        "dimension: 3",
        "space: left-posterior-superior",
        f"sizes: {i} {j} {k}",
        "space directions: " + " ".join(_vec(columns[:, c]) for c in range(3)),
        "kinds: domain domain domain",
    ]
    if array.dtype.itemsize > 1:
        lines.append("endian: little")
    lines += ["encoding: gzip", "space origin: " + _vec(geometry.origin)]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def _write_nrrd(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    a = _check_array_for(array, geometry)
    if a.dtype.name not in _NRRD_TYPES:
        raise ValueError(f"cannot write voxel type {a.dtype} to NRRD")
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    header = _nrrd_header(a, geometry)
    raw = memoryview(a.reshape(-1).view(np.uint8))
    compressor = zlib.compressobj(_NRRD_COMPRESSION_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    with atomic_write(path, "wb") as handle:
        handle.write(header)
        for start in range(0, len(raw), _CHUNK):
            handle.write(compressor.compress(raw[start:start + _CHUNK]))
        handle.write(compressor.flush())


# NIfTI -----------------------------------------------------------------------------


def _write_nifti(path: Path, array: np.ndarray, geometry: Geometry, *, label: bool = False) -> None:
    import nibabel as nib

    a = _check_array_for(array, geometry)
    if a.dtype in (np.int64, np.uint64):
        info = np.iinfo(np.int32)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise ValueError(f"{path}: 64-bit voxel values do not fit NIfTI's int32")
        a = a.astype(np.int32)
    elif a.dtype == np.float16:
        a = a.astype(np.float32)
    affine = geometry.ijk_to_ras()
    image = nib.Nifti1Image(a.transpose(2, 1, 0), affine)  # NIfTI is i-fastest: (i, j, k)
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)
    header = image.header
    header.set_xyzt_units(xyz="mm")
    if label:
        header.set_intent("label")
    data = image.to_bytes()
    if path.name.lower().endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write_bytes(path, data)


# MetaImage -------------------------------------------------------------------------


def _to_sitk(array: np.ndarray, geometry: Geometry):
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing(geometry.spacing)
    image.SetOrigin(geometry.origin)
    image.SetDirection(tuple(geometry.direction.ravel()))
    return image


def _write_sitk(path: Path, array: np.ndarray, geometry: Geometry) -> None:
    import SimpleITK as sitk

    image = _to_sitk(_check_array_for(array, geometry), geometry)
    with atomic_output_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=True)
        except RuntimeError as exc:
            raise ValueError(f"{path}: cannot write ({_itk_reason(exc)})") from None
