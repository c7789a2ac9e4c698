"""Build the model a command or the service asks for, resolving default weights.

Shared by ``desam-server segment`` and the service: the encoder defaults to the
catalog's (MobileSAM, the embedded default); MobileSAM and LiteMedSAM weights come from
the weights cache (fetched on first use, never at import), other encoders from a
user-supplied checkpoint or, without one, random weights (tests and timing only).
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("desam_server")

__all__ = ["build_model"]


def build_model(encoder: str | None = None, sam_checkpoint: Path | None = None, decoder: Path | None = None,
                device: str = "auto"):
    """(DeSAM on its device, description dict)."""
    import torch

    from .engine import resolve_device
    from .modeling import build_desam
    from .weights import default_weights_name, fetch_weights, get_entry, resolve_sam_checkpoint

    encoder = encoder or get_entry(default_weights_name()).encoder
    if sam_checkpoint is None and encoder in ("mobile_sam", "lite_medsam"):
        path, sha = fetch_weights(encoder), get_entry(encoder).sha256
    else:
        path, sha = resolve_sam_checkpoint(encoder, sam_checkpoint)
    target = resolve_device(device)
    model = build_desam(encoder, sam_checkpoint=path, decoder_checkpoint=decoder, sam_checkpoint_sha256=sha)
    model.to(target)
    embedded_default = encoder == "mobile_sam" and sam_checkpoint is None
    weights = "random" if path is None else ("catalog" if sam_checkpoint is None else "user file")
    info = {"encoder": encoder, "weights": weights, "embedded_default": embedded_default,
            "threads": torch.get_num_threads() if target.type == "cpu" else None}
    if path is None:
        log.warning("encoder %s has no checkpoint: every weight is random and the masks are meaningless "
                    "(use this only for tests and timing)", encoder)
    if embedded_default:
        log.info("using the embedded default model MobileSAM (no SAM ViT-H checkpoint configured)")
    return model, info
