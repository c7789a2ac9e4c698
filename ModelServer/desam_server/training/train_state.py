"""The resumable state of a run (``state.pt`` in the run's folder), written atomically
after every epoch: a process killed at any moment leaves the previous complete state."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes

__all__ = ["STATE_FORMAT", "save_state", "load_state", "TrainStateError"]

STATE_FORMAT = "desam-train-state/1"


class TrainStateError(ValueError):
    """A state file that is unreadable or belongs to another run."""


def save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"format": STATE_FORMAT, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise TrainStateError(f"{path.name}: unreadable training state ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainStateError(f"{path.name}: not a training state of format {STATE_FORMAT}")
    return state
