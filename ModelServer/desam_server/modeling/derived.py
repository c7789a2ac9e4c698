"""Values derived from weights and kept between calls: when to recompute them."""

from __future__ import annotations

from torch import Tensor

__all__ = ["still_valid", "versions"]


def versions(tensors: list[Tensor]) -> list[int | None]:
    """In-place version counters (optimizer steps, load_state_dict); inference tensors
    cannot change outside inference mode and have none."""
    return [None if w.is_inference() else w._version for w in tensors]


def still_valid(entry: tuple | None, sources: list[Tensor]) -> bool:
    """Whether a cached (sources, versions, value) entry was computed from exactly these
    tensors: the same objects (the entry holds them, so no address can be reused) at the
    same versions."""
    return (entry is not None and len(entry[0]) == len(sources) and entry[1] == versions(sources)
            and all(a is b for a, b in zip(entry[0], sources)))
