"""3D Slicer segmentations (.seg.nrrd), read and written with slicerio, Slicer's own Python
library for them: one shared labelmap layer plus the ``Segmentation_*`` / ``SegmentN_*``
key-value fields of Slicer's ``vtkMRMLSegmentationStorageNode``. Geometry conventions are
those of ``volume.py``; labelmaps here are K x J x I, slicerio's voxel arrays are I x J x K
(NRRD axis order), and both conversions are written out below.

Two things slicerio cannot do, because the pynrrd it writes and reads the header with
cannot, are done here (docs/ENGINE.md, "Segmentation files"):

- pynrrd encodes the header as ASCII (a non-ASCII segment name raises
  UnicodeEncodeError) and does not apply NRRD's backslash escaping. slicerio writes the
  file with placeholder names and IDs; the header lines holding them are then replaced by
  the UTF-8 text with the escaping teem (Slicer's NRRD library) writes and reads.
- pynrrd decodes the header as ASCII, dropping every other byte ("Rückenmark" comes back
  as "Rckenmark"). Segment names and IDs are therefore taken from ITK's reading of the
  header (SimpleITK, whose NRRD reader is teem, as in Slicer), which also says how many
  layers the file has before any voxel is read.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .volume import Geometry, _as_label_array, _file_reader, _num, read_volume

__all__ = ["SegmentInfo", "write_segmentation", "read_segmentation"]


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a segmentation: display name, RGB colour in 0-1, its value in the
    labelmap and (optionally) the Slicer segment ID (default ``Segment_<label_value>``)."""

    name: str
    color: tuple[float, float, float]
    label_value: int = 1
    segment_id: str | None = None

    def __post_init__(self) -> None:
        color = tuple(float(c) for c in self.color)
        if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
            raise ValueError(f"segment colour must be 3 numbers in 0..1, got {self.color!r}")
        object.__setattr__(self, "color", color)
        if isinstance(self.label_value, bool) or int(self.label_value) != self.label_value:
            raise ValueError(f"label_value must be an integer, got {self.label_value!r}")
        object.__setattr__(self, "label_value", int(self.label_value))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("a segment needs a non-empty name")

    @property
    def resolved_id(self) -> str:
        return self.segment_id or f"Segment_{self.label_value}"


# --------------------------------------------------------------------------- writing

# Values of 3D Slicer's vtkMRMLSegmentationStorageNode (binary labelmap representation,
# one shared layer). slicerio writes them under their Slicer field names.
_MASTER_REPRESENTATION = "Binary labelmap"
_REFERENCE_GEOMETRY_PARAMETER = "Reference image geometry"
_REFERENCE_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is created in "
    "course of conversion. Can be copied from a volume, using the button.")
# zlib level of the gzip-encoded voxels: slicerio's default (9) makes the 108 x 256 x 256
# sample head mask 13 % smaller and its write 10x slower (docs/ENGINE.md).
_COMPRESSION_LEVEL = 6


def _reference_image_geometry(geometry: Geometry, shape_kji: tuple[int, int, int]) -> str:
    """vtkSegmentationConverter::SerializeImageGeometry: the 16 elements of the IJK -> RAS
    matrix row by row, then the extent (i0 i1 j0 j1 k0 k1), each followed by ';'."""
    k, j, i = shape_kji
    values = [_num(v) for v in geometry.ijk_to_ras().ravel()]
    values += [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(v + ";" for v in values)


def _extent_ijk(labelmap_kji: np.ndarray) -> list[int]:
    """Bounding box of the non-zero voxels as Slicer's segment extent ``i0 i1 j0 j1 k0 k1``;
    ``0 -1 0 -1 0 -1`` (Slicer's empty extent) when there are none."""
    extent: list[int] = []
    for axis in (2, 1, 0):  # i, j, k
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(labelmap_kji.any(axis=other))
        if hit.size == 0:
            return [0, -1, 0, -1, 0, -1]
        extent += [int(hit[0]), int(hit[-1])]
    return extent


def _escape_nrrd_value(text: str) -> str:
    # As teem's writer (used by Slicer) does: escape backslash and newline, other
    # whitespace becomes a space.
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.translate({ord(c): " " for c in "\r\t\v\f"})


def _placeholder(index: int, field: str) -> str:
    return f"desam-placeholder-{index}-{field}"


def _put_text_fields(nrrd_bytes: bytes, texts: dict[tuple[int, str], str]) -> tuple[bytes, bytes]:
    """Split what slicerio wrote into (header, data) and put each ``(segment index, field)``
    text, UTF-8 and teem-escaped, in place of its placeholder line in the header."""
    end = nrrd_bytes.find(b"\n\n")  # pynrrd's header is ASCII lines; a blank line ends it
    if end < 0:
        raise RuntimeError("slicerio wrote no NRRD header")
    header, data = nrrd_bytes[:end + 2], nrrd_bytes[end + 2:]
    for (index, field), text in texts.items():
        key = f"\nSegment{index}_{field}:=".encode("ascii")
        old = key + _placeholder(index, field).encode("ascii") + b"\n"
        if header.count(old) != 1:
            raise RuntimeError(f"slicerio's header has no single Segment{index}_{field} line")
        header = header.replace(old, key + _escape_nrrd_value(text).encode("utf-8") + b"\n")
    return header, data


def write_segmentation(path: str | os.PathLike, labelmap: np.ndarray, geometry: Geometry,
                       segments: Sequence[SegmentInfo]) -> Path:
    """Write a 3D Slicer segmentation (.seg.nrrd) with slicerio: one shared labelmap layer
    (uint8, K x J x I, value ``label_value`` for each segment, 0 = background) with the
    ``Segmentation_*`` / ``SegmentN_*`` fields Slicer's segmentation storage node reads.
    The file appears atomically (temporary file beside it, fsync, rename)."""
    import slicerio

    p = Path(path)
    lab = _as_label_array(labelmap)
    if lab.dtype != np.uint8:
        raise ValueError("a .seg.nrrd labelmap layer holds label values 0..255")
    if not isinstance(geometry, Geometry):
        raise TypeError("geometry must be a Geometry")
    lab = np.ascontiguousarray(lab)
    segments = list(segments)
    ids = [s.resolved_id for s in segments]
    values = [s.label_value for s in segments]
    if len(set(ids)) != len(ids):
        raise ValueError(f"segment IDs must be unique, got {ids}")
    if len(set(values)) != len(values):
        raise ValueError(f"segment label values must be unique within one layer, got {values}")
    if any(not 1 <= v <= 255 for v in values):
        raise ValueError(f"segment label values must be in 1..255, got {values}")
    present = set(np.flatnonzero(np.bincount(lab.ravel(), minlength=256)).tolist()) - {0}
    undeclared = sorted(present - set(values))
    if undeclared:
        raise ValueError(f"the labelmap holds label values {undeclared[:10]} that no segment declares")
    for segment, segment_id in zip(segments, ids, strict=True):
        for text in (segment.name, segment_id):
            if "\n" in text or "\r" in text:
                raise ValueError(f"segment names and IDs must be one line, got {text!r}")

    # Every segment gets the union bounding box of the shared layer as its extent, as
    # Slicer's writer gives the segments of one layer.
    extent = _extent_ijk(lab)
    texts: dict[tuple[int, str], str] = {}
    slicer_segments = []
    for index, (segment, segment_id) in enumerate(zip(segments, ids, strict=True)):
        texts[(index, "ID")] = segment_id
        texts[(index, "Name")] = segment.name
        slicer_segments.append({
            "id": _placeholder(index, "ID"),
            "name": _placeholder(index, "Name"),
            "color": list(segment.color),
            "colorAutoGenerated": False,
            "nameAutoGenerated": False,
            "labelValue": segment.label_value,
            "layer": 0,
            "extent": extent,
        })
    segmentation = {
        # slicerio's "voxels" are in NRRD axis order (i fastest) unless written with
        # index_order="C", which takes our K x J x I array as it is.
        "voxels": lab,
        "ijkToLPS": geometry.ijk_to_lps(),
        "masterRepresentation": _MASTER_REPRESENTATION,
        "containedRepresentationNames": [_MASTER_REPRESENTATION],
        "referenceImageExtentOffset": [0, 0, 0],
        "conversionParameters": [{
            "name": _REFERENCE_GEOMETRY_PARAMETER,
            "value": _reference_image_geometry(geometry, lab.shape),
            "description": _REFERENCE_GEOMETRY_DESCRIPTION,
        }],
        "segments": slicer_segments,
    }
    buffer = io.BytesIO()
    slicerio.write_segmentation(buffer, segmentation, compression_level=_COMPRESSION_LEVEL, index_order="C")
    header, data = _put_text_fields(buffer.getvalue(), texts)
    with atomic_write(p, "wb") as handle:
        handle.write(header)
        handle.write(data)
    return p


# --------------------------------------------------------------------------- reading

_SEGMENT_KEY = re.compile(r"Segment([0-9]+)_")


def _is_nrrd(p: Path) -> bool:
    try:
        with open(p, "rb") as handle:
            return handle.read(4) == b"NRRD"
    except OSError as exc:
        raise ValueError(f"{p}: cannot open ({exc.strerror})") from None


def read_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, Geometry, list[SegmentInfo]]:
    """Read a single-layer Slicer .seg.nrrd (or a plain labelmap: any 3-D NRRD with a
    ``space`` field, or a NIfTI / MetaImage / DICOM image): the K x J x I labelmap, its
    geometry and its segments. A plain labelmap without segment fields gets one segment per
    label value, named ``Segment_<value>`` as Slicer names them. Segmentations with
    overlapping segments (several layers) raise ValueError."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder, not a segmentation file")
    if not _is_nrrd(p):
        # No segment fields outside NRRD: the image is read as any volume is.
        volume = read_volume(p)
        labelmap = _checked_labelmap(p, volume.array)
        return labelmap, volume.geometry, _segments_of_plain_labelmap(labelmap)

    # ITK reads the header as Slicer does (teem): layers and the segment text fields.
    reader = _file_reader(p)
    layers = reader.GetNumberOfComponents()
    if layers != 1:
        raise ValueError(f"{p}: segmentation with {layers} layers (overlapping segments); only "
                         "single-layer segmentations are supported")
    if reader.GetDimension() != 3:
        raise ValueError(f"{p}: {reader.GetDimension()}-D image; a segmentation is 3-D")
    keys = set(reader.GetMetaDataKeys())
    if "NRRD_space" not in keys:
        raise ValueError(f"{p}: NRRD without a 'space' field (no patient coordinates); Slicer "
                         "segmentations have 'space: left-posterior-superior'")
    try:
        text = {key: reader.GetMetaData(key) for key in keys if _SEGMENT_KEY.match(key)}
    except UnicodeDecodeError:
        raise ValueError(f"{p}: segment fields that are not UTF-8 text") from None

    import nrrd
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(str(p))
    except (OSError, ValueError, KeyError, IndexError, nrrd.NRRDError) as exc:
        raise ValueError(f"{p}: cannot read as a segmentation ({exc})") from None
    voxels = segmentation["voxels"]  # I x J x K, or 1 x I x J x K for a one-layer stack
    if voxels.ndim == 4:
        voxels = voxels[0]
    labelmap = _checked_labelmap(p, voxels.T)  # -> K x J x I
    try:
        geometry = Geometry.from_ijk_to_lps(segmentation["ijkToLPS"])
    except ValueError as exc:
        raise ValueError(f"{p}: invalid geometry ({exc})") from None

    # slicerio lists segments in the order of their N in SegmentN_*; so does this.
    indices = sorted({int(m.group(1)) for key in text if (m := _SEGMENT_KEY.match(key))})
    found = segmentation.get("segments", [])
    if len(indices) != len(found):
        raise ValueError(f"{p}: {len(found)} segments in slicerio's reading, {len(indices)} in ITK's")
    segments: list[SegmentInfo] = []
    for position, (index, segment) in enumerate(zip(indices, found, strict=True)):
        layer = segment.get("layer", position)
        if layer != 0:
            raise ValueError(f"{p}: segment {index} is in layer {layer} but the file has one layer")
        segment_id = text.get(f"Segment{index}_ID") or segment["id"]
        color = [0.5, 0.5, 0.5]  # Slicer's fallback
        for n, value in enumerate(segment.get("color", [])[:3]):
            color[n] = min(1.0, max(0.0, float(value)))
        try:
            segments.append(SegmentInfo(name=text.get(f"Segment{index}_Name") or segment_id, color=tuple(color),
                                        label_value=segment.get("labelValue", 1), segment_id=segment_id))
        except ValueError as exc:
            raise ValueError(f"{p}: segment {index}: {exc}") from None
    if not segments:
        segments = _segments_of_plain_labelmap(labelmap)
    return labelmap, geometry, segments


def _checked_labelmap(p: Path, array: np.ndarray) -> np.ndarray:
    try:
        labelmap = _as_label_array(array)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None
    labelmap = np.ascontiguousarray(labelmap)
    return labelmap if labelmap.flags.writeable else labelmap.copy()


def _segments_of_plain_labelmap(labelmap: np.ndarray) -> list[SegmentInfo]:
    values = np.flatnonzero(np.bincount(labelmap.ravel())).tolist() if labelmap.size else []
    return [SegmentInfo(name=f"Segment_{value}", color=_default_color(value), label_value=int(value),
                        segment_id=f"Segment_{value}")
            for value in values if value != 0]


def _default_color(value: int) -> tuple[float, float, float]:
    palette = [(0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82),
               (0.85, 0.4, 0.4), (0.57, 0.48, 0.78), (0.86, 0.63, 0.33), (0.3, 0.6, 0.3)]
    return palette[(value - 1) % len(palette)]
