"""Building blocks of the TinyViT image encoder (MobileSAM / LiteMedSAM).

The module and parameter names (``c``/``bn``, ``conv1..3``, ``attn.norm``, ``attn.qkv``,
``attn.proj``, ``attn.attention_biases``, ``local_conv``, ``mlp.norm``, ``mlp.fc1``,
``mlp.fc2``) are those of the published checkpoints, so their state dicts load strictly.

Layout conventions: convolutional parts work channels-first (B x C x H x W); the
attention and MLP parts work on token sequences (B x L x C, L = H * W, row-major).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def step(between_steps: Callable[[], None] | None) -> None:
    """Call the encoder caller's ``between_steps``, if any (see ``TinyViT.forward``)."""
    if between_steps is not None:
        between_steps()


class Conv2dBN(nn.Module):
    """Bias-free ``Conv2d`` (child ``c``) followed by ``BatchNorm2d`` (child ``bn``).

    forward(x: B x in_chans x H x W) -> B x out_chans x H' x W'.
    """

    def __init__(self, in_chans: int, out_chans: int, kernel_size: int = 1, *, stride: int = 1,
                 padding: int = 0, groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(in_chans, out_chans, kernel_size, stride=stride, padding=padding,
                           groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.c(x))


class PatchEmbed(nn.Module):
    """Two-convolution stem: ``seq = [Conv2dBN(in, embed/2), GELU, Conv2dBN(embed/2, embed)]``.

    With ``kernel_size`` 3 each convolution has stride 2 and padding 1 (B x 3 x 1024 x 1024
    -> B x embed x 256 x 256, MobileSAM); with ``kernel_size`` 1 the convolutions are
    pointwise with stride 1 (B x 3 x 256 x 256 -> B x embed x 256 x 256, LiteMedSAM).
    """

    def __init__(self, in_chans: int, embed_dim: int, kernel_size: int) -> None:
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"patch_embed_kernel must be a positive odd number, got {kernel_size}")
        self.stride = 2 if kernel_size > 1 else 1
        pad = kernel_size // 2
        mid = embed_dim // 2
        self.seq = nn.Sequential(
            Conv2dBN(in_chans, mid, kernel_size, stride=self.stride, padding=pad),
            nn.GELU(),
            Conv2dBN(mid, embed_dim, kernel_size, stride=self.stride, padding=pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, GELU, 3x3 depthwise, GELU, 1x1 project,
    residual add, GELU. forward(x: B x C x H x W) -> B x C x H x W.

    The projection's BatchNorm scale starts at zero, so a freshly built block is the
    identity followed by GELU (the usual zero-init of residual branches).
    """

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = Conv2dBN(dim, hidden, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(hidden, hidden, 3, padding=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(hidden, dim, 1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.conv1(x))
        y = self.act2(self.conv2(y))
        return self.act3(x + self.conv3(y))


class PatchMerging(nn.Module):
    """1x1 conv (dim -> out_dim), GELU, 3x3 depthwise conv with ``stride``, GELU, 1x1 conv.

    forward(x: B x dim x H x W) -> B x out_dim x ceil(H / stride) x ceil(W / stride).
    """

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = Conv2dBN(dim, out_dim, 1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2dBN(out_dim, out_dim, 3, stride=stride, padding=1, groups=out_dim)
        self.act2 = nn.GELU()
        self.conv3 = Conv2dBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.conv1(x))
        x = self.act2(self.conv2(x))
        return self.conv3(x)


def relative_offset_index(window_size: int) -> torch.Tensor:
    """(T x T) int64 index into the bias table, T = window_size ** 2 (row-major points).

    The checkpoints number the distinct offsets (|dy|, |dx|) in order of first appearance
    when enumerating all point pairs (p1, p2) row-major with p1 outer. The first outer
    point is (0, 0), whose inner loop meets every offset (dy, dx) in [0, window)^2 exactly
    once in row-major order, so that numbering is |dy| * window + |dx|.
    """
    coords = torch.arange(window_size)
    ys = coords.repeat_interleave(window_size)  # row of each point, row-major
    xs = coords.repeat(window_size)              # column of each point
    dy = (ys[:, None] - ys[None, :]).abs()
    dx = (xs[:, None] - xs[None, :]).abs()
    return dy * window_size + dx


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention within one window, with a learned bias per head
    and per (|dy|, |dx|) offset.

    forward(x: N x T x C, T = window_size ** 2 tokens in row-major order) -> N x T x C.

    ``qkv`` produces, for each head in turn, that head's query, key and value
    (each ``key_dim = C // num_heads`` wide) -- the checkpoints' layout. The (heads x T x T)
    bias is gathered from the table on every call (at most 5 x 196 x 196 values), so nothing
    derived from the weights is kept.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim ** -0.5
        self.window_size = window_size
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer("attention_bias_idxs", relative_offset_index(window_size), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """The gathered bias, heads x T x T."""
        return self.attention_biases[:, self.attention_bias_idxs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        x = self.norm(x)
        qkv = self.qkv(x).view(n, t, self.num_heads, 3 * self.key_dim).permute(0, 2, 1, 3)
        q, k, v = qkv.split(self.key_dim, dim=-1)  # each N x heads x T x key_dim
        bias = self.attention_bias().to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class Mlp(nn.Module):
    """Pre-norm MLP: LayerNorm, Linear (dim -> hidden), GELU, Linear (hidden -> dim).
    forward(x: ... x dim) -> ... x dim."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """B x Hp x Wp x C (Hp, Wp multiples of ``window``) -> (B * nH * nW) x window^2 x C."""
    b, hp, wp, c = x.shape
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_unpartition(x: torch.Tensor, window: int, b: int, hp: int, wp: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nH * nW) x window^2 x C -> B x Hp x Wp x C."""
    c = x.shape[-1]
    x = x.view(b, hp // window, wp // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)


class TinyViTBlock(nn.Module):
    """Windowed attention (residual), 3x3 depthwise ``local_conv`` on the token grid, MLP
    (residual).

    forward(x: B x L x C, hw=(H, W), L = H * W) -> B x L x C.

    A grid whose sides are not multiples of the window is zero-padded at the bottom and
    right *before* the attention's LayerNorm, so padded tokens take part as keys (as in the
    checkpoints' training); outputs at padded positions are dropped. A grid of exactly one
    window is attended as a whole.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads, window_size)
        self.local_conv = Conv2dBN(dim, dim, local_conv_size, padding=local_conv_size // 2, groups=dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def _windowed_attention(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        ws = self.window_size
        if h == ws and w == ws:
            return self.attn(x)
        b, _, c = x.shape
        grid = x.reshape(b, h, w, c)
        pad_b, pad_r = (-h) % ws, (-w) % ws
        if pad_b or pad_r:
            grid = F.pad(grid, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = h + pad_b, w + pad_r
        out = window_unpartition(self.attn(window_partition(grid, ws)), ws, b, hp, wp)
        return out[:, :h, :w, :].reshape(b, h * w, c)

    def forward(self, x: torch.Tensor, hw: tuple[int, int],
                between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        h, w = hw
        b, length, c = x.shape
        if length != h * w:
            raise ValueError(f"{length} tokens do not form a {h} x {w} grid")
        step(between_steps)
        x = x + self._windowed_attention(x, h, w)
        step(between_steps)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        step(between_steps)
        return x + self.mlp(x)


class ConvStage(nn.Module):
    """Stage of MBConv blocks, then optional patch merging.
    forward(x: B x C x H x W) -> B x C' x H' x W'."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        for block in self.blocks:
            step(between_steps)
            x = block(x)
        step(between_steps)
        return x if self.downsample is None else self.downsample(x)


class AttentionStage(nn.Module):
    """Stage of TinyViT blocks, then optional patch merging.
    forward(x: B x C x H x W) -> B x C' x H' x W' (tokens B x L x C inside)."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int, mlp_ratio: float,
                 local_conv_size: int, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window_size, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor, between_steps: Callable[[], None] | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, (h, w), between_steps)
        x = tokens.transpose(1, 2).reshape(b, c, h, w)
        step(between_steps)
        return x if self.downsample is None else self.downsample(x)
