"""Mask post-processing for DeSAM's automatic modes: grid prompts, removal of small holes
and islands, largest component (connected components by SimpleITK, imported when first
needed, so that the prompted path runs where it is not installed)."""

from __future__ import annotations

import numpy as np


def grid_points(grid_size: int, height: int, width: int) -> np.ndarray:
    """n x n prompt points at ((i + 0.5) / n * width, (j + 0.5) / n * height): an
    (n*n) x 2 array of x, y in the slice's pixel frame, row-major (y outer)."""
    if grid_size < 1:
        raise ValueError("grid_size must be >= 1")
    steps = (np.arange(grid_size) + 0.5) / grid_size
    ys, xs = np.meshgrid(steps * height, steps * width, indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def _drop_small_components(mask: np.ndarray, min_area: int) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    labels = sitk.ConnectedComponent(image, True)  # 8-connectivity
    kept = sitk.RelabelComponent(labels, minimumObjectSize=int(min_area))
    return sitk.GetArrayFromImage(kept) > 0


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected foreground component of an H x W mask (empty stays empty)."""
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask
    labels = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    return sitk.GetArrayFromImage(labels) == 1


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Fill background regions (holes) and drop foreground islands smaller than
    ``min_area`` pixels. H x W bool -> H x W bool. ``min_area`` <= 0 changes nothing."""
    mask = np.asarray(mask, dtype=bool)
    if min_area <= 0 or not mask.any():
        return mask
    filled = ~_drop_small_components(~mask, min_area)
    if not filled.any():  # the whole slice was one small background region
        filled = mask
    return _drop_small_components(filled, min_area)
