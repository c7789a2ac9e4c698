"""Synthetic T1 heads around the MNI152 template brain, so that brain training data hold
skull, scalp, muscle and fat: on the template alone "not black = brain" would be right.

Around the template's brain (same grid, same brain mask, untouched) a head is built from
layers at increasing distance from a smooth envelope of the brain (the brain mask
smoothed by a Gaussian of 4 mm and thresholded, i.e. the surface the inner skull table
follows, not the gyri): CSF, inner table (cortical bone: dark), diploe (fatty marrow:
brighter), outer table (dark), muscle (mid grey; much thicker towards the skull base,
like the temporalis and neck muscles), subcutaneous fat (bright) and skin (mid grey),
then air. Per variant (seeded) the thicknesses, their slow variation around the head,
the tissue intensities, the brain contrast (a gamma on the template), a multiplicative
bias field and Rician noise change. Intensities are relative to white matter = 1 (T1:
fat ~1, muscle ~0.45, CSF ~0.2, cortical bone ~0.05) and stored as int16 with white
matter at ``WHITE_MATTER`` (1000).

In the template, CSF over the brain and in sulci has the blurred grey of an average; here
every voxel mixes the template and the synthetic layers by the template's grey + white
matter probability p: value = p * template + (1 - p) * layers. So sulci and ventricles get
the variant's CSF, and the brain boundary keeps the template's partial volume.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..io import Volume
from .common import BrainSample, mr_window

__all__ = ["HeadParameters", "synthetic_head", "synthetic_heads", "WHITE_MATTER", "LAYERS"]

WHITE_MATTER = 1000.0
#: the layers outside the brain, inside out
LAYERS = ("csf", "inner_table", "diploe", "outer_table", "muscle", "fat", "skin")
_TEMPLATE_WM = 220.0  # median template intensity where the white-matter probability > 200/255


@dataclass(frozen=True)
class HeadParameters:
    """One variant: thicknesses in mm (mean over the head), intensities relative to white
    matter, the brain's gamma, the bias field's strength (log-amplitude), the noise
    (sigma relative to white matter) and how much thickness varies around the head."""

    thickness: dict[str, float]
    intensity: dict[str, float]
    muscle_extra_inferior: float
    thickness_variation: float
    brain_gamma: float
    bias: float
    noise: float

    @classmethod
    def sample(cls, rng: np.random.Generator) -> HeadParameters:
        u = rng.uniform
        return cls(
            thickness={"csf": u(1.5, 4.0), "inner_table": u(1.0, 2.0), "diploe": u(1.5, 4.0),
                       "outer_table": u(1.0, 2.0), "muscle": u(1.0, 3.0), "fat": u(2.0, 6.0), "skin": u(1.0, 2.0)},
            intensity={"csf": u(0.10, 0.35), "inner_table": u(0.02, 0.12), "diploe": u(0.45, 0.95),
                       "outer_table": u(0.02, 0.12), "muscle": u(0.35, 0.60), "fat": u(0.85, 1.25),
                       "skin": u(0.45, 0.80)},
            muscle_extra_inferior=u(8.0, 25.0),
            thickness_variation=u(0.1, 0.3),
            brain_gamma=u(0.8, 1.25),
            bias=u(0.05, 0.25),
            noise=u(0.01, 0.04),
        )


def _smooth(image: np.ndarray, sigma_mm: float, spacing) -> np.ndarray:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(image.astype(np.float32))
    img.SetSpacing(tuple(float(s) for s in spacing))
    return sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(img, float(sigma_mm)))


def _slow_field(rng: np.random.Generator, shape, wavelength: float, modes: int = 12) -> np.ndarray:
    """Smooth random field on a K x J x I voxel grid, zero mean and unit standard
    deviation: a sum of ``modes`` plane waves with random directions, phases and
    amplitudes and wavelengths between 1 and 2 x ``wavelength`` voxels, evaluated on a grid
    ``wavelength / 6`` coarser and interpolated linearly (fast: no full-size cosines)."""
    step = max(1.0, wavelength / 6.0)
    coarse_shape = tuple(int(np.ceil((n - 1) / step)) + 2 for n in shape)
    z, y, x = (np.arange(n, dtype=np.float32) * np.float32(step) for n in coarse_shape)
    field = np.zeros(coarse_shape, dtype=np.float32)
    for _ in range(modes):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        kz, ky, kx = (2 * np.pi / (wavelength * rng.uniform(1.0, 2.0))) * direction
        phase = rng.uniform(0, 2 * np.pi)
        field += np.float32(rng.standard_normal()) * np.cos(
            (kz * z)[:, None, None] + (ky * y)[None, :, None] + (kx * x + phase)[None, None, :])
    for axis, n in enumerate(shape):
        position = np.arange(n, dtype=np.float32) / np.float32(step)
        lower = np.floor(position).astype(np.intp)
        weight = (position - lower).reshape([-1 if a == axis else 1 for a in range(3)])
        field = np.take(field, lower, axis=axis) * (1 - weight) + np.take(field, lower + 1, axis=axis) * weight
    field -= field.mean()
    return field / (field.std() + 1e-12)


def _texture(rng: np.random.Generator, shape, spacing, sigma_mm: float = 2.0) -> np.ndarray:
    """Fine tissue texture: white noise smoothed by a Gaussian, unit standard deviation."""
    field = _smooth(rng.standard_normal(shape, dtype=np.float32), sigma_mm, spacing)
    return field / (field.std() + 1e-12)


def _distance_outside(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm from ``mask`` for voxels outside it (0 inside)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing))
    d = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(img, insideIsPositive=False, squaredDistance=False,
                                                            useImageSpacing=True))
    return np.maximum(d, 0.0)


def synthetic_head(template: BrainSample, tissue_probability: np.ndarray, seed: int) -> BrainSample:
    """One synthetic head around ``template``'s brain (see the module docstring).

    ``template``: the MNI152 sample (``fetch_mni152()``); ``tissue_probability``: its grey
    + white matter probability in 0..1 on the same grid (``tissue_probability()``);
    ``seed``: the variant (same seed, same head, bit for bit). The brain mask is the
    template's, unchanged."""
    t1 = template.volume.array.astype(np.float32)
    mask = template.brain_mask.astype(bool)
    p = np.clip(np.asarray(tissue_probability, dtype=np.float32), 0.0, 1.0)
    if t1.shape != mask.shape or p.shape != mask.shape:
        raise ValueError("the template, its brain mask and its tissue probability must share one grid")
    spacing = template.volume.geometry.spacing
    rng = np.random.default_rng(seed)
    params = HeadParameters.sample(rng)

    envelope = (_smooth(mask.astype(np.float32), 4.0, spacing) > 0.3) | mask
    distance = _distance_outside(envelope, spacing)
    scale = np.clip(1.0 + params.thickness_variation * _slow_field(rng, mask.shape, 60.0), 0.5, 1.6)
    # muscle thickens towards the skull base: 0 above the brain's middle, full at its bottom
    k = np.arange(mask.shape[0], dtype=np.float32)[:, None, None]
    rows = np.nonzero(mask.any(axis=(1, 2)))[0]
    middle, bottom = (rows[0] + rows[-1]) / 2.0, float(rows[0])
    inferior = np.clip((middle - k) / max(middle - bottom, 1.0), 0.0, 1.0)

    # layer index per voxel: how many layer edges lie closer to the brain than the voxel
    index = np.zeros(mask.shape, dtype=np.int8)
    edge = np.zeros(mask.shape, dtype=np.float32)
    for name in LAYERS:
        edge += np.float32(params.thickness[name]) * scale
        if name == "muscle":
            edge += np.float32(params.muscle_extra_inferior) * inferior * scale
        index += distance > edge
    values = np.array([params.intensity[name] for name in LAYERS] + [0.0], dtype=np.float32)  # last: air
    layers = values[index]
    layers *= 1.0 + 0.06 * _texture(rng, mask.shape, spacing)
    layers[envelope] = params.intensity["csf"]
    layers = _smooth(layers, 0.7, spacing)  # partial volume at the layer boundaries

    brain = np.clip(t1 / _TEMPLATE_WM, 0.0, 1.3) ** params.brain_gamma
    image = p * brain + (1.0 - p) * layers
    image *= np.exp(params.bias * _slow_field(rng, mask.shape, 150.0))
    sigma = np.float32(params.noise)
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imaginary = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    image = np.sqrt(real * real + imaginary * imaginary)  # Rician, as in a magnitude image
    array = np.clip(np.rint(image * WHITE_MATTER), 0, 32767).astype(np.int16)
    volume = Volume(array=array, geometry=template.volume.geometry)
    return BrainSample(
        name=f"mni152_head_{seed}", volume=volume, brain_mask=template.brain_mask, window=mr_window(array),
        mask_rule=template.mask_rule + " (the template's mask, unchanged)",
        source=f"synthetic head (seed {seed}) around the MNI152 brain: {template.source}", license=template.license)


def tissue_probability(template: BrainSample) -> np.ndarray:
    """Grey + white matter probability (0..1) of the MNI152 sample, from its cached maps."""
    from ..io import read_volume
    from .mni152 import FILES

    by_name = {p.name: p for p in template.files}
    try:
        gm = read_volume(by_name[FILES["gm"]]).array.astype(np.float32)
        wm = read_volume(by_name[FILES["wm"]]).array.astype(np.float32)
    except KeyError:
        raise ValueError("tissue_probability needs the sample returned by fetch_mni152") from None
    return np.clip((gm + wm) / 255.0, 0.0, 1.0)


def synthetic_heads(template: BrainSample, seeds) -> list[BrainSample]:
    """``synthetic_head`` for each seed (the tissue maps are read once)."""
    probability = tissue_probability(template)
    return [synthetic_head(template, probability, int(seed)) for seed in seeds]
