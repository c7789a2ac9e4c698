"""DB-SAM's image encoder: a frozen SAM encoder with DB-SAM's trainable blocks around it.

Data flow (SAM ViT; B images, E x E token grid, C the ViT width, 256 the neck width):

    x: B x 3 x S x S (normalised, padded, as SAM's encoder takes it)
    shallow = ConvBranch(x)                      B x C x E x E      (resize to 4E, two stride-2 convs)
    deep = patch_embed(x) + pos_embed            B x E x E x C
    for each stage (split at the global-attention blocks, ``dbsam_layout``):
        for each frozen block i of the stage:  deep = Adapter_i(Block_i(deep))
        deep, shallow = BilateralCrossAttention_stage(deep, shallow)
    fused = ViTConvFusion(deep, shallow)         B x E x E x C
    embedding = neck(fused)                      B x 256 x E x E

TinyViT (MobileSAM, LiteMedSAM): the convolutional stem and stage 0 run as they are;
in each attention stage every frozen block is followed by its adapter, the stage's
tokens (at the stage's grid and width: 128 x 128 x 128, 64 x 64 x 160, 64 x 64 x 320 for
a 1024 px MobileSAM input) meet the shallow features (320 x 64 x 64) in the stage's
cross-attention before its patch merging, and the last stage's output is fused with the
shallow features and goes through the neck.

Ablations (the paper's, in its direction): ``with_branch=False`` leaves out the
convolution branch, the cross-attention and the fusion (the adapters alone: the deep
features go to the neck); ``with_fusion=False`` keeps the branch and the cross-attention
but hands the last stage's deep features to the neck without the fusion (the shallow
features then reach the output through the cross-attention only, and the last
cross-attention has no shallow <- deep layer: nothing would read its output).
``parts`` names what is present.

Frozen: the whole given encoder (patch embedding, blocks, TinyViT's merging, the neck:
the paper freezes SAM's encoder; the public code's later variant fine-tunes the neck, not
done here). Trainable: adapters, convolution branch, cross-attention, fusion.

The frozen encoder is *shared* with the caller (the same module object, not a copy: a
ViT-H is 2.5 GB). That is safe because (1) the encoder's parameters must already be
frozen (``requires_grad`` False; refused otherwise), so no gradient or optimizer step
reaches them (``trainable_parameters()`` lists DB-SAM's blocks only); (2) ``train()``
keeps the encoder in eval mode, so TinyViT's batch norms never update their running
statistics and SAM's encoder stays deterministic. Weights and buffers of the encoder are
never written; moving this module (``to()``) moves the shared encoder with it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from segment_anything.modeling import ImageEncoderViT
from torch import nn
from torch.utils.checkpoint import checkpoint

from .dbsam_channel_attention import ChannelAttentionBlock
from .dbsam_conv_branch import ConvBranch
from .dbsam_cross_attention import BilateralCrossAttention
from .dbsam_fusion import ViTConvFusion
from .dbsam_parameters import DBSAMLayout
from .tiny_vit import TinyViT

#: The DB-SAM parts that train, by attribute name (the weights file's key prefixes).
TRAINABLE_PARTS = ("adapters", "conv_branch", "cross_attention", "fusion")


def dbsam_parts(*, with_branch: bool = True, with_fusion: bool = True) -> tuple[str, ...]:
    """The parts present in a DB-SAM encoder (``TRAINABLE_PARTS`` order): the full model,
    or an ablation without the fusion, or the adapters alone."""
    if with_fusion and not with_branch:
        raise ValueError("the fusion merges the convolution branch's features: it needs with_branch=True")
    if not with_branch:
        return ("adapters",)
    return TRAINABLE_PARTS if with_fusion else ("adapters", "conv_branch", "cross_attention")


def _family(encoder: nn.Module) -> str:
    if isinstance(encoder, ImageEncoderViT):
        return "vit"
    if isinstance(encoder, TinyViT):
        return "tiny_vit"
    raise TypeError(f"DB-SAM needs SAM's ViT or MobileSAM's TinyViT encoder, got {type(encoder).__name__}")


def _check_layout(encoder: nn.Module, family: str, layout: DBSAMLayout) -> None:
    problem = None
    if family == "vit":  # a plain ImageEncoderViT has no embedding_size attribute
        grid = encoder.img_size // encoder.patch_embed.proj.kernel_size[0]
    else:
        grid = encoder.embedding_size
    if grid != layout.grid_size:
        problem = f"embedding grid {grid} != {layout.grid_size}"
    elif family == "vit":
        dim = encoder.patch_embed.proj.out_channels
        blocks = [i for stage in layout.stages for i in stage.blocks]
        if blocks != list(range(len(encoder.blocks))):
            problem = f"{len(encoder.blocks)} blocks, the layout places adapters after {len(blocks)}"
        elif any(stage.dim != dim for stage in layout.stages) or layout.shallow_dim != dim:
            problem = f"width {dim} differs from the layout's"
    else:
        stages = encoder.layers[1:]
        if len(stages) != len(layout.stages):
            problem = f"{len(stages)} attention stages, the layout has {len(layout.stages)}"
        for layer, stage in zip(stages, layout.stages, strict=False):
            width = layer.blocks[0].attn.qkv.in_features
            if problem is None and (len(layer.blocks) != len(stage.blocks) or width != stage.dim):
                problem = (f"a stage of {len(layer.blocks)} blocks x {width} channels where the layout has "
                           f"{len(stage.blocks)} x {stage.dim}")
    if problem:
        raise ValueError(f"the encoder does not fit DB-SAM's layout for {layout.encoder!r}: {problem}")


class DBSAMEncoder(nn.Module):
    """DB-SAM's dual-branch encoder around a frozen SAM image encoder (see the module docstring).

    Arguments: image_encoder: ``TappedImageEncoderViT`` (any ``ImageEncoderViT``) or
    ``TinyViT``, all parameters frozen, shared not copied; layout: ``dbsam_layout(name)``
    of its registry name. Keyword-only hyper-parameters: adapter_drop_path (0.4),
    se_reduction (16), num_points (4), ffn_ratio (0.25), fusion_reduction (16); and
    checkpoint_stages: recompute each stage (its frozen blocks, adapters and
    cross-attention) in the backward pass (``torch.utils.checkpoint``, non-reentrant, RNG
    state preserved, so drop-path draws the same samples): less activation memory for
    training, same values and gradients. No effect without autograd. with_branch /
    with_fusion: False for the ablations (see the module docstring; ``dbsam_parts``).

    Attributes: encoder_name; layout; family ("vit" or "tiny_vit"); parts (the trainable
    parts present); adapters (per stage, per block), conv_branch, cross_attention (per
    stage), fusion (None when left out); encoder_weights_sha256
    (provenance of the frozen weights, None for random ones; written into weights files).

    forward(x: B x 3 x S x S, normalised and padded as the base encoder takes it;
    between_steps: called after the convolution branch and after each stage, a caller's
    chance to run other work or to stop the pass by raising)
      -> B x out_chans x E x E, the image embedding (out_chans 256), as SAM's encoder gives.
    """

    def __init__(self, image_encoder: nn.Module, layout: DBSAMLayout, *, adapter_drop_path: float = 0.4,
                 se_reduction: int = 16, num_points: int = 4, ffn_ratio: float = 0.25,
                 fusion_reduction: int = 16, checkpoint_stages: bool = False,
                 encoder_weights_sha256: str | None = None, with_branch: bool = True,
                 with_fusion: bool = True) -> None:
        super().__init__()
        self.family = _family(image_encoder)
        _check_layout(image_encoder, self.family, layout)
        trainable = [name for name, p in image_encoder.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"the encoder shared with DB-SAM must be frozen; {len(trainable)} parameters "
                             f"require gradients (first: {trainable[0]}); call requires_grad_(False) on it")
        self.parts = dbsam_parts(with_branch=with_branch, with_fusion=with_fusion)
        self.encoder_name = layout.encoder
        self.layout = layout
        self.hyper_parameters = {"adapter_drop_path": float(adapter_drop_path), "se_reduction": int(se_reduction),
                                 "num_points": int(num_points), "ffn_ratio": float(ffn_ratio),
                                 "fusion_reduction": int(fusion_reduction)}
        self.checkpoint_stages = bool(checkpoint_stages)
        self.encoder_weights_sha256 = encoder_weights_sha256
        self.image_encoder = image_encoder.eval()
        self.adapters = nn.ModuleList(
            nn.ModuleList(ChannelAttentionBlock(stage.dim, se_reduction=se_reduction, drop_path=adapter_drop_path)
                          for _ in stage.blocks)
            for stage in layout.stages
        )
        self.conv_branch = ConvBranch(layout.shallow_dim, layout.grid_size) if with_branch else None
        last = len(layout.stages) - 1
        self.cross_attention = nn.ModuleList(
            BilateralCrossAttention(stage.dim, layout.shallow_dim, deep_heads=stage.heads,
                                    shallow_heads=layout.shallow_heads, num_points=num_points, ffn_ratio=ffn_ratio,
                                    update_shallow=with_fusion or n < last)
            for n, stage in enumerate(layout.stages)
        ) if with_branch else None
        self.fusion = ViTConvFusion(layout.shallow_dim, reduction=fusion_reduction) if with_fusion else None

    # ---- parts ------------------------------------------------------------------------
    def trainable_modules(self) -> dict[str, nn.Module]:
        """DB-SAM's trainable parts present, by name (``parts``); the weights file holds these."""
        return {name: getattr(self, name) for name in self.parts}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.trainable_modules().values() for p in module.parameters()]

    def train(self, mode: bool = True) -> DBSAMEncoder:
        """Set DB-SAM's blocks to ``mode``; the shared frozen encoder always stays in eval mode."""
        super().train(mode)
        self.image_encoder.eval()
        return self

    # ---- forward ----------------------------------------------------------------------
    def _stage(self, index: int, deep: torch.Tensor, shallow: torch.Tensor | None,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One stage. ViT: deep B x E x E x C in and out; TinyViT: deep B x C x H x W in (the
        stage's input), B x C' x H' x W' out (after the stage's patch merging). shallow:
        None without the convolution branch."""
        if self.family == "vit":
            blocks = self.image_encoder.blocks
            for i, adapter in zip(self.layout.stages[index].blocks, self.adapters[index], strict=True):
                deep = adapter(blocks[i](deep))
            if self.cross_attention is None:
                return deep, shallow
            return self.cross_attention[index](deep, shallow)
        layer = self.image_encoder.layers[index + 1]
        b, c, h, w = deep.shape
        tokens = deep.flatten(2).transpose(1, 2)  # B x HW x C, row-major
        for block, adapter in zip(layer.blocks, self.adapters[index], strict=True):
            tokens = adapter(block(tokens, (h, w)).view(b, h, w, c)).reshape(b, h * w, c)
        deep = tokens.view(b, h, w, c)
        if self.cross_attention is not None:
            deep, shallow = self.cross_attention[index](deep, shallow)
        deep = deep.permute(0, 3, 1, 2)
        if layer.downsample is not None:
            deep = layer.downsample(deep)
        return deep, shallow

    def forward(self, x: torch.Tensor, *, between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        encoder = self.image_encoder
        shallow = self.conv_branch(x) if self.conv_branch is not None else None  # B x Cs x E x E
        if between_steps is not None:
            between_steps()
        if self.family == "vit":
            deep = encoder.patch_embed(x)  # B x E x E x C
            if encoder.pos_embed is not None:
                deep = deep + encoder.pos_embed
        else:
            deep = encoder.layers[0](encoder.patch_embed(x))  # B x C1 x H1 x W1
        for index in range(len(self.layout.stages)):
            if self.checkpoint_stages and torch.is_grad_enabled():
                deep, shallow = checkpoint(self._stage, index, deep, shallow, use_reentrant=False)
            else:
                deep, shallow = self._stage(index, deep, shallow)
            if between_steps is not None:
                between_steps()
        if self.family == "tiny_vit":
            deep = deep.permute(0, 2, 3, 1)
        if self.fusion is not None:
            deep = self.fusion(deep, shallow)  # B x E x E x Cs
        return encoder.neck(deep.permute(0, 3, 1, 2))
