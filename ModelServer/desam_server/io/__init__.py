"""Volumes and segmentations on disk: NRRD, NIfTI, MetaImage, DICOM, Slicer .seg.nrrd."""

from .geometry import LPS_TO_RAS, Geometry, Volume
from .segmentation import SegmentInfo, read_segmentation, write_segmentation
from .volume import read_volume, write_labelmap_nifti, write_volume

__all__ = [
    "LPS_TO_RAS", "Geometry", "Volume", "SegmentInfo", "read_segmentation", "write_segmentation",
    "read_volume", "write_labelmap_nifti", "write_volume",
]
