"""One prompted segmentation's answer, as ``ServerClient.segment_prompt`` returns it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PromptResult"]


@dataclass
class PromptResult:
    """masks: C x H x W bool (this slice only); ious: C; logits_ids: C (refine a mask by
    passing its id as ``logits_id`` in the next call on this slice); best: argmax IoU."""

    axis: str
    index: int
    masks: np.ndarray
    ious: np.ndarray
    areas: list[int]
    logits_ids: list[str | None]
    best: int
    decoder: str
    timing: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """The best mask, H x W bool."""
        return self.masks[self.best]
