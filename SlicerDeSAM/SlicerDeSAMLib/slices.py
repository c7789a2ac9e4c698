"""Slices and slabs of K x J x I arrays along the service's axes, and their VTK extents.

Standard library and numpy only. A slice along 'k' is J x I, along 'j' K x I, along 'i'
K x J (``wire.AXES``); a slab is N consecutive slices, N x H x W, slice n at index
``offset + n`` (the wire format's mask slab). VTK image data store voxels with i fastest,
then j, then k, so a block of a K x J x I array in C order is exactly the scalars of the
image with that block's extent.
"""

from __future__ import annotations

import numpy as np

from .wire import axis_dimension

__all__ = ["take_slice", "put_slice", "slice_extent", "slab_extent", "slab_to_block", "block_to_slab",
           "take_slab", "put_slab"]


def _check_index(shape, axis: str, index: int, count: int = 1) -> int:
    dim = axis_dimension(axis)
    index = int(index)
    if count < 1 or not 0 <= index or index + count > shape[dim]:
        last = index + count - 1
        raise ValueError(f"slices {index} .. {last} along axis {axis} are outside 0 .. {shape[dim] - 1}")
    return dim


def take_slice(array: np.ndarray, axis: str, index: int) -> np.ndarray:
    """Slice ``index`` along ``axis`` of a K x J x I array (a view): J x I, K x I or K x J."""
    dim = _check_index(array.shape, axis, index)
    view = [slice(None)] * 3
    view[dim] = int(index)
    return array[tuple(view)]


def put_slice(array: np.ndarray, axis: str, index: int, mask: np.ndarray) -> None:
    """Write ``mask`` (the slice's H x W) into slice ``index`` along ``axis`` of ``array``."""
    dim = _check_index(array.shape, axis, index)
    view = [slice(None)] * 3
    view[dim] = int(index)
    target = array[tuple(view)]
    if np.shape(mask) != target.shape:
        raise ValueError(f"a slice along axis {axis} of a {array.shape} array is {target.shape}, got "
                         f"{np.shape(mask)}")
    array[tuple(view)] = mask


def take_slab(array: np.ndarray, axis: str, offset: int, count: int) -> np.ndarray:
    """Slices ``offset`` .. ``offset + count - 1`` along ``axis``, as an N x H x W copy."""
    dim = _check_index(array.shape, axis, offset, count)
    view = [slice(None)] * 3
    view[dim] = slice(int(offset), int(offset) + count)
    return block_to_slab(array[tuple(view)], axis)


def put_slab(array: np.ndarray, axis: str, offset: int, slab: np.ndarray) -> None:
    """Write an N x H x W slab into ``array`` from slice ``offset`` along ``axis``."""
    slab = np.asarray(slab)
    if slab.ndim != 3:
        raise ValueError(f"a slab is N x H x W, got shape {slab.shape}")
    dim = _check_index(array.shape, axis, offset, slab.shape[0])
    view = [slice(None)] * 3
    view[dim] = slice(int(offset), int(offset) + slab.shape[0])
    target = array[tuple(view)]
    block = slab_to_block(slab, axis)
    if block.shape != target.shape:
        raise ValueError(f"a slab of {slab.shape[0]} slices along axis {axis} of a {array.shape} array is "
                         f"{block_to_slab(target, axis).shape}, got {slab.shape}")
    array[tuple(view)] = block


def slab_to_block(slab: np.ndarray, axis: str) -> np.ndarray:
    """An N x H x W slab along ``axis`` as the K x J x I-ordered block it covers (a view)."""
    dim = axis_dimension(axis)
    return np.moveaxis(np.asarray(slab), 0, dim)


def block_to_slab(block: np.ndarray, axis: str) -> np.ndarray:
    """The inverse of ``slab_to_block``: a K x J x I-ordered block as its N x H x W slab (a view)."""
    return np.moveaxis(np.asarray(block), axis_dimension(axis), 0)


def slice_extent(shape, axis: str, index: int) -> list[int]:
    """VTK extent ``[i0, i1, j0, j1, k0, k1]`` of slice ``index`` along ``axis`` of a
    K x J x I volume (inclusive bounds)."""
    return slab_extent(shape, axis, index, 1)


def slab_extent(shape, axis: str, offset: int, count: int) -> list[int]:
    """VTK extent of ``count`` slices from ``offset`` along ``axis`` of a K x J x I volume."""
    dim = _check_index(shape, axis, offset, count)
    k, j, i = (int(n) for n in shape)
    extent = [0, i - 1, 0, j - 1, 0, k - 1]
    pair = 2 * (2 - dim)              # dim 0 (k) -> extent[4:6], 1 (j) -> [2:4], 2 (i) -> [0:2]
    extent[pair], extent[pair + 1] = int(offset), int(offset) + count - 1
    return extent
