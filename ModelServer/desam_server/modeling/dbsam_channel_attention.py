"""DB-SAM's channel attention block: the trainable adapter of the ViT branch.

DB-SAM (Qin et al., MICCAI 2024) places one after each frozen attention block of SAM's
image encoder:

    F_out = F + Conv1x1(SE(DWConv3x3(LN(F))))

LN: layer norm over channels; DWConv3x3: depth-wise 3 x 3 convolution; SE: squeeze and
excitation as Hu et al. (global average pooling, FC C -> C/r, ReLU, FC C/r -> C,
sigmoid, channel-wise scaling); Conv1x1: point-wise convolution back into the residual
stream. "Attention block" is a whole transformer block of the encoder (SAM's ``Block``:
attention + MLP; TinyViT's block: attention + local conv + MLP), as SAM's paper uses the
term. The adapter branch is regularised with stochastic depth (drop-path), rate 0.4 by
default (the rate issue 13 quotes for DB-SAM's adapters; see docs/DBSAM.md on sources).

Choices where the paper is silent (see docs/DBSAM.md): SE reduction r = 16 (Hu et al.'s
default); the last 1 x 1 convolution starts at zero, so a fresh adapter is the identity
and a DB-SAM model built on pretrained SAM weights starts from SAM's own features.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import stochastic_depth


class SqueezeExcitation(nn.Module):
    """Hu et al.'s squeeze-and-excitation on channels-first maps.

    forward(x: B x C x H x W) -> B x C x H x W: x scaled per channel by
    sigmoid(FC2(ReLU(FC1(mean over H, W)))), FC1: C -> C/r, FC2: C/r -> C (with bias).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squeezed = x.mean(dim=(2, 3))  # B x C
        scale = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * scale[:, :, None, None]


class ChannelAttentionBlock(nn.Module):
    """DB-SAM's channel attention block on SAM ViT's channels-last tokens.

    Keyword-only hyper-parameters:
      se_reduction: SE's reduction ratio r; drop_path: stochastic-depth rate of the adapter
        branch (per sample, training only); zero_init: start the last 1 x 1 convolution at
        zero (the block is then the identity until trained).

    forward(x: B x H x W x C, the output of a (frozen) attention block) -> B x H x W x C.
    In eval mode drop-path is off, so the output is deterministic.
    """

    def __init__(self, dim: int, *, se_reduction: int = 16, drop_path: float = 0.4,
                 zero_init: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {drop_path}")
        self.norm = nn.LayerNorm(dim)
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.se = SqueezeExcitation(dim, reduction=se_reduction)
        self.project = nn.Conv2d(dim, dim, kernel_size=1)
        self.drop_path = float(drop_path)
        if zero_init:
            nn.init.zeros_(self.project.weight)
            nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.norm(x).permute(0, 3, 1, 2)  # B x C x H x W
        branch = self.project(self.se(self.dwconv(branch))).permute(0, 2, 3, 1)
        branch = stochastic_depth(branch, self.drop_path, "row", self.training)
        return x + branch
