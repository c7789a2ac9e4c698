"""Training cases from the service's own data: uploaded volumes and their label volumes.

A training request names its cases as ``{"volume_id", "structure"}`` pairs: a volume the
service holds and the name its label volume was stored under. ``cases_from_store`` turns
them into checked ``training.Case`` objects (the mask on the volume's grid and not
empty), each trained as the request's ``structure`` and encoded with the volume's
default window (the one clicks use). Where labels come from is the caller's: a
``LabelProvider`` called as ``labels(volume_id, label_structure)`` returns the bool
K x J x I mask, or raises ``LookupError`` (no such label: 404), ``ValueError`` (422) or a
``ServiceError`` of its own.

SAM-Mix cases (``family_cases``): each ref also names its ``segmented_slices`` (the
slices whose label trains SAM) and optionally its ``present_slices`` (default: the slices
where the label is not empty); the label is kept on the segmented slices only and
checked against the presence labels (``training.sammix_data.SamMixCase``). Other
families refuse both lists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..io import Geometry, Volume
from ..training.cases import Case, CaseError, case_from_arrays
from ..training.sammix_data import sammix_case_from_case
from .errors import NotFound, ServiceError, Unprocessable
from .volume_store import VolumeStore

__all__ = ["LabelProvider", "cases_from_store", "family_cases", "no_labels"]

#: The family whose cases carry per-slice lists.
SLICE_LISTS_FAMILY = "sammix"

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


def family_cases(cases: list[Case], refs: Sequence[dict], *, family: str, axis: str) -> list[Case]:
    """``cases`` (``cases_from_store``'s, in the order of ``refs``) as the family trains
    them: SAM-Mix cases from each ref's slice lists (422 for a missing list, an index
    outside the volume, or lists that contradict the label); the cases themselves for the
    other families, which refuse the lists (422)."""
    if family != SLICE_LISTS_FAMILY:
        for n, ref in enumerate(refs):
            for name in ("segmented_slices", "present_slices"):
                if ref.get(name) is not None:
                    raise Unprocessable(f"case {n}: {name} is for the {SLICE_LISTS_FAMILY} family (this run trains "
                                        f"{family})")
        return cases
    out = []
    for n, (case, ref) in enumerate(zip(cases, refs, strict=True)):
        what = f"case {n} (volume {ref['volume_id'][:12]}, label {ref['structure']!r})"
        segmented = ref.get("segmented_slices")
        if not segmented:
            raise Unprocessable(f"{what}: a {SLICE_LISTS_FAMILY} case needs segmented_slices: the slices (along "
                                f"{axis}) whose label trains SAM")
        try:
            out.append(sammix_case_from_case(case, axis=axis, segmented=segmented,
                                             present_slices=ref.get("present_slices")))
        except CaseError as exc:
            raise Unprocessable(f"{what}: {exc}") from None
    return out
