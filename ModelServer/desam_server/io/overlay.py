"""A PNG montage of slices with the segmentation drawn over them, for a quick visual check.

Each tile is one slice ``volume[k]`` (rows = j, columns = i, as stored), windowed to 8-bit
grey, with every label drawn as a semi-transparent colour plus an opaque contour, and the
slice index written in the corner. Tiles keep the slice's pixel aspect (no resampling to
physical spacing) and are letter-boxed into ``tile`` x ``tile`` squares.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_bytes

__all__ = ["write_overlay_montage", "choose_slices"]

#: Fill/contour colours (RGB 0-255) for label values 1, 2, ... (cycled).
LABEL_COLORS = [
    (120, 230, 90), (70, 200, 255), (255, 140, 50), (240, 80, 200),
    (255, 225, 60), (150, 120, 255), (255, 90, 90), (60, 220, 180),
]
FILL_ALPHA = 0.35
MAX_SLICES = 12


def choose_slices(labelmap: np.ndarray, n: int = MAX_SLICES) -> list[int]:
    """Up to ``n`` evenly spaced slice indices among the slices that hold foreground;
    evenly spaced over the whole stack when there is none."""
    depth = labelmap.shape[0]
    if depth == 0 or n <= 0:
        return []
    candidates = np.flatnonzero(labelmap.reshape(depth, -1).any(axis=1))
    if candidates.size == 0:
        candidates = np.arange(depth)
    if candidates.size <= n:
        return candidates.tolist()
    picks = np.round(np.linspace(0, candidates.size - 1, n)).astype(int)
    return sorted(set(candidates[picks].tolist()))


def _auto_window(volume: np.ndarray) -> tuple[float, float]:
    data = np.asarray(volume)
    step = max(1, data.size // 2_000_000)  # a sample is plenty for percentiles
    sample = data.reshape(-1)[::step].astype(np.float64)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if hi <= lo:
        hi = lo + 1.0
    return (lo + hi) / 2.0, hi - lo


def _to_gray(slice_2d: np.ndarray, center: float, width: float) -> np.ndarray:
    lo = center - width / 2.0
    scaled = (np.asarray(slice_2d, dtype=np.float64) - lo) / max(width, 1e-12)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0)
    return (np.clip(scaled, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return mask & ~interior


def _render_tile(gray: np.ndarray, labels: np.ndarray, tile: int, index: int):
    from PIL import Image, ImageDraw

    h, w = gray.shape
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR))
    lab = np.asarray(Image.fromarray(labels).resize(size, Image.Resampling.NEAREST))
    rgb = np.repeat(base[:, :, None], 3, axis=2).astype(np.float64)
    for value in np.unique(lab):
        if value == 0:
            continue
        color = np.asarray(LABEL_COLORS[(int(value) - 1) % len(LABEL_COLORS)], dtype=np.float64)
        mask = lab == value
        rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * color
        rgb[_boundary(mask)] = color
    canvas = Image.new("RGB", (tile, tile), (0, 0, 0))
    canvas.paste(Image.fromarray(rgb.round().astype(np.uint8)), ((tile - size[0]) // 2, (tile - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    text = f"k={index}"
    draw.rectangle((0, 0, 8 + 7 * len(text), 16), fill=(0, 0, 0))
    draw.text((4, 3), text, fill=(255, 255, 255))
    return canvas


def write_overlay_montage(path: str | os.PathLike, volume_array: np.ndarray, labelmap: np.ndarray, *,
                          slice_indices: Sequence[int] | None = None,
                          window: tuple[float, float] | None = None,
                          columns: int = 4, tile: int = 256) -> list[int]:
    """Write a PNG montage of slices ``volume_array[k]`` (K x J x I) with ``labelmap``
    (same shape) drawn over them; returns the slice indices drawn.

    ``slice_indices``: default up to 12 evenly spaced slices that contain foreground (else
    evenly spaced over the stack). ``window``: (center, width); default the volume's
    0.5-99.5 percentile range. The file is written atomically."""
    from PIL import Image

    volume = np.asarray(volume_array)
    labels = np.asarray(labelmap)
    if volume.ndim != 3 or labels.shape != volume.shape:
        raise ValueError(f"volume and labelmap must be 3-D arrays of one shape, got {volume.shape} and {labels.shape}")
    if columns < 1 or tile < 16:
        raise ValueError("columns must be >= 1 and tile >= 16 pixels")
    if labels.dtype == bool:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"the labelmap must hold integer labels, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        labels = np.where(labels > 0, (labels - 1) % 255 + 1, 0)
    labels = labels.astype(np.uint8, copy=False)

    if slice_indices is None:
        indices = choose_slices(labels)
    else:
        indices = [int(k) for k in slice_indices]
        bad = [k for k in indices if not 0 <= k < volume.shape[0]]
        if bad:
            raise ValueError(f"slice indices {bad} are outside 0..{volume.shape[0] - 1}")
    if not indices:
        raise ValueError("no slices to draw")
    if window is None:
        center, width = _auto_window(volume)
    else:
        center, width = float(window[0]), float(window[1])
        if not width > 0:
            raise ValueError(f"window width must be positive, got {width}")

    columns = min(columns, len(indices))
    rows = math.ceil(len(indices) / columns)
    montage = Image.new("RGB", (columns * tile, rows * tile), (0, 0, 0))
    for n, k in enumerate(indices):
        tile_image = _render_tile(_to_gray(volume[k], center, width), labels[k], tile, k)
        montage.paste(tile_image, ((n % columns) * tile, (n // columns) * tile))
    buffer = io.BytesIO()
    montage.save(buffer, format="PNG", optimize=False)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return indices
