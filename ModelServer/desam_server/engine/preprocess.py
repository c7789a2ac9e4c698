"""Slice preprocessing: medical intensities -> 8-bit RGB -> encoder input.

One function chain serves inference and training: ``apply_window`` (intensity window to
uint8), ``to_rgb`` and ``prepare_input`` (resize longest side, normalise, pad; the
normalisation and input size come from the encoder's ``InputConvention``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.transforms import ResizeLongestSide

from ..modeling.desam import DeSAM

# Bump when anything below changes the pixels the encoder sees (part of cache keys).
PREPROCESSING_VERSION = 1


@dataclass(frozen=True)
class IntensityWindow:
    """A display window: intensities in [center - width/2, center + width/2] map
    linearly onto 0..255; outside values clip."""

    center: float
    width: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.center) and np.isfinite(self.width)) or self.width <= 0:
            raise ValueError(f"invalid intensity window center={self.center} width={self.width}")

    @property
    def low(self) -> float:
        return self.center - self.width / 2

    @classmethod
    def ct_soft_tissue(cls) -> IntensityWindow:
        """The CT default: W400 / L40 Hounsfield units."""
        return cls(center=40.0, width=400.0)

    @classmethod
    def from_percentiles(cls, volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> IntensityWindow:
        """MR default: clip to the volume's percentiles (computed over the whole volume
        so every slice uses the same mapping)."""
        data = np.asarray(volume)
        finite = data[np.isfinite(data)] if np.issubdtype(data.dtype, np.floating) else data
        if finite.size == 0:
            raise ValueError("cannot derive an intensity window from an empty or all-NaN volume")
        if finite.size > 4_000_000:  # a strided sample is plenty for percentiles
            finite = finite.reshape(-1)[:: finite.size // 4_000_000 + 1]
        lo, hi = np.percentile(finite, [low, high])
        if hi <= lo:
            hi = lo + 1.0
        return cls(center=float(lo + hi) / 2, width=float(hi - lo))

    @classmethod
    def default_for(cls, volume: np.ndarray, modality: str = "auto") -> IntensityWindow:
        """CT soft tissue for CT (``modality='CT'``, or 'auto' when the range looks like
        Hounsfield units); otherwise percentiles."""
        modality = modality.upper()
        if modality == "CT":
            return cls.ct_soft_tissue()
        if modality == "AUTO":
            lo = float(np.min(volume)) if np.asarray(volume).size else 0.0
            if np.issubdtype(np.asarray(volume).dtype, np.signedinteger) and -1100 <= lo <= -900:
                return cls.ct_soft_tissue()
        return cls.from_percentiles(volume)

    def to_json(self) -> dict:
        return {"center": self.center, "width": self.width}


def apply_window(image: np.ndarray, window: IntensityWindow) -> np.ndarray:
    """Any numeric H x W (or volume) -> uint8 via the window. NaN maps to 0."""
    data = np.asarray(image, dtype=np.float32)
    # Extreme windows (width 1e-300, center 1e300: valid, if odd) overflow float32 into
    # inf and 0 * inf; nan_to_num below maps those onto the window's meaning.
    with np.errstate(over="ignore", invalid="ignore"):
        scaled = (data - window.low) * (255.0 / window.width)
    scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def to_rgb(image: np.ndarray, window: IntensityWindow | None = None) -> np.ndarray:
    """A slice as SAM wants it: H x W x 3 uint8.

    H x W x 3 uint8 input passes through unchanged (the window is ignored); H x W numeric
    input is windowed (``window`` required unless it is already uint8) and repeated to
    three channels.
    """
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        if image.dtype != np.uint8:
            raise ValueError("an H x W x 3 image must be uint8; give H x W intensities with a window")
        return image
    if image.ndim != 2:
        raise ValueError(f"expected an H x W slice or H x W x 3 uint8 image, got shape {image.shape}")
    if min(image.shape) < 1:
        raise ValueError(f"empty slice of shape {image.shape}")
    if image.dtype == np.uint8 and window is None:
        gray = image
    else:
        if window is None:
            raise ValueError("an intensity window is required for non-uint8 slices")
        gray = apply_window(image, window)
    return np.repeat(gray[:, :, None], 3, axis=2)


def prepare_input(model: DeSAM, rgb: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
    """H x W x 3 uint8 -> (1 x 3 x S x S normalised padded tensor on the model's device,
    input_size (h, w) of the resized slice). Resizing is segment_anything's own
    ResizeLongestSide (bilinear on the 8-bit image), as SamPredictor does."""
    resized = ResizeLongestSide(model.img_size).apply_image(rgb)
    tensor = torch.as_tensor(resized, device=model.device).permute(2, 0, 1).contiguous()[None]
    return model.normalize_and_pad(tensor.float()), tuple(resized.shape[:2])


def to_input_frame(coords: np.ndarray, original_size: tuple[int, int], img_size: int) -> np.ndarray:
    """x, y pixel coordinates (... x 2) in the original slice -> the resized input frame."""
    h, w = original_size
    new_h, new_w = ResizeLongestSide.get_preprocess_shape(h, w, img_size)
    out = np.array(coords, dtype=np.float64, copy=True)
    out[..., 0] *= new_w / w
    out[..., 1] *= new_h / h
    return out
