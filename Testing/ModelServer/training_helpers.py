"""Shared by the training tests: small phantom cases (an ellipsoid in noise, exact
labels), written to files when a test needs the command line, and a tiny SAM checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from desam_server.engine.preprocess import IntensityWindow
from desam_server.io import Geometry, Volume, write_volume
from desam_server.training.cases import case_from_arrays

WINDOW = IntensityWindow(150.0, 500.0)


def phantom(seed: int, shape=(8, 40, 48)) -> tuple[Volume, np.ndarray]:
    """An int16 volume with a bright ellipsoid (position and radii seeded) and its mask;
    the ellipsoid leaves the first and last slice empty."""
    r = np.random.default_rng(seed)
    k, j, i = np.mgrid[0:shape[0], 0:shape[1], 0:shape[2]]
    centre = np.array(shape) / 2 + np.array([0.0, *r.normal(0, 2, 2)])
    radii = np.array([shape[0] * 0.36, shape[1] * 0.25, shape[2] * 0.22]) * np.array([1.0, *r.uniform(0.8, 1.2, 2)])
    d = [(grid - c) / r_ for grid, c, r_ in zip((k, j, i), centre, radii, strict=True)]
    mask = d[0] ** 2 + d[1] ** 2 + d[2] ** 2 <= 1
    image = r.normal(0, 20, shape) + 300 * mask
    return Volume(image.astype(np.int16), Geometry.identity((1.0, 1.0, 2.0))), mask


def phantom_cases(n: int, *, structure: str = "blob", shape=(8, 40, 48)):
    return [case_from_arrays(*phantom(s, shape), None, structure=structure, window=WINDOW) for s in range(n)]


def write_phantom_files(directory: Path, n: int, shape=(8, 40, 48)) -> list[tuple[Path, Path]]:
    out = []
    for s in range(n):
        volume, mask = phantom(s, shape)
        v, m = directory / f"case{s}.nrrd", directory / f"case{s}_label.nrrd"
        write_volume(v, volume)
        write_volume(m, Volume(mask.astype(np.uint8), volume.geometry))
        out.append((v, m))
    return out


def tiny_checkpoint(path: Path) -> Path:
    """A seeded tiny SAM checkpoint (official layout) so that separate processes build the
    same frozen weights."""
    from conftest import make_sam_for

    torch.save(make_sam_for("tiny").state_dict(), path)
    return path
