"""A SAM whose image encoder is adapted (DB-SAM's adapters, SAM-Mix's merged LoRA),
served through SAM's prompted decoder only.

``adapted_sam`` builds a ``DeSAM`` around the adapted encoder and the family's trained
mask decoder, sharing the base model's prompt encoder, PRIM and PDMM (which it never
uses), so that the engine's ``SlicePredictor`` (prompts, the fast path, mask input) and
the scheduler serve it unchanged. Its encoder returns the embedding only (no taps:
nothing reads them, and the cache keeps one tensor per slice instead of four), and it
carries an identity of its own (``encoder_name``, ``encoder_weights_sha256``), so that
its features are never mixed with the base encoder's in the cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..modeling.desam import DeSAM

__all__ = ["EmbeddingOnlyEncoder", "adapted_sam"]


class EmbeddingOnlyEncoder(nn.Module):
    """``encoder(x) -> B x 256 x E x E`` (or ``(embedding, taps)``) in the engine's encoder
    interface: ``forward(x, between_steps=None) -> (embedding, [])``. ``between_steps``
    is called before and after the pass (an encoder without steps of its own cannot be
    preempted inside one) and passed on when ``passes_steps`` (an encoder taking it)."""

    def __init__(self, encoder: nn.Module, *, passes_steps: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.passes_steps = passes_steps

    def forward(self, x: torch.Tensor, between_steps: Callable[[], None] | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if between_steps is not None:
            between_steps()
        out = self.encoder(x, between_steps=between_steps) if self.passes_steps else self.encoder(x)
        embedding = out[0] if isinstance(out, tuple) else out
        if between_steps is not None:
            between_steps()
        return embedding, []


def adapted_sam(base: DeSAM, *, image_encoder: nn.Module, mask_decoder: nn.Module, encoder_name: str,
                encoder_weights_sha256: str, passes_steps: bool = False) -> DeSAM:
    """The servable model: ``image_encoder`` (wrapped in ``EmbeddingOnlyEncoder``) and
    ``mask_decoder`` with ``base``'s prompt encoder, PRIM, PDMM and input convention; on
    ``base``'s device; its own parts in eval mode and frozen. ``encoder_name`` / ``encoder_weights_sha256``:
    the features' identity (the caller's: e.g. ``"mobile_sam+dbsam"`` and a hash over the
    base weights and the adaptation's), which must differ from ``base``'s."""
    if (encoder_name, encoder_weights_sha256) == (base.encoder_name, base.encoder_weights_sha256):
        raise ValueError("an adapted encoder needs an identity of its own: its features would be mixed with "
                         "the base encoder's")
    wrapped = EmbeddingOnlyEncoder(image_encoder, passes_steps=passes_steps)
    model = DeSAM(encoder_name=encoder_name, image_encoder=wrapped,
                  prompt_encoder=base.prompt_encoder, mask_decoder=mask_decoder, prim=base.prim, pdmm=base.pdmm,
                  convention=base.convention, tap_indices=base.tap_indices)
    model.encoder_weights_sha256 = encoder_weights_sha256
    for module in (wrapped, mask_decoder):  # the adaptation's own parts; the shared ones are the base's
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)
    model.training = False  # not model.eval(): that would reach the base's shared modules too
    return model.to(base.device)
