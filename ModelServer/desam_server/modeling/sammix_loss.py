"""SAM-Mix's multitask loss: the binary focal loss on every slice with a presence label
plus the Dice loss on the slices that have a segmentation.

L = focal_weight * FL(presence logits, presence labels) + dice_weight * Dice(mask logits,
masks), both terms means over their own slices (the B labelled slices, the N segmented
ones). The paper names the two losses and trains them jointly; it does not state weights,
so both default to 1. A batch without a segmented slice (N = 0) contributes the focal
term only; a batch without a labelled slice, the Dice term only.
"""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

from .focal_loss import binary_focal_loss


class SamMixLoss:
    """Keyword-only: focal_weight, dice_weight (1 and 1); alpha, gamma: the focal loss's
    (``binary_focal_loss``: 0.25 and 2).

    The Dice term is MONAI's ``DiceLoss(sigmoid=True)``: per slice 1 - (2 |p t| + 1e-5) /
    (|p| + |t| + 1e-5) with p = sigmoid(logits) over the L x L pixels, averaged over the N
    slices. A segmented slice must hold the structure (its box prompts SAM); segmented
    slices without it teach the classifier through their presence label 0.

    __call__(presence_logits B, presence B (1 present, 0 absent), mask_logits N x 1 x L x L,
    masks N x 1 x L x L (0/1, the logits' frame)) -> (total loss, {"focal": float,
    "dice": float, "total": float}); a term with no slice is 0 (and "nan" in the parts).
    """

    def __init__(self, *, focal_weight: float = 1.0, dice_weight: float = 1.0, alpha: float | None = 0.25,
                 gamma: float = 2.0) -> None:
        if focal_weight < 0 or dice_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got focal {focal_weight}, dice {dice_weight}")
        self.focal_weight = focal_weight
        self.dice_weight = dice_weight
        self.alpha = alpha
        self.gamma = gamma
        self.dice = DiceLoss(sigmoid=True, reduction="mean")

    def focal_term(self, presence_logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        return binary_focal_loss(presence_logits, presence, alpha=self.alpha, gamma=self.gamma)

    def dice_term(self, mask_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if mask_logits.shape != masks.shape or mask_logits.dim() != 4 or mask_logits.shape[1] != 1:
            raise ValueError(f"mask logits and masks must both be N x 1 x L x L, got {tuple(mask_logits.shape)} "
                             f"and {tuple(masks.shape)}")
        return self.dice(mask_logits.float(), masks.float())

    def __call__(self, presence_logits: torch.Tensor, presence: torch.Tensor, mask_logits: torch.Tensor,
                 masks: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        if presence_logits.numel() == 0 and mask_logits.numel() == 0:
            raise ValueError("a SAM-Mix batch needs at least one labelled or one segmented slice")
        total = presence_logits.new_zeros(())
        parts = {"focal": float("nan"), "dice": float("nan")}
        if presence_logits.numel():
            focal = self.focal_term(presence_logits, presence)
            total = total + self.focal_weight * focal
            parts["focal"] = float(focal.detach())
        if mask_logits.numel():
            dice = self.dice_term(mask_logits, masks)
            total = total + self.dice_weight * dice
            parts["dice"] = float(dice.detach())
        parts["total"] = float(total.detach())
        return total, parts
