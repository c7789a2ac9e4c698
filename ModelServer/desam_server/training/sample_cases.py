"""Training cases from the offline sample data (docs/DATA_SAMPLES.md), for ``make
decoders`` and the evidence scripts.

- ``head_cases``: the InVesalius Cranium CT and its head mask (threshold-derived, holder
  arc included): one volume, so the split is made of slabs.
- ``brain_cases``: synthetic T1 heads built around the MNI152 template's brain (skull,
  scalp, muscle and fat around it, seeded): one anatomy, so one group and a slab split;
  the skull-stripped template alone would teach "not black = brain".
- ``colin27_case``: the Colin27 T1 head (another person and scanner, real skull and scalp)
  with its semi-automatic brain mask: the brain decoder's cross-domain check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..engine.preprocess import IntensityWindow
from ..io import read_volume
from .cases import Case, case_from_arrays

__all__ = ["head_cases", "brain_cases", "colin27_case"]


def head_cases(cache_dir: Path | None = None) -> list[Case]:
    from ..samples import fetch_cranium

    sample = fetch_cranium(cache_dir)
    volume = read_volume(sample.volume)
    mask = read_volume(sample.head_mask)
    center, width = sample.window
    return [case_from_arrays(volume, np.asarray(mask.array) != 0, mask.geometry, structure="head",
                             window=IntensityWindow(center, width))]


def brain_cases(seeds=(0, 1, 2), cache_dir: Path | None = None) -> list[Case]:
    from ..brain_samples import fetch_mni152, synthetic_heads

    template = fetch_mni152(cache_dir)
    return [case_from_arrays(head.volume, head.brain_mask != 0, None, structure="brain",
                             window=head.intensity_window(), group="mni152")
            for head in synthetic_heads(template, seeds)]


def colin27_case(cache_dir: Path | None = None) -> Case:
    from ..brain_samples import fetch_colin27

    sample = fetch_colin27(cache_dir)
    return case_from_arrays(sample.volume, sample.brain_mask != 0, None, structure="brain",
                            window=sample.intensity_window())
