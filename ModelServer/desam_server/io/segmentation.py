"""3D Slicer segmentations (.seg.nrrd): one shared labelmap layer plus the
``Segmentation_*`` / ``SegmentN_*`` key-value fields of Slicer's
``vtkMRMLSegmentationStorageNode``. Geometry conventions are those of ``volume.py``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .volume import (
    Geometry,
    _as_label_array,
    _check_scalar_3d,
    _file_reader,
    _itk_reason,
    _num,
    _volume_from_sitk,
    _write_nrrd,
)

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


# --------------------------------------------------------------------------- segmentations

# Field names and value formats of 3D Slicer's vtkMRMLSegmentationStorageNode (binary
# labelmap representation, one shared layer).
_MASTER_REPRESENTATION = "Binary labelmap"
_REFERENCE_GEOMETRY_PARAMETER = "Reference image geometry"
_REFERENCE_GEOMETRY_DESCRIPTION = (
    "Image geometry description string determining the geometry of the labelmap that is created in "
    "course of conversion. Can be copied from a volume, using the button.")


def _reference_image_geometry(geometry: Geometry, shape_kji: tuple[int, int, int]) -> str:
    """vtkSegmentationConverter::SerializeImageGeometry: the 16 elements of the IJK -> RAS
    matrix row by row, then the extent, each followed by ';'."""
    k, j, i = shape_kji
    values = [_num(v) for v in geometry.ijk_to_ras().ravel()]
    values += [str(v) for v in (0, i - 1, 0, j - 1, 0, k - 1)]
    return "".join(v + ";" for v in values)


def _color_text(color: Sequence[float]) -> str:
    return " ".join(_num(c) for c in color)


def write_segmentation(path: str | os.PathLike, labelmap: np.ndarray, geometry: Geometry,
                       segments: Sequence[SegmentInfo]) -> Path:
    """Write a 3D Slicer segmentation (.seg.nrrd): one shared labelmap layer (uint8,
    K x J x I, value ``label_value`` for each segment, 0 = background) with the
    ``Segmentation_*`` / ``SegmentN_*`` fields Slicer's segmentation storage node reads."""
    p = Path(path)
    lab = _as_label_array(labelmap)
    if lab.dtype != np.uint8:
        raise ValueError("a .seg.nrrd labelmap layer holds label values 0..255")
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

    if present:
        extent = []
        for axis in (2, 1, 0):  # i, j, k
            other = tuple(a for a in range(3) if a != axis)
            hit = np.flatnonzero(lab.any(axis=other))
            extent += [int(hit[0]), int(hit[-1])]
    else:
        extent = [0, -1, 0, -1, 0, -1]  # Slicer's "empty" extent
    extent_text = " ".join(str(v) for v in extent)

    fields: dict[str, str] = {
        "Segmentation_MasterRepresentation": _MASTER_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": _MASTER_REPRESENTATION + "|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": (
            f"{_REFERENCE_GEOMETRY_PARAMETER}|{_reference_image_geometry(geometry, lab.shape)}"
            f"|{_REFERENCE_GEOMETRY_DESCRIPTION}&"),
    }
    for index, (segment, segment_id) in enumerate(zip(segments, ids)):
        for text in (segment.name, segment_id):
            if "\n" in text or "\r" in text:
                raise ValueError(f"segment names and IDs must be one line, got {text!r}")
        prefix = f"Segment{index}_"
        fields.update({
            prefix + "ID": segment_id,
            prefix + "Name": segment.name,
            prefix + "Color": _color_text(segment.color),
            prefix + "ColorAutoGenerated": "0",
            prefix + "NameAutoGenerated": "0",
            prefix + "Extent": extent_text,
            prefix + "Layer": "0",
            prefix + "LabelValue": str(segment.label_value),
            prefix + "Tags": "",
        })
    # Slicer keeps these in a std::map, so its files list them in byte order.
    keyvalues = sorted(fields.items(), key=lambda kv: kv[0].encode())
    _write_nrrd(p, lab, geometry, keyvalues)
    return p


def read_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, Geometry, list[SegmentInfo]]:
    """Read a single-layer Slicer .seg.nrrd (or any labelmap NRRD / image): the K x J x I
    labelmap, its geometry and its segments. A plain labelmap without segment fields gets
    one segment per label value, named ``Segment_<value>`` as Slicer names them.
    Segmentations with overlapping segments (several layers) raise ValueError."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a folder, not a segmentation file")
    reader = _file_reader(p)
    meta = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    layers = reader.GetNumberOfComponents()
    if layers != 1:
        raise ValueError(f"{p}: segmentation with {layers} layers (overlapping segments); only "
                         "single-layer segmentations are supported")
    _check_scalar_3d(p, reader.GetDimension(), reader.GetSize(), 1, "")
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"{p}: cannot read the image data ({_itk_reason(exc)})") from None
    volume = _volume_from_sitk(image, p)
    try:
        labelmap = _as_label_array(volume.array)
    except ValueError as exc:
        raise ValueError(f"{p}: {exc}") from None

    segments: list[SegmentInfo] = []
    index = 0
    while f"Segment{index}_ID" in meta:
        prefix = f"Segment{index}_"
        layer = meta.get(prefix + "Layer", str(index)).strip() or str(index)
        if int(float(layer)) != 0:
            raise ValueError(f"{p}: segment {index} is in layer {layer} but the file has one layer")
        segment_id = meta[prefix + "ID"]
        color_text = meta.get(prefix + "Color") or meta.get(prefix + "DefaultColor") or ""
        color = [0.5, 0.5, 0.5]  # Slicer's fallback
        for n, token in enumerate(color_text.split()[:3]):
            try:
                color[n] = min(1.0, max(0.0, float(token)))
            except ValueError:
                break
        label_text = meta.get(prefix + "LabelValue", "1").strip() or "1"
        segments.append(SegmentInfo(name=meta.get(prefix + "Name") or segment_id, color=tuple(color),
                                    label_value=int(float(label_text)), segment_id=segment_id))
        index += 1
    if not segments:
        values = np.flatnonzero(np.bincount(labelmap.ravel())).tolist() if labelmap.size else []
        for value in (v for v in values if v != 0):
            segments.append(SegmentInfo(name=f"Segment_{value}", color=_default_color(value),
                                        label_value=int(value), segment_id=f"Segment_{value}"))
    return labelmap, volume.geometry, segments


def _default_color(value: int) -> tuple[float, float, float]:
    palette = [(0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82),
               (0.85, 0.4, 0.4), (0.57, 0.48, 0.78), (0.86, 0.63, 0.33), (0.3, 0.6, 0.3)]
    return palette[(value - 1) % len(palette)]
