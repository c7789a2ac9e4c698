"""Training cases from the service's own data: uploaded volumes and their label volumes.

A training request names its cases as ``{"volume_id", "structure"}`` pairs: a volume the
service holds and the name its label volume was stored under. ``cases_from_store`` turns
them into checked ``training.Case`` objects (the mask on the volume's grid and not
empty), each trained as the request's ``structure`` and encoded with the volume's
default window (the one clicks use). Where labels come from is the caller's: a
``LabelProvider`` called as ``labels(volume_id, label_structure)`` returns the bool
K x J x I mask, or raises ``LookupError`` (no such label: 404), ``ValueError`` (422) or a
``ServiceError`` of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..io import Geometry, Volume
from ..training.cases import Case, CaseError, case_from_arrays
from .errors import NotFound, ServiceError, Unprocessable
from .volume_store import VolumeStore

__all__ = ["LabelProvider", "cases_from_store", "no_labels"]

LabelProvider = Callable[[str, str], np.ndarray]


def no_labels(volume_id: str, structure: str) -> np.ndarray:
    """The label provider of a service that stores no label volumes."""
    raise LookupError("this service stores no label volumes")


def cases_from_store(store: VolumeStore, refs: Sequence[dict], labels: LabelProvider, *,
                     structure: str) -> list[Case]:
    """``refs``: ``{"volume_id": ..., "structure": ...}`` per case. Unknown volume or
    label: NotFound; a label that does not fit its volume or is empty: Unprocessable
    (each message names the case by its position and the volume by its id's first 12
    hex digits)."""
    cases = []
    for n, ref in enumerate(refs):
        volume_id, label = ref["volume_id"], ref["structure"]
        what = f"case {n} (volume {volume_id[:12]}, label {label!r})"
        try:
            with store.use(volume_id) as stored:
                volume = Volume(stored.array, Geometry(stored.spacing, stored.origin, stored.direction))
                window = stored.default_window()
        except NotFound as exc:
            raise NotFound(f"case {n}: {exc.message}") from None
        try:
            mask = labels(volume_id, label)
        except ServiceError:
            raise
        except LookupError as exc:
            raise NotFound(f"{what}: the service has no such label volume ({exc}); upload it first") from None
        except ValueError as exc:
            raise Unprocessable(f"{what}: {exc}") from None
        try:
            cases.append(case_from_arrays(volume, np.asarray(mask), None, structure=structure, window=window,
                                          what="label"))
        except CaseError as exc:
            raise Unprocessable(f"{what}: {exc}") from None
    return cases
