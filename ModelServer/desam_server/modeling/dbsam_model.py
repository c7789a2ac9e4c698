"""A DB-SAM model: DB-SAM's encoder and its own copy of SAM's mask decoder beside a base
DeSAM, in the form the engine serves (``SlicePredictor``'s prompted path) and the
training family trains.

``build_dbsam_model(base)`` makes a ``DBSAM``, a ``DeSAM`` whose parts are:

- ``image_encoder``: ``DBSAMImageEncoder``, the DB-SAM encoder (``DBSAMEncoder``) around
  the base's frozen image encoder (shared, not copied), answering DeSAM's
  ``encode`` call: ``(embedding, [])`` (DB-SAM feeds SAM's mask decoder only: no taps);
- ``prompt_encoder``: the base's (shared, frozen);
- ``mask_decoder``: a copy of the base's SAM mask decoder (it trains; the base's never
  changes);
- no PRIM or PDMM (``prim`` and ``pdmm`` are None, ``decoder_modules()`` is empty):
  DB-SAM has no DeSAM decoder, ``has_trained_decoder`` stays False and
  ``SlicePredictor``'s DeSAM modes refuse it; its prompt-free use is box-prompted
  (the whole slice, a neighbour's box, a user's ROI).

Identity, for feature caches: ``encoder_name`` is the base's name + ``"+dbsam"`` (+ the
parts for an ablation, e.g. ``"mobile_sam+dbsam[adapters]"``); ``encoder_weights_sha256``
is a sha256 over the base's SAM checkpoint hash and the DB-SAM blocks' weights
(``dbsam_weights_sha256``), recomputed when the weights change (per weights generation:
``weights_changed()`` after an optimizer step, ``to()``, loading), so that features of
the base encoder and of two differently trained DB-SAM models never share a key. The
base's checkpoint hash stays in ``base_encoder_weights_sha256`` (what files are checked
against). The mask decoder is not part of the identity: features do not depend on it.

The new blocks are initialised from a fixed seed (``init_seed``, the global random state
is left as it was), so that a model prepared twice from the same base is the same: a
resumed training run finds the identity it started with.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .dbsam_checkpoint import build_dbsam_encoder, dbsam_state_dict, dbsam_weights_sha256
from .dbsam_encoder import TRAINABLE_PARTS, DBSAMEncoder
from .desam import DeSAM

__all__ = ["DBSAM", "DBSAMImageEncoder", "build_dbsam_model", "dbsam_encoder_name"]

#: ViT encoders train with activation checkpointing per stage by default (docs/DBSAM.md:
#: a quarter of the activation memory on ViT-B for about the same time); TinyViT without
#: (half the memory for up to 40 % more time, and its memory is small anyway).
CHECKPOINTED_FAMILIES = ("vit",)


def dbsam_encoder_name(base_name: str, parts: tuple[str, ...]) -> str:
    """``mobile_sam+dbsam`` for the full model, ``mobile_sam+dbsam[adapters]`` for an
    ablation."""
    suffix = "" if tuple(parts) == TRAINABLE_PARTS else "[" + ",".join(parts) + "]"
    return f"{base_name}+dbsam{suffix}"


class DBSAMImageEncoder(nn.Module):
    """``DBSAMEncoder`` answering DeSAM's encoder call: ``forward(x, between_steps=None)
    -> (embedding B x 256 x E x E, [])``; no taps (``tap_channels`` and ``tap_sizes``
    empty)."""

    tap_channels: tuple[int, ...] = ()
    tap_sizes: tuple[int, ...] = ()

    def __init__(self, dbsam: DBSAMEncoder) -> None:
        super().__init__()
        self.dbsam = dbsam
        self.embedding_size = dbsam.layout.grid_size

    def forward(self, x: torch.Tensor, between_steps: Callable[[], None] | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return self.dbsam(x, between_steps=between_steps), []


class DBSAM(DeSAM):
    """See the module docstring. Build it with ``build_dbsam_model``."""

    def __init__(self, base: DeSAM, encoder: DBSAMEncoder) -> None:
        if encoder.image_encoder is not base.image_encoder:
            raise ValueError("the DB-SAM encoder must wrap the base model's own image encoder")
        super().__init__(encoder_name=dbsam_encoder_name(base.encoder_name, encoder.parts),
                         image_encoder=DBSAMImageEncoder(encoder), prompt_encoder=base.prompt_encoder,
                         mask_decoder=copy.deepcopy(base.mask_decoder), prim=None, pdmm=None,
                         convention=base.convention, tap_indices=())
        self.base_encoder_name = base.encoder_name
        self.base_encoder_weights_sha256 = base.encoder_weights_sha256
        self._identity: tuple[int, str] | None = None

    # ---- parts ---------------------------------------------------------------------------
    @property
    def dbsam(self) -> DBSAMEncoder:
        return self.image_encoder.dbsam

    @property
    def parts(self) -> tuple[str, ...]:
        return self.dbsam.parts

    def decoder_modules(self) -> dict[str, nn.Module]:
        """DB-SAM has no DeSAM decoder (PRIM + PDMM)."""
        return {}

    def trainable_modules(self) -> dict[str, nn.Module]:
        """What trains, by the model file's key prefixes: ``encoder.<part>`` and
        ``mask_decoder``."""
        out = {f"encoder.{name}": module for name, module in self.dbsam.trainable_modules().items()}
        out["mask_decoder"] = self.mask_decoder
        return out

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.trainable_modules().values() for p in module.parameters()]

    def train(self, mode: bool = True) -> DBSAM:
        """Set DB-SAM's own parts to ``mode``; the parts shared with the base (its image
        encoder, through ``DBSAMEncoder.train``, and the prompt encoder) stay in eval mode."""
        super().train(mode)
        self.prompt_encoder.eval()
        return self

    def freeze_frozen_parts(self) -> None:
        """The base's image encoder (already frozen: ``DBSAMEncoder`` refuses it otherwise)
        and the prompt encoder never train."""
        for p in self.prompt_encoder.parameters():
            p.requires_grad_(False)

    # ---- identity ------------------------------------------------------------------------
    @property
    def encoder_weights_sha256(self) -> str:
        """sha256 over the base's SAM checkpoint hash and the DB-SAM blocks' current
        weights (see the module docstring); computed once per weights generation."""
        identity = self._identity
        if identity is None or identity[0] != self.generation:
            digest = hashlib.sha256()
            digest.update(f"dbsam-features|{self.encoder_name}|{self.base_encoder_weights_sha256 or 'random'}|"
                          .encode())
            digest.update(dbsam_weights_sha256(dbsam_state_dict(self.dbsam)).encode())
            identity = (self.generation, digest.hexdigest())
            self._identity = identity
        return identity[1]

    @encoder_weights_sha256.setter
    def encoder_weights_sha256(self, value: str | None) -> None:
        # DeSAM's constructor starts the attribute at None; anything else would be a second,
        # contradicting source of the identity.
        if value is not None:
            raise AttributeError("a DB-SAM model's encoder identity derives from its weights; the base's "
                                 "checkpoint hash is base_encoder_weights_sha256")


def build_dbsam_model(base: DeSAM, *, with_branch: bool = True, with_fusion: bool = True,
                      checkpoint_stages: bool | None = None, init_seed: int = 0, **hyper_parameters: Any) -> DBSAM:
    """A ``DBSAM`` beside ``base`` (which is not changed), on its device, in eval mode,
    with the base's frozen parts shared and its SAM mask decoder copied.
    with_branch / with_fusion: the ablations (``DBSAMEncoder``); checkpoint_stages: None
    chooses by encoder family (``CHECKPOINTED_FAMILIES``); init_seed: the new blocks'
    initialisation; hyper_parameters: ``DBSAMEncoder``'s (drop-path, reductions, ...)."""
    if isinstance(base, DBSAM):
        raise TypeError("build a DB-SAM model from a DeSAM base model, not from another DB-SAM model")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        encoder = build_dbsam_encoder(base, with_branch=with_branch, with_fusion=with_fusion,
                                      checkpoint_stages=False, **hyper_parameters)
    if checkpoint_stages is None:
        checkpoint_stages = encoder.family in CHECKPOINTED_FAMILIES
    encoder.checkpoint_stages = bool(checkpoint_stages)
    model = DBSAM(base, encoder).to(base.device)
    model.freeze_frozen_parts()
    return model.eval()
