"""SAM's logit postprocessing (bilinear low -> S, crop, bilinear -> the slice's size) as
one matrix per axis, applied band by band.

Bilinear resizing is linear and separable, so the chain folds into an out x low matrix
per axis (``resize_chain``). Each output row of it has at most a few nonzero weights, and
they move steadily along the input: the rows are grouped in blocks whose nonzeros share a
narrow window of the input (``Band``), so a resize is one gather of those windows and one
batched product with the blocks (~3x fewer operations than the dense product for a
256 x 256 slice, the same weights and sums without the zero terms).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Band", "resize_band", "resize_chain"]

#: Cost of one more block, in multiply-adds per input column (call overhead), when
#: choosing the block size.
BLOCK_COST = 1024


def _bilinear_matrix(n_in: int, n_out: int) -> Tensor:
    """n_out x n_in weights of ``F.interpolate(..., mode='bilinear', align_corners=False)``
    along one axis (no antialiasing)."""
    # Source coordinates in float32, as ATen computes them (bit-for-bit weights).
    dst = torch.arange(n_out, dtype=torch.float32)
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = (src - i0).double()
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m


@functools.lru_cache(maxsize=64)
def _resize_chain_cpu(low: int, side: int, crop: int, out: int) -> Tensor:
    up = _bilinear_matrix(low, side)[:crop]            # L -> S, keep the unpadded part
    return (_bilinear_matrix(crop, out) @ up).float()   # -> the original size


def resize_chain(low: int, side: int, crop: int, out: int, device: torch.device) -> Tensor:
    """out x low matrix: bilinear low -> side, first ``crop`` entries, bilinear -> out."""
    return _resize_chain_cpu(int(low), int(side), int(crop), int(out)).to(device)


@dataclass(frozen=True)
class Band:
    """An out x low matrix as blocks of ``bs`` output rows: ``blocks`` (nb x bs x width)
    holds each block's window of input rows ``index`` (nb * width, consecutive per block);
    every nonzero of the matrix lies in its block's window. The last block is padded with
    zero rows, cut off after the product."""

    index: Tensor
    blocks: Tensor
    out: int

    @classmethod
    def of(cls, matrix: Tensor) -> Band:
        out, low = matrix.shape
        nonzero = matrix != 0
        best = None
        for bs in (8, 16, 32, 64, 128, 256):
            nb = math.ceil(out / bs)
            windows = []
            for j in range(nb):
                cols = torch.nonzero(nonzero[j * bs : (j + 1) * bs].any(0)).flatten()
                windows.append((int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1))
            width = max(c1 - c0 for c0, c1 in windows)
            cost = nb * (bs * width + BLOCK_COST)
            if best is None or cost < best[0]:
                best = (cost, bs, width, [min(c0, low - width) for c0, _ in windows])
            if bs >= out:
                break
        _, bs, width, starts = best
        padded = torch.zeros(len(starts) * bs, low, dtype=matrix.dtype)
        padded[:out] = matrix
        blocks = torch.stack([padded[j * bs : (j + 1) * bs, s : s + width] for j, s in enumerate(starts)])
        index = (torch.tensor(starts)[:, None] + torch.arange(width)).flatten()
        return cls(index, blocks.contiguous(), out)

    def to(self, device: torch.device) -> Band:
        if self.blocks.device == device:
            return self
        return Band(self.index.to(device), self.blocks.to(device), self.out)

    def apply(self, x: Tensor) -> Tensor:
        """``matrix @ x`` for x: N x low x W (any strides) -> N x out x W."""
        nb, bs, width = self.blocks.shape
        n, _, w = x.shape
        windows = x.index_select(1, self.index).view(n, nb, width, w)
        return (self.blocks @ windows).view(n, nb * bs, w)[:, : self.out]


@functools.lru_cache(maxsize=64)
def _resize_band_cpu(low: int, side: int, crop: int, out: int) -> Band:
    return Band.of(_resize_chain_cpu(low, side, crop, out))


def resize_band(low: int, side: int, crop: int, out: int, device: torch.device) -> Band:
    """``resize_chain(...)`` as a ``Band``."""
    return _resize_band_cpu(int(low), int(side), int(crop), int(out)).to(torch.device(device))
