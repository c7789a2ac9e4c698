"""SAM ViT image encoder that also returns DeSAM's intermediate feature taps.

DeSAM's PDMM reads the raw residual-stream outputs of the first three global-attention
blocks of SAM's ViT (ViT-H: blocks 7, 15, 23). ``TappedImageEncoderViT.forward`` runs
``segment_anything``'s own modules in the order ``ImageEncoderViT.forward`` does and keeps
those blocks' outputs on the way; the checkpoint layout is unchanged: its state dict is
exactly that of ``ImageEncoderViT``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from segment_anything.modeling import ImageEncoderViT


class TappedImageEncoderViT(ImageEncoderViT):
    """``ImageEncoderViT`` whose forward returns ``(embedding, taps)``.

    Arguments are those of ``ImageEncoderViT`` (keyword-only) plus ``tap_blocks``: the
    0-based indices of the blocks whose outputs are tapped, shallow to deep.

    forward(x: B x 3 x img_size x img_size, normalised and padded; between_steps: called
    before each block, a caller's chance to run other work or stop the pass by raising)
    returns
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

    def forward(self, x: torch.Tensor, between_steps: Callable[[], None] | None = None,  # type: ignore[override]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        taps = []
        for index, block in enumerate(self.blocks):
            if between_steps is not None:
                between_steps()
            x = block(x)
            if index in self.tap_blocks:
                taps.append(x.permute(0, 3, 1, 2))  # blocks work channels-last (B x H x W x C)
        return self.neck(x.permute(0, 3, 1, 2)), taps
