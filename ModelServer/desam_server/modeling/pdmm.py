"""PDMM, DeSAM's prompt-decoupled mask module.

A U-Net-like decoder of squeeze-and-excitation residual blocks. Its three encoder stages
read the intermediate encoder taps and depend only on the image; the fusion with PRIM's
mask embedding and the two up-blocks depend on the prompt. ``encode_image`` and
``decode`` split the module along that line so that a slice's image part is computed once
and reused for every prompt.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn


class SqueezeExcitation(nn.Module):
    """Global average pool, linear C -> C/r, ReLU, linear C/r -> C, sigmoid, scale."""

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, channels, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = x.mean(dim=(2, 3))
        weights = torch.sigmoid(self.fc2(torch.relu(self.fc1(weights))))
        return x * weights[:, :, None, None]


class SEResBlock(nn.Module):
    """conv3x3-IN-LeakyReLU-conv3x3-IN-SE plus residual, then LeakyReLU.

    Convolutions have no bias and InstanceNorm no affine parameters. The residual path
    is a 1x1 convolution + InstanceNorm only when the widths differ. B x in x H x W ->
    B x out x H x W.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm1 = nn.InstanceNorm2d(out_channels, affine=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.InstanceNorm2d(out_channels, affine=False)
        self.se = SqueezeExcitation(out_channels)
        self.act = nn.LeakyReLU(0.01)
        if in_channels != out_channels:
            self.residual = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.InstanceNorm2d(out_channels, affine=False),
            )
        else:
            self.residual = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(self.norm1(self.conv1(x)))
        out = self.se(self.norm2(self.conv2(out)))
        return self.act(out + self.residual(x))


class EncoderStage(nn.Module):
    """One tap -> one skip: an SE block to the stage width, then 2x up-steps.

    The number of up-steps brings the tap from its native resolution to the stage's
    target resolution (for ViT taps at 64 x 64: 0, 1 and 2 steps for stages 0, 1, 2).
    """

    def __init__(self, in_channels: int, width: int, up_steps: int) -> None:
        super().__init__()
        self.project = SEResBlock(in_channels, width)
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose2d(width, width, kernel_size=2, stride=2, bias=False),
                SEResBlock(width, width),
            )
            for _ in range(up_steps)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        for up in self.ups:
            x = up(x)
        return x


class UpBlock(nn.Module):
    """Transposed conv x2 (in -> out), concatenate the skip (out), SE block 2*out -> out."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2, bias=False)
        self.block = SEResBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat([self.up(x), skip], dim=1))


class PDMM(nn.Module):
    """Prompt-decoupled mask module.

    Keyword-only arguments:
      tap_channels: widths of the encoder taps, shallow to deep (ViT-H: 1280, 1280, 1280;
        TinyViT: 128, 160, 320).
      tap_sizes: spatial side of each tap, shallow to deep (ViT: 64, 64, 64; TinyViT:
        128, 64, 64).
      embedding_size: side E of the image embedding and of PRIM's mask embedding (64).
      embed_dim: width of PRIM's mask embedding (256).
      widths: stage widths (256, 128, 64): stage d works at E * 2**d.
      out_channels: output logit channels (1: one binary head per structure).
      fuse_mask_embedding: True (DeSAM, spec item 11): the fusion block reads PRIM's mask
        embedding concatenated with stage 0's output (embed_dim + widths[0] channels).
        False: the ablation "PDMM without PRIM's mask-embedding fusion": the fusion block
        reads stage 0's output only (widths[0] channels), so the mask does not depend on
        the prompt (PRIM then only scores prompts). Files of the two layouts differ.

    Stage d reads tap ``-(d + 1)``: stage 0 the deepest tap, stage 2 the shallowest.
    Output: B x out_channels x 4E x 4E logits (256 x 256 for E = 64). No interpolation.
    """

    def __init__(
        self,
        *,
        tap_channels: Sequence[int],
        tap_sizes: Sequence[int],
        embedding_size: int = 64,
        embed_dim: int = 256,
        widths: Sequence[int] = (256, 128, 64),
        out_channels: int = 1,
        fuse_mask_embedding: bool = True,
    ) -> None:
        super().__init__()
        if len(tap_channels) != 3 or len(tap_sizes) != 3 or len(widths) != 3:
            raise ValueError("PDMM takes exactly three taps and three stage widths")
        self.embedding_size = int(embedding_size)
        self.tap_sizes = tuple(int(s) for s in tap_sizes)
        stages = []
        for depth, width in enumerate(widths):
            tap = len(tap_channels) - 1 - depth
            target = self.embedding_size * 2**depth
            ratio = target / tap_sizes[tap]
            steps = round(math.log2(ratio)) if ratio >= 1 else -1
            if steps < 0 or 2**steps != ratio:
                raise ValueError(
                    f"tap {tap} of side {tap_sizes[tap]} cannot feed PDMM stage {depth} "
                    f"at side {target}: the ratio must be a power of two >= 1"
                )
            stages.append(EncoderStage(tap_channels[tap], width, steps))
        self.stages = nn.ModuleList(stages)
        self.fuse_mask_embedding = bool(fuse_mask_embedding)
        fusion_in = embed_dim + widths[0] if self.fuse_mask_embedding else widths[0]
        self.fusion = SEResBlock(fusion_in, widths[0])
        self.up1 = UpBlock(widths[0], widths[1])
        self.up2 = UpBlock(widths[1], widths[2])
        self.head = nn.Conv2d(widths[2], out_channels, kernel_size=1, bias=False)

    def encode_image(self, taps: Sequence[torch.Tensor], *,
                     between_steps: Callable[[], None] | None = None) -> list[torch.Tensor]:
        """The prompt-independent part: taps (shallow to deep) -> skips [E, 2E, 4E].
        between_steps: called before each stage (a caller's chance to run other work)."""
        if len(taps) != 3:
            raise ValueError(f"PDMM expects 3 taps, got {len(taps)}")
        for tap, side in zip(taps, self.tap_sizes, strict=True):
            if tap.shape[-1] != side or tap.shape[-2] != side:
                raise ValueError(f"tap of shape {tuple(tap.shape)} does not have side {side}")
        skips = []
        for depth, stage in enumerate(self.stages):
            if between_steps is not None:
                between_steps()
            skips.append(stage(taps[len(taps) - 1 - depth]))
        return skips

    def decode(self, mask_embedding: torch.Tensor, skips: Sequence[torch.Tensor], *,
               between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        """The prompt-dependent part.

        mask_embedding: B x embed_dim x E x E from PRIM (without fusion only its batch size
        is read); skips: from ``encode_image`` with batch 1 (shared by all prompts,
        broadcast here) or batch B. Returns B x out x 4E x 4E.
        between_steps: called before the fusion and each up-block (a caller's chance to run
        other work; the service serves clicks there during a batch job).
        """
        def step() -> None:
            if between_steps is not None:
                between_steps()

        batch = mask_embedding.shape[0]
        skips = [s.expand(batch, -1, -1, -1) if s.shape[0] == 1 else s for s in skips]
        step()
        if self.fuse_mask_embedding:
            x = self.fusion(torch.cat([mask_embedding, skips[0]], dim=1))
        else:
            x = self.fusion(skips[0])
        step()
        x = self.up1(x, skips[1])
        step()
        x = self.up2(x, skips[2])
        return self.head(x)

    def forward(self, mask_embedding: torch.Tensor, taps: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.decode(mask_embedding, self.encode_image(taps))
