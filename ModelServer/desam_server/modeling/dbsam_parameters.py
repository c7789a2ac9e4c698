"""Where DB-SAM's blocks go in each encoder of the registry, and their trainable size.

``dbsam_layout(name)`` reads the encoder's dimensions from the registry's own builder,
instantiated on the ``meta`` device (no memory is allocated, so ViT-H costs nothing);
``dbsam_block_parameters(name)`` builds DB-SAM's blocks for that layout, also on ``meta``,
and counts their parameters.

Placement:
- SAM ViT (vit_b / vit_l / vit_h / tiny): a channel attention block after every block
  (each holds one attention layer); stages split at the global-attention blocks (ViT-B:
  blocks 0-2, 3-5, 6-8, 9-11), a bilateral cross-attention after each; shallow width =
  ViT width; heads = the ViT's heads.
- TinyViT (mobile_sam / lite_medsam): channel attention after every block of the three
  attention stages (2 x 128, 6 x 160, 2 x 320 for MobileSAM); a cross-attention after each
  attention stage, before its patch merging, at the stage's width and heads; shallow width =
  the last stage's width (320, the neck's input), with the last stage's heads.
The convolution branch and the fusion work at the shallow width on the embedding grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .build import get_spec
from .dbsam_channel_attention import ChannelAttentionBlock
from .dbsam_conv_branch import ConvBranch
from .dbsam_cross_attention import BilateralCrossAttention
from .dbsam_fusion import ViTConvFusion


@dataclass(frozen=True)
class StageLayout:
    """One stage of the ViT branch: its blocks (indices within the stage's encoder part),
    width and heads; a bilateral cross-attention follows its last block."""

    blocks: tuple[int, ...]
    dim: int
    heads: int


@dataclass(frozen=True)
class DBSAMLayout:
    encoder: str
    stages: tuple[StageLayout, ...]
    shallow_dim: int
    shallow_heads: int
    grid_size: int

    @property
    def adapter_dims(self) -> tuple[int, ...]:
        return tuple(stage.dim for stage in self.stages for _ in stage.blocks)


@dataclass(frozen=True)
class DBSAMParameterCounts:
    adapters: int
    conv_branch: int
    cross_attention: int
    fusion: int

    @property
    def total(self) -> int:
        return self.adapters + self.conv_branch + self.cross_attention + self.fusion


def dbsam_layout(name: str) -> DBSAMLayout:
    spec = get_spec(name)
    with torch.device("meta"):
        encoder = spec.make_encoder()
    if spec.family == "vit":
        dim = encoder.patch_embed.proj.out_channels
        heads = encoder.blocks[0].attn.num_heads
        global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
        if not global_blocks or global_blocks[-1] != len(encoder.blocks) - 1:
            raise ValueError(f"encoder {name}: the last block must be a global-attention block")
        stages, start = [], 0
        for end in global_blocks:
            stages.append(StageLayout(blocks=tuple(range(start, end + 1)), dim=dim, heads=heads))
            start = end + 1
        return DBSAMLayout(encoder=name, stages=tuple(stages), shallow_dim=dim, shallow_heads=heads,
                           grid_size=spec.embedding_size)
    if spec.family == "tiny_vit":
        stages = []
        for layer in encoder.layers[1:]:  # stage 0 is convolutional
            block = layer.blocks[0]
            stages.append(StageLayout(blocks=tuple(range(len(layer.blocks))), dim=block.attn.qkv.in_features,
                                      heads=block.attn.num_heads))
        return DBSAMLayout(encoder=name, stages=tuple(stages), shallow_dim=stages[-1].dim,
                           shallow_heads=stages[-1].heads, grid_size=spec.embedding_size)
    raise ValueError(f"no DB-SAM layout for encoder family {spec.family!r}")


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def dbsam_block_parameters(name: str) -> DBSAMParameterCounts:
    """Trainable parameters of DB-SAM's blocks (default hyper-parameters) for an encoder."""
    layout = dbsam_layout(name)
    with torch.device("meta"):
        adapters = sum(_count(ChannelAttentionBlock(dim)) for dim in layout.adapter_dims)
        conv = _count(ConvBranch(layout.shallow_dim, layout.grid_size))
        cross = sum(
            _count(BilateralCrossAttention(stage.dim, layout.shallow_dim, deep_heads=stage.heads,
                                           shallow_heads=layout.shallow_heads))
            for stage in layout.stages
        )
        fusion = _count(ViTConvFusion(layout.shallow_dim))
    return DBSAMParameterCounts(adapters=adapters, conv_branch=conv, cross_attention=cross, fusion=fusion)
