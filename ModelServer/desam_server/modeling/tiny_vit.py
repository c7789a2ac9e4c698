"""TinyViT image encoder of MobileSAM and LiteMedSAM, returning DeSAM's feature taps.

Its state dict has the layout of the published checkpoints' ``image_encoder.*`` entries
(``patch_embed``, ``layers.0..3``, ``neck``, and for MobileSAM the unused ImageNet head
``norm_head``/``head``), so they load with strict key checking.

Shapes for MobileSAM (1024 px input, 3x3 stride-2 stem):
  patch_embed -> 64 x 256 x 256; stage 0 (MBConv) + merging -> 128 x 128 x 128 (tap 0);
  stage 1 (attention, window 7) + merging -> 160 x 64 x 64 (tap 1);
  stage 2 (attention, window 14) + merging at stride 1 -> 320 x 64 x 64 (tap 2);
  stage 3 (attention, window 7) -> 320 x 64 x 64; neck -> 256 x 64 x 64.
LiteMedSAM takes 256 px with a pointwise stride-1 stem, giving the same grid sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from .tiny_vit_blocks import AttentionStage, ConvStage, PatchEmbed, PatchMerging, step


def _conv_out(size: int, stride: int) -> int:
    """Output side of a padded ('same') convolution with this stride."""
    return -(-size // stride)


class TinyViT(nn.Module):
    """TinyViT encoder with an SAM neck.

    Keyword-only hyper-parameters (defaults: TinyViT-5M as in MobileSAM):
      img_size: side of the square input; in_chans: input channels;
      embed_dims, depths, num_heads, window_sizes: per stage (stage 0 is convolutional
        and ignores its heads/window); mlp_ratio: hidden width of the attention stages'
        MLPs; mbconv_expand_ratio: expansion of stage 0's MBConv blocks;
      local_conv_size: kernel of the depthwise conv between attention and MLP;
      patch_embed_kernel: 3 -> two stride-2 convolutions (input / 4), 1 -> two pointwise
        stride-1 convolutions (input / 1);
      out_chans: channels of the neck output;
      with_classifier_head: also build the (unused) ImageNet head ``norm_head``/``head``
        that MobileSAM's checkpoint carries; num_classes: its width.

    Every stage but the last ends in patch merging to the next stage's width; merging
    halves the grid, except the merging into the last stage, which keeps it (for the
    5M/11M/21M configurations this is the reference rule "stride 1 when the output width
    is 320/448/576").

    Attributes: img_size; tap_channels / tap_sizes: width and spatial side of the three
    taps, shallow to deep; embedding_size: side of the neck output.

    forward(x: B x in_chans x img_size x img_size, between_steps=None) -> (embedding, taps);
      between_steps is called between the encoder's steps (every block, and the attention,
      local convolution and MLP within attention blocks): a caller's chance to run other
      work or to stop the pass by raising.
      embedding: B x out_chans x E x E (E = embedding_size);
      taps: [B x tap_channels[i] x tap_sizes[i] x tap_sizes[i] for i in 0, 1, 2], the
        outputs of stages 0, 1, 2 after their patch merging, channels-first.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        patch_embed_kernel: int = 3,
        out_chans: int = 256,
        with_classifier_head: bool = False,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        embed_dims, depths = tuple(embed_dims), tuple(depths)
        num_heads, window_sizes = tuple(num_heads), tuple(window_sizes)
        n = len(embed_dims)
        if n != 4 or not (len(depths) == len(num_heads) == len(window_sizes) == n):
            raise ValueError("embed_dims, depths, num_heads and window_sizes need 4 entries each")
        self.img_size = int(img_size)

        self.patch_embed = PatchEmbed(in_chans, embed_dims[0], patch_embed_kernel)
        side = _conv_out(_conv_out(self.img_size, self.patch_embed.stride), self.patch_embed.stride)

        sides = []
        self.layers = nn.ModuleList()
        for i in range(n):
            downsample = None
            if i < n - 1:
                stride = 1 if i == n - 2 else 2
                downsample = PatchMerging(embed_dims[i], embed_dims[i + 1], stride)
                next_side = _conv_out(side, stride)
            else:
                next_side = side
            if i == 0:
                stage: nn.Module = ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, downsample)
            else:
                stage = AttentionStage(embed_dims[i], depths[i], num_heads[i], window_sizes[i],
                                       mlp_ratio, local_conv_size, downsample)
            self.layers.append(stage)
            side = next_side
            sides.append(side)

        self.tap_channels = tuple(int(c) for c in embed_dims[1:])
        self.tap_sizes = tuple(sides[:3])
        self.embedding_size = side

        if with_classifier_head:
            self.norm_head = nn.LayerNorm(embed_dims[-1])
            self.head = nn.Linear(embed_dims[-1], num_classes)

        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, between_steps: Callable[[], None] | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: B x in_chans x img_size x img_size -> (B x out_chans x E x E, three taps)."""
        if x.dim() != 4 or x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"expected B x C x {self.img_size} x {self.img_size} input, got {tuple(x.shape)}")
        x = self.patch_embed(x)
        taps = []
        for i, stage in enumerate(self.layers):
            x = stage(x, between_steps)
            if i < 3:
                taps.append(x)
        step(between_steps)
        return self.neck(x), taps


def mobile_sam_encoder() -> TinyViT:
    """MobileSAM's encoder: 1024 px input, 3x3 stride-2 stem, with the unused ImageNet head
    (its checkpoint carries it)."""
    return TinyViT(img_size=1024, patch_embed_kernel=3, with_classifier_head=True)


def lite_medsam_encoder() -> TinyViT:
    """LiteMedSAM's encoder: 256 px input, pointwise stride-1 stem, no classifier head."""
    return TinyViT(img_size=256, patch_embed_kernel=1, with_classifier_head=False)
