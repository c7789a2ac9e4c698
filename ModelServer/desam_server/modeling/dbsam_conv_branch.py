"""DB-SAM's convolution branch: shallow, domain-specific features from the image itself.

DB-SAM resizes the input image and passes it through a light-weight block of two 3 x 3
and three 1 x 1 convolutions, batch norm + ReLU after the first four, the last one a plain
projection to the width the cross-attention works in.

Layout chosen here (DB-SAM's public code has this layout for its "resize to 256" level):

    resize to 4E x 4E (E: the ViT token grid side; 256 px for a 1024 px SAM input)
    conv 3x3 stride 2, 3 -> w1          BN ReLU    -> 2E x 2E
    conv 1x1,          w1 -> w1         BN ReLU
    conv 3x3 stride 2, w1 -> w2         BN ReLU    -> E x E
    conv 1x1,          w2 -> w2         BN ReLU
    conv 1x1,          w2 -> out (bias)            -> E x E

The two stride-2 convolutions take 4E to E, so the resize side is 4E; w1 = 256 and
w2 = 512 (the public code's widths).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(in_chans: int, out_chans: int, kernel_size: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_chans),
        nn.ReLU(inplace=True),
    )


class ConvBranch(nn.Module):
    """DB-SAM's light-weight convolution branch.

    Arguments: out_chans: width of the shallow features (the ViT branch's width);
    grid_size: side E of the ViT token grid the features must match.
    Keyword-only: in_chans (3), widths (w1, w2) = (256, 512).

    forward(image: B x in_chans x S x S, the encoder's normalised, padded input; any S)
      -> B x out_chans x E x E, channels-first.
    """

    def __init__(self, out_chans: int, grid_size: int, *, in_chans: int = 3,
                 widths: tuple[int, int] = (256, 512)) -> None:
        super().__init__()
        w1, w2 = widths
        self.grid_size = int(grid_size)
        self.resize_to = 4 * self.grid_size
        self.layers = nn.Sequential(
            _conv_bn_relu(in_chans, w1, 3, 2),
            _conv_bn_relu(w1, w1, 1, 1),
            _conv_bn_relu(w1, w2, 3, 2),
            _conv_bn_relu(w2, w2, 1, 1),
            nn.Conv2d(w2, out_chans, kernel_size=1),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        side = self.resize_to
        if image.shape[-2:] != (side, side):
            image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
        out = self.layers(image)
        if out.shape[-2:] != (self.grid_size, self.grid_size):
            raise RuntimeError(f"convolution branch gave {tuple(out.shape[-2:])}, expected the token grid")
        return out
