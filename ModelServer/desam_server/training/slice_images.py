"""What an image family reads per slice: the slice itself (``family.SliceImage``).

The counterpart of ``features.FeatureReader`` for families whose trainable parts sit
inside the encoder (``input_kind == "image"``): nothing is precomputed or cached, a slice
is read from its case when a step or a validation pass needs it.
"""

from __future__ import annotations

import numpy as np
import torch

from ..io.slices import slice_view
from .cases import Case
from .family import ModelFamily, SliceImage
from .features import FeatureReader

__all__ = ["SliceImageReader", "SliceReader", "check_reader"]


class SliceImageReader:
    """``load`` has ``FeatureReader.load``'s signature, so that the trainer, validation and
    evaluation read either the same way; ``device`` is not used (the family moves the
    image when it prepares the encoder's input)."""

    def load(self, case: Case, axis: str, index: int, device: str | torch.device | None = None) -> SliceImage:
        del device
        return SliceImage(np.ascontiguousarray(slice_view(case.volume.array, axis, index)), case.window)


#: What the loop, validation and evaluation read slices through: cached features or the
#: slices themselves, by the family's ``input_kind``.
SliceReader = FeatureReader | SliceImageReader


def check_reader(family: ModelFamily, reader: SliceReader) -> None:
    """Refuse a reader that does not give what ``family`` reads."""
    wanted = {"features": FeatureReader, "image": SliceImageReader}.get(family.input_kind)
    if wanted is None:
        raise ValueError(f"family {family.name!r} has an unknown input kind {family.input_kind!r}")
    if not isinstance(reader, wanted):
        raise TypeError(f"the {family.name} family reads {family.input_kind}: it needs a {wanted.__name__}, "
                        f"not a {type(reader).__name__}")
