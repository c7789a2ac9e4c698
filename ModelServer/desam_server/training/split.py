"""Train / validation split: by subject (a case's ``group``), never by slice.

Several groups: groups are shuffled with the seed and ``validation_fraction`` of them
(at least one, and at least one left for training) validate. One group (a single-volume
source, or variants of one anatomy): the axis is cut into ``slabs`` validation slabs far
apart, one per equal section of the axis at a seeded position, and training leaves out a
guard band of ``gap`` slices on each side of every slab, so that no training slice is
adjacent to a validation slice. ``Split.description`` says which was done; every report
carries it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..wire import AXES, axis_dimension
from .cases import Case, CaseError

__all__ = ["Portion", "Split", "split_cases"]


@dataclass(frozen=True)
class Portion:
    """Slices ``indices`` (along the split's axis) of case number ``case``."""

    case: int
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Split:
    kind: str                      # 'volume' or 'slab'
    axis: str
    train: tuple[Portion, ...]
    validation: tuple[Portion, ...]
    description: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "axis": self.axis, "description": self.description,
                "train_cases": len(self.train), "validation_cases": len(self.validation),
                "train_slices": sum(len(p.indices) for p in self.train),
                "validation_slices": sum(len(p.indices) for p in self.validation)}


def _ranges(indices: Sequence[int]) -> str:
    out, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)


def split_cases(cases: Sequence[Case], *, axis: str = "k", validation_fraction: float = 0.1, seed: int = 0,
                slabs: int = 2, gap: int | None = None) -> Split:
    """See the module docstring. ``gap`` defaults to the slab length (at least 2)."""
    if axis not in AXES:
        raise CaseError(f"unknown axis {axis!r}; use one of {', '.join(AXES)}")
    if not 0.0 < validation_fraction < 1.0:
        raise CaseError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    if not cases:
        raise CaseError("no training cases")
    dim = axis_dimension(axis)
    groups: list[str] = []
    for c in cases:
        if c.group not in groups:
            groups.append(c.group)
    rng = np.random.default_rng(seed)
    if len(groups) >= 2:
        order = [groups[i] for i in rng.permutation(len(groups))]
        n_val = min(len(groups) - 1, max(1, round(validation_fraction * len(groups))))
        val_groups = set(order[:n_val])
        train, val = [], []
        for n, c in enumerate(cases):
            portion = Portion(n, tuple(range(c.volume.shape[dim])))
            (val if c.group in val_groups else train).append(portion)
        description = (f"split by subject (seed {seed}): {len(groups) - n_val} training and {n_val} validation "
                       f"subject(s); {len(train)} training and {len(val)} validation volume(s)")
        return Split("volume", axis, tuple(train), tuple(val), description)

    counts = {c.volume.shape[dim] for c in cases}
    if len(counts) != 1:
        raise CaseError("cases of one group must have the same number of slices along the split axis")
    count = counts.pop()
    if slabs < 1:
        raise CaseError("slabs must be >= 1")
    length = max(1, round(validation_fraction * count / slabs))
    gap = max(2, length) if gap is None else int(gap)
    section = count // slabs
    if section < length + 2 * gap + 1:
        raise CaseError(f"a single-volume source of {count} slices along {axis} is too thin for {slabs} validation "
                        f"slab(s) of {length} slices with guard bands of {gap}: use fewer slabs or a smaller gap")
    val_idx: list[int] = []
    excluded: set[int] = set()
    for s in range(slabs):
        lo = s * section + gap
        hi = (s + 1) * section - gap - length
        start = int(rng.integers(lo, hi + 1))
        val_idx.extend(range(start, start + length))
        excluded.update(range(start - gap, start + length + gap))
    train_idx = tuple(i for i in range(count) if i not in excluded)
    train = tuple(Portion(n, train_idx) for n in range(len(cases)))
    val = tuple(Portion(n, tuple(val_idx)) for n in range(len(cases)))
    description = (f"single-volume source split into slabs along {axis} (seed {seed}): validation slices "
                   f"{_ranges(val_idx)}; training leaves out {gap} slice(s) on each side of each slab "
                   f"({len(train_idx)} training slices)")
    return Split("slab", axis, train, val, description)
