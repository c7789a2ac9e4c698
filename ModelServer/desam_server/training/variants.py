"""Augmentations that change the image, applied before encoding.

The encoder never runs in the training loop, so an augmentation that changes the pixels
the encoder sees (a mirror image, another intensity mapping) is a volume of its own:
encoded once, cached like any other (its voxels, or its window, give it its own feature
keys). Each one adds an encoder pass and a cache entry per training slice: with k of
them, precompute costs (1 + k) times the encoder passes and disk bytes of the training
slices (``precompute`` prints the count). Variants belong to their case's group, so they
stay on the training side of the split. Prompt sampling, the cheap augmentation, happens
per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..engine.preprocess import IntensityWindow
from ..io import Volume
from .cases import Case

__all__ = ["Variant", "AUGMENTATIONS", "apply_variant", "parse_augmentations"]


@dataclass(frozen=True)
class Variant:
    """flip_dimension: array dimension (0 k, 1 j, 2 i) mirrored in image and mask, or None;
    width_scale / center_shift: the window's width times ``width_scale``, its centre moved
    by ``center_shift`` x width (positive: darker image)."""

    name: str
    flip_dimension: int | None = None
    width_scale: float = 1.0
    center_shift: float = 0.0


AUGMENTATIONS: dict[str, Variant] = {v.name: v for v in (
    Variant("flip_lr", flip_dimension=2),
    Variant("wide_window", width_scale=1.3),
    Variant("narrow_window", width_scale=0.75),
    Variant("bright", center_shift=-0.1),
    Variant("dark", center_shift=0.1),
)}


def parse_augmentations(names) -> tuple[Variant, ...]:
    """Names (a sequence or comma-separated text; '' or 'none' for none) -> variants."""
    if isinstance(names, str):
        names = [] if names.strip().lower() in ("", "none") else [n.strip() for n in names.split(",")]
    out = []
    for name in names:
        if name not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {name!r}; known: {', '.join(AUGMENTATIONS)}")
        if AUGMENTATIONS[name] not in out:
            out.append(AUGMENTATIONS[name])
    return tuple(out)


def apply_variant(case: Case, variant: Variant) -> Case:
    """The case as ``variant`` changes it (same structure and group)."""
    array, mask = case.volume.array, case.mask
    if variant.flip_dimension is not None:
        array = np.ascontiguousarray(np.flip(array, variant.flip_dimension))
        mask = np.ascontiguousarray(np.flip(mask, variant.flip_dimension))
    w = case.window
    window = IntensityWindow(center=w.center + variant.center_shift * w.width, width=w.width * variant.width_scale)
    return Case(volume=Volume(array, case.volume.geometry), mask=mask, structure=case.structure, window=window,
                group=case.group)
