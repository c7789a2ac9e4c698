"""The upscaling half of SAM's mask decoder for inference (see ``decoder_fast``).

SAM's upscaling starts with a 2 x 2 stride-2 transposed convolution, a linear map W
(C x 4 C', 256 x 256) of each image token that leaves the two-way transformer. Those
tokens are the output of the last block's layer norm, and every block's image side is

    pre_k = x_k + P_k U_k                (the image-to-token attention: P_k L x K, K ~ 60)
    x_{k+1} = LN_k(pre_k) = rstd_k * (pre_k - mean_k) * g_k + beta_k   (per row, per column)

so with one prompt and the slice's bare tokens x_1 cached, ``LN_N(pre_N) W`` unrolls into
``x_1 M_1`` (M_1 = diag(g_1 ... g_N) W: the same for every prompt on the slice, kept in
its state) plus products with the K columns of each block and per-row scalars:

    LN_N(pre_N) W + b = S * (x_1 M_1 + Q R) + b   with S = prod_k rstd_k per row,

where Q stacks, per block, P_k / S_k, -mean_k / S_k and 1 / S_{k+1} (S_k the product of the
earlier blocks' rstd) and R the matching rows U_k M_k, 1^T M_k, beta_k M_{k+1}. One
product with ~120 columns replaces the 256-column projection of 4,096 tokens. The layer
norms' statistics come from ``torch.native_layer_norm``, which the transformer runs anyway.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder
from torch import Tensor

from .decoder_state import BlockProjection, TransformerSliceCache, UpscaleProjection

__all__ = ["BlockFactors", "upscale_projection", "projected_tokens", "upscaled_masks"]


def _conv_weights(conv: torch.nn.ConvTranspose2d) -> tuple[Tensor, Tensor]:
    """A 2 x 2 stride-2 transposed convolution as a matrix: C_in x (a, b, C_out), and its
    bias repeated per output position."""
    return conv.weight.permute(0, 2, 3, 1).reshape(conv.in_channels, -1), conv.bias.repeat(4)


@torch.no_grad()
def upscale_projection(decoder: MaskDecoder) -> UpscaleProjection:
    """The decoder's first upscaling layer as a matrix and, per transformer block k,
    M_k = diag(g_k ... g_N) W, its column sums and beta_k M_{k+1} (M_{N+1} = W, plus the
    bias for the last block)."""
    weight, bias = _conv_weights(decoder.output_upscaling[0])
    norms = [layer.norm4 for layer in decoder.transformer.layers]
    if not all(isinstance(n, torch.nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms):
        return UpscaleProjection(weight=weight, bias=bias, blocks=None)
    blocks: list[BlockProjection] = []
    after = weight
    for k in reversed(range(len(norms))):
        m = norms[k].weight[:, None] * after
        offset = norms[k].bias @ after
        blocks.insert(0, BlockProjection(m=m, column_sums=m.sum(0),
                                         offset=offset + bias if k == len(norms) - 1 else offset))
        after = m
    return UpscaleProjection(weight=weight, bias=bias, blocks=tuple(blocks))


@dataclass(frozen=True)
class BlockFactors:
    """One block's image side for one prompt: ``pre = x + p @ u`` (p L x K, u K x C) and
    the statistics of its layer norm over ``pre`` (mean, rstd: L x 1)."""

    p: Tensor
    u: Tensor
    mean: Tensor
    rstd: Tensor


def projected_tokens(bare: Tensor, projection: UpscaleProjection, blocks: list[BlockFactors],
                     cache: TransformerSliceCache) -> Tensor:
    """``LN_N(pre_N) W + b`` (L x N) for one prompt from the slice's bare image tokens
    ``bare`` (L x C) and each block's factors; x_1 M_1 is kept in ``cache.first_layer``."""
    assert projection.blocks is not None
    if cache.first_layer is None:
        cache.first_layer = bare @ projection.blocks[0].m
    cols, rows, scale = [], [], None
    for block, factors in zip(projection.blocks, blocks, strict=True):
        p, mean, rstd = factors.p, factors.mean, factors.rstd
        cols += [p if scale is None else p / scale, -mean if scale is None else -mean / scale]
        rows += [factors.u @ block.m, block.column_sums[None]]
        scale = rstd if scale is None else scale * rstd
        cols.append(1 / scale)
        rows.append(block.offset[None])
    return torch.addmm(cache.first_layer, torch.cat(cols, dim=1), torch.cat(rows)).mul_(scale)


def upscaled_masks(decoder: MaskDecoder, projection: UpscaleProjection, keys: Tensor, hyper: Tensor, side: int,
                   rows: int = 1024, projected: Tensor | None = None) -> Tensor:
    """``hyper @ output_upscaling(keys as B x C x E x E)`` -> B x M x 4E x 4E.

    A 2 x 2 stride-2 transposed convolution maps each input pixel to its own 2 x 2 output
    block, so channels-last it is one matrix product per layer, and ``rows`` input pixels
    at a time keep the intermediates (16x the input) in the CPU's cache (~10% faster than
    whole). The hypernetwork product is taken in that scrambled pixel order and the
    (small) masks are reordered once. projection: ``upscale_projection(decoder)``;
    projected: the first layer's output (B x L x N, ``projected_tokens``) when known."""
    _, norm, act1, conv2, act2 = decoder.output_upscaling
    b, length, _ = keys.shape
    w1, bias1 = projection.weight, projection.bias
    w2, bias2 = _conv_weights(conv2)
    o1, m = conv2.in_channels, hyper.shape[1]
    masks = keys.new_empty(b, m, 16 * length)
    for i in range(b):
        for start in range(0, length, rows):
            if projected is None:
                y = torch.addmm(bias1, keys[i, start : start + rows], w1).view(-1, o1)
            else:
                y = projected[i, start : start + rows].reshape(-1, o1)
            y = act1(F.layer_norm(y, (o1,), norm.weight, norm.bias, norm.eps))
            z = act2(torch.addmm(bias2, y, w2)).view(-1, conv2.out_channels)
            masks[i, :, 16 * start : 16 * (start + rows)] = hyper[i] @ z.T
    # 2-D index_select: on a 3-D tensor along its last axis it is ~15x slower on CPU.
    return masks.view(b * m, -1).index_select(1, _pixel_order(side, keys.device)).view(b, m, 4 * side, 4 * side)


@functools.lru_cache(maxsize=8)
def _pixel_order(side: int, device: torch.device) -> Tensor:
    """Row-major output pixel (Y, X) of the two stacked 2 x 2 stride-2 upsamplings ->
    its position in the channels-last product order (y, x, a, b, a2, b2), where
    Y = 4y + 2a + a2 and X = 4x + 2b + b2."""
    order = torch.arange(16 * side * side).view(side, side, 2, 2, 2, 2).permute(0, 2, 4, 1, 3, 5)
    return order.reshape(-1).to(device)
