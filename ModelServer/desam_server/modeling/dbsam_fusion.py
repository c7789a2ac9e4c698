"""DB-SAM's ViT-Conv fusion: a per-channel gate between the two branches.

    A_d = FC_up(GELU(FC_down(GAP(F_d))))      A_s = the same, own weights, on F_s
    M   = sigmoid(A_d + A_s)                   (B x C, one gate per channel)
    out = F_d · M + F_s · (1 - M)

GAP: global average pooling over the token grid; FC_down: C -> C/r; FC_up: C/r -> C.
The output goes to SAM's neck. Reduction r = 16 here (Hu et al.'s default; see
docs/DBSAM.md).
"""

from __future__ import annotations

import torch
from torch import nn


class BranchChannelAttention(nn.Module):
    """Channel-attention logits of one branch: forward(x: B x H x W x C) -> B x C."""

    def __init__(self, dim: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(nn.functional.gelu(self.down(x.mean(dim=(1, 2)))))


class ViTConvFusion(nn.Module):
    """DB-SAM's ViT-Conv fusion block.

    Keyword-only: reduction (r of both channel-attention layers).

    forward(deep: B x H x W x C (ViT branch, channels-last), shallow: B x C x H x W
      (convolution branch, channels-first)) -> B x H x W x C, channels-last as SAM's
      blocks leave it (the neck takes it permuted to channels-first).
    gate(deep, shallow) -> M: B x C, the fusion weights of the deep branch.
    """

    def __init__(self, dim: int, *, reduction: int = 16) -> None:
        super().__init__()
        self.deep_attention = BranchChannelAttention(dim, reduction=reduction)
        self.shallow_attention = BranchChannelAttention(dim, reduction=reduction)

    def gate(self, deep: torch.Tensor, shallow_last: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.deep_attention(deep) + self.shallow_attention(shallow_last))

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        shallow_last = shallow.permute(0, 2, 3, 1)
        if shallow_last.shape != deep.shape:
            raise ValueError(f"fusion needs equal shapes: deep {tuple(deep.shape)}, "
                             f"shallow {tuple(shallow_last.shape)}")
        m = self.gate(deep, shallow_last)[:, None, None, :]
        return deep * m + shallow_last * (1.0 - m)
