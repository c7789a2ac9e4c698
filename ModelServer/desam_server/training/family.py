"""What a model family plugs into the training machinery.

Datasets, the loop, jobs, versions and evaluation know nothing of one family's decoder:
a family says which modules train, how a batch of cached slice features becomes a loss,
how a slice is predicted without a prompt (validation, evaluation), and how its trained
part is saved. DeSAM's is ``desam_family.DeSAMFamily``; DB-SAM's adapters and SAM-Mix's
classifier-CAM prompts plug in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..modeling.desam import ImageFeatures

__all__ = ["TrainItem", "ModelFamily", "get_family", "FAMILIES"]


@dataclass
class TrainItem:
    """One training slice: its cached features (on the training device), its label
    (bool H x W, the slice's own frame) and whether the structure is present."""

    features: ImageFeatures
    mask: np.ndarray
    positive: bool


class ModelFamily(Protocol):
    name: str
    strategies: tuple[str, ...]

    def training_module(self, model: nn.Module, strategy: str) -> nn.Module:
        """A module registering exactly the parameters that train (frozen parts are not
        registered: DDP must not broadcast them); its forward is what ``loss`` calls.
        Also sets requires_grad on the model's parts for ``strategy``."""

    def loss(self, module: nn.Module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over ``items`` (a mean over samples, so that DDP's gradient average
        over equal local batches equals the global batch's) and its parts.
        generators: one per item, for its prompt."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. forget values derived from weights)."""

    def predict(self, model: nn.Module, features: ImageFeatures, strategy: str, options: dict[str, Any]) -> np.ndarray:
        """The family's prompt-free prediction of one slice: bool H x W."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, model: nn.Module, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        """Write the trained part in the engine's format (atomically); returns its metadata."""


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]()


def _desam():
    from .desam_family import DeSAMFamily

    return DeSAMFamily()


FAMILIES = {"desam": _desam}
