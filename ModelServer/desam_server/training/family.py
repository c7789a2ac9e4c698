"""What a model family plugs into the training machinery.

Datasets, the loop, jobs, versions and evaluation know nothing of one family's decoder:
a family says which modules train, how a batch of cached slice features becomes a loss,
how a slice is predicted without a prompt (validation, evaluation), and how its trained
part is saved. DeSAM's is ``desam_family.DeSAMFamily``; DB-SAM's adapters and SAM-Mix's
classifier-CAM prompts plug in the same way.

What a family reads per slice is its ``input_kind``:

- ``"features"``: the frozen encoder's cached features (``ImageFeatures``, from the
  training feature cache; precomputed once, the encoder never runs in the loop). DeSAM,
  SAM's decoder and the ablation.
- ``"image"``: the slice itself (``SliceImage``: the raw slice and its intensity window),
  for families whose trainable parts sit inside the encoder (adapters, LoRA): every step
  runs the encoder forward and backward, nothing is precomputed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from ..engine.preprocess import IntensityWindow
from ..modeling.desam import ImageFeatures

__all__ = ["TrainItem", "SliceImage", "ModelFamily", "INPUT_KINDS", "get_family", "FAMILIES"]

#: What a family reads per slice (see the module note).
INPUT_KINDS = ("features", "image")


@dataclass(frozen=True)
class SliceImage:
    """One slice as an image family reads it: the raw slice (H x W, the volume's values,
    the slice's own frame) and the case's intensity window."""

    image: np.ndarray
    window: IntensityWindow


@dataclass
class TrainItem:
    """One training slice: what the family reads (``features``: its cached features on the
    training device, for ``input_kind == "features"``; ``image``: the slice, for
    ``"image"``; the other one is None), its label (bool H x W, the slice's own frame),
    whether the structure is present and whether the slice is segmented (False: a slice
    with a presence label only, SAM-Mix's; its ``mask`` is then not a label)."""

    features: ImageFeatures | None
    mask: np.ndarray
    positive: bool
    image: SliceImage | None = None
    segmented: bool = True


class ModelFamily(Protocol):
    name: str
    strategies: tuple[str, ...]
    #: "features" or "image" (``INPUT_KINDS``): what ``loss`` and ``predict`` read
    input_kind: str

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model this family trains and predicts with, made from a freshly built DeSAM
        (``run_training`` calls it first and trains what it returns: ``TrainResult.model``).
        DeSAM's and SAM's decoder families return ``model`` itself; the ablation returns a
        variant sharing its frozen parts."""

    def training_module(self, model: nn.Module, strategy: str) -> nn.Module:
        """A module registering exactly the parameters that train (frozen parts are not
        registered: DDP must not broadcast them); its forward is what ``loss`` calls.
        Also sets requires_grad on the model's parts for ``strategy``."""

    def loss(self, module: nn.Module, items: Sequence[TrainItem], strategy: str,
             generators: Sequence[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over ``items`` (a mean over samples, so that DDP's gradient average
        over equal local batches equals the global batch's) and its parts.
        generators: one per item, for its prompt."""

    def optimizer(self, parameters: list[nn.Parameter], learning_rate: float) -> torch.optim.Optimizer:
        """The optimizer over the trainable parameters (the learning rate follows the
        run's polynomial schedule). DeSAM's: Adam without weight decay (spec item 20)."""

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step (e.g. forget values derived from weights)."""

    def predict(self, model: nn.Module, source: ImageFeatures | SliceImage, strategy: str,
                options: dict[str, Any]) -> np.ndarray:
        """The family's prompt-free prediction of one slice: bool H x W. ``source`` is what
        the family reads (its ``input_kind``): the slice's features or the slice."""

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]: ...

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, model: nn.Module, path: Path, *, structure: str, training: dict[str, Any]) -> dict[str, Any]:
        """Write the trained part in the family's file format (atomically); returns its
        metadata. Only DeSAM's format (``desam-decoder``) is served by the service."""

    def load(self, model: nn.Module, path: Path) -> dict[str, Any]:
        """Load a file written by ``save`` into a model from ``prepare_model``; returns its
        metadata (a file of another family is refused: ``CheckpointError``)."""

    # Optional: ``prepare_data(cases, options) -> TrainingData``. A family whose data is not
    # "one label per case" builds its own (``run_training`` calls it instead of
    # ``run.prepare_data``): SAM-Mix's presence labels plus a few segmented slices.


def get_family(name: str, options: dict[str, Any] | None = None) -> ModelFamily:
    """The family ``name`` with its ``options`` (``TrainConfig.family_options``; a family
    without options refuses any)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name](**(options or {}))


def _no_options(name: str, options: dict[str, Any]) -> None:
    if options:
        raise ValueError(f"the {name} family takes no options, got {option_names(options)}")


def option_names(names: Iterable[str], most: int = 8) -> str:
    """Option names for an error message: quoted, each cut to 40 characters, at most
    ``most`` of them (they come from a request)."""
    names = sorted(names)
    shown = ", ".join(repr(name[:40]) for name in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _desam(**options):
    from .desam_family import DeSAMFamily

    _no_options("desam", options)
    return DeSAMFamily()


def _sam_decoder(**options):
    from .sam_decoder_family import SAMDecoderFamily

    _no_options("sam_decoder", options)
    return SAMDecoderFamily()


def _desam_no_fusion(**options):
    from .desam_family import NoFusionFamily

    _no_options("desam_no_fusion", options)
    return NoFusionFamily()


def _dbsam(**options):
    from .dbsam_family import DBSAMFamily

    _no_options("dbsam", options)
    return DBSAMFamily()


def _dbsam_no_fusion(**options):
    from .dbsam_family import DBSAMNoFusionFamily

    _no_options("dbsam_no_fusion", options)
    return DBSAMNoFusionFamily()


def _dbsam_adapters(**options):
    from .dbsam_family import DBSAMAdaptersFamily

    _no_options("dbsam_adapters", options)
    return DBSAMAdaptersFamily()


def _dbsam_decoder_only(**options):
    from .dbsam_decoder_family import DBSAMDecoderOnlyFamily

    _no_options("dbsam_decoder_only", options)
    return DBSAMDecoderOnlyFamily()


def _sammix(**options):
    from .sammix_family import SamMixFamily

    return SamMixFamily(**options)


#: desam: DeSAM (PRIM + PDMM; the service's decoders). The evidence's comparisons
#: (scripts/evidence_training.py), trained through the same machinery but not served:
#: sam_decoder (SAM's own mask decoder fine-tuned, grid strategy) and desam_no_fusion
#: (PDMM without PRIM's mask-embedding fusion, grid strategy).
#: dbsam: DB-SAM (docs/DBSAM.md; an image family, its files served by
#: engine.dbsam_serving), and its ablation's rows: dbsam_decoder_only (SAM's mask decoder on
#: cached features), dbsam_adapters, dbsam_no_fusion.
#: sammix: SAM-Mix (slice classifier + CAM boxes + LoRA SAM, an image family with its own
#: data: sammix_family.py; its files served by engine.sammix_serving).
FAMILIES = {"desam": _desam, "sam_decoder": _sam_decoder, "desam_no_fusion": _desam_no_fusion,
            "dbsam": _dbsam, "dbsam_decoder_only": _dbsam_decoder_only, "dbsam_adapters": _dbsam_adapters,
            "dbsam_no_fusion": _dbsam_no_fusion, "sammix": _sammix}
