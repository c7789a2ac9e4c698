"""SAM-Mix's classification loss: the binary focal loss (Lin et al.) on presence logits.

FL = -alpha_t (1 - p_t)^gamma log p_t, with p = sigmoid(logit), p_t = p for a slice that
holds the structure and 1 - p for one that does not, alpha_t = alpha and 1 - alpha
likewise. MONAI's ``FocalLoss`` in its sigmoid form computes exactly this (its scalar
``alpha`` weighs positives by alpha and negatives by 1 - alpha; alpha None: no weighting),
so it computes the per-slice terms, on B x 1 logits. The reduction is ours: MONAI's
"sum" first averages over the spatial dimensions, and with none (B x 1 input)
``mean(dim=[])`` averages over everything, so its "sum" would return the mean.
"""

from __future__ import annotations

import torch
from monai.losses import FocalLoss


def binary_focal_loss(logits: torch.Tensor, targets: torch.Tensor, *, alpha: float | None = 0.25,
                      gamma: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """logits: B (one per slice); targets: B, 1 = structure present, 0 = absent (floats
    in [0, 1] are accepted as soft labels). alpha: weight of the positives in [0, 1], or
    None for none (defaults: Lin et al.'s 0.25 and 2; the SAM-Mix paper names the loss,
    not its values). reduction: "mean", "sum" or "none" (then B values)."""
    if logits.shape != targets.shape or logits.dim() != 1:
        raise ValueError(f"logits and targets must both be B, got {tuple(logits.shape)} and {tuple(targets.shape)}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] or None, got {alpha}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    terms = FocalLoss(gamma=gamma, alpha=alpha, use_softmax=False, reduction="none")(
        logits[:, None], targets[:, None].to(logits.dtype))[:, 0]
    if reduction == "mean":
        return terms.mean()
    return terms.sum() if reduction == "sum" else terms
