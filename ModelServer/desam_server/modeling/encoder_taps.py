"""SAM ViT image encoder that also returns DeSAM's intermediate feature taps.

DeSAM's PDMM reads the raw residual-stream outputs of the first three global-attention
blocks of SAM's ViT (ViT-H: blocks 7, 15, 23). They are captured with forward hooks on
`segment_anything`'s own blocks, so the encoder's code and checkpoint layout are unchanged:
the state dict of :class:`TappedImageEncoderViT` is exactly that of ``ImageEncoderViT``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from segment_anything.modeling import ImageEncoderViT


class TappedImageEncoderViT(ImageEncoderViT):
    """``ImageEncoderViT`` whose forward returns ``(embedding, taps)``.

    Arguments are those of ``ImageEncoderViT`` (keyword-only) plus ``tap_blocks``: the
    0-based indices of the blocks whose outputs are tapped, shallow to deep.

    forward(x: B x 3 x img_size x img_size, normalised and padded) returns
      embedding: B x out_chans x E x E (the neck output, E = img_size / patch_size)
      taps: list of B x embed_dim x E x E, channels-first, in ``tap_blocks`` order.
    """

    def __init__(self, *, tap_blocks: Sequence[int], **vit_kwargs) -> None:
        super().__init__(**vit_kwargs)
        depth = len(self.blocks)
        tap_blocks = tuple(int(i) for i in tap_blocks)
        if not tap_blocks or any(i < 0 or i >= depth for i in tap_blocks):
            raise ValueError(f"tap_blocks {tap_blocks} must index blocks 0..{depth - 1}")
        if list(tap_blocks) != sorted(set(tap_blocks)):
            raise ValueError(f"tap_blocks {tap_blocks} must be strictly increasing")
        self.tap_blocks = tap_blocks
        embed_dim = self.patch_embed.proj.out_channels
        grid = self.img_size // self.patch_embed.proj.kernel_size[0]
        self.tap_channels = tuple(embed_dim for _ in tap_blocks)
        self.tap_sizes = tuple(grid for _ in tap_blocks)
        self.embedding_size = grid
        self._captured: list[torch.Tensor] | None = None
        for index in tap_blocks:
            self.blocks[index].register_forward_hook(self._capture)

    def _capture(self, _module, _inputs, output: torch.Tensor) -> None:
        if self._captured is not None:
            # Blocks work channels-last (B x H x W x C); taps are channels-first.
            self._captured.append(output.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        self._captured = []
        try:
            embedding = super().forward(x)
            taps = self._captured
        finally:
            self._captured = None
        if len(taps) != len(self.tap_blocks):
            raise RuntimeError(f"expected {len(self.tap_blocks)} taps, captured {len(taps)}")
        return embedding, taps
