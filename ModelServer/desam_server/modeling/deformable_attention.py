"""Multi-scale deformable attention (Zhu et al., Deformable DETR) in plain PyTorch.

For each query q (with reference point p_q), head m, level l and sampling point k:

    offset  Δp_mlqk = Linear_offsets(z_q)           (in pixels of level l)
    weight  A_mlqk  = softmax over (l, k) of Linear_weights(z_q)
    out_q = W_o [ concat over m of  sum_{l,k} A_mlqk · V_ml(p_q + Δp_mlqk / (W_l, H_l)) ]

V_ml is head m's slice of Linear_value(x) on level l, sampled bilinearly with
``torch.nn.functional.grid_sample`` (zeros outside the map, ``align_corners=False``), so
it runs on CPU and GPU without the compiled operator of the reference implementation.

Frames: reference points and sampling locations are normalised (x, y) in [0, 1] over
each level, (0, 0) the top-left corner of the top-left pixel; a pixel (i, j) of a level
of size H x W has its centre at ((j + 0.5) / W, (i + 0.5) / H).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def sample_levels(values: Sequence[torch.Tensor], locations: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of bilinear samples, per head.

    values: per level, (B*M) x D x H_l x W_l (D: channels per head);
    locations: B x Nq x M x L x K x 2, normalised (x, y) as in the module docstring;
    weights: B x Nq x M x L x K.
    Returns B x Nq x (M*D).
    """
    b, nq, m, n_levels, k, _ = locations.shape
    grids = 2.0 * locations - 1.0  # grid_sample's frame: -1 and 1 are the outer edges
    out = None
    for level, value in enumerate(values):
        grid = grids[:, :, :, level].permute(0, 2, 1, 3, 4).reshape(b * m, nq, k, 2)
        sampled = F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # sampled: (B*M) x D x Nq x K
        w = weights[:, :, :, level].permute(0, 2, 1, 3).reshape(b * m, 1, nq, k)
        term = (sampled * w).sum(dim=-1)  # (B*M) x D x Nq
        out = term if out is None else out + term
    d = out.shape[1]
    return out.view(b, m, d, nq).permute(0, 3, 1, 2).reshape(b, nq, m * d)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention.

    Arguments: embed_dim: width of queries and output. Keyword-only: num_heads (M),
    num_levels (L), num_points (K, per head and level), value_dim: width of the value
    features (default embed_dim; the value projection maps it to embed_dim).

    forward(query: B x Nq x embed_dim, reference_points: B x Nq x L x 2 or B x Nq x 2
      (normalised (x, y), the same point on every level when 2-D),
      value: B x Nv x value_dim, the levels' pixels concatenated row-major level after level,
      spatial_shapes: ((H_0, W_0), ..., (H_{L-1}, W_{L-1})), sum of H_l W_l == Nv)
      -> B x Nq x embed_dim.

    Initialisation as Deformable DETR: zero offset weights, offset biases pointing each
    head in its own direction at distances 1..K pixels, zero attention-weight projection
    (uniform weights), Xavier value and output projections.
    """

    def __init__(self, embed_dim: int, *, num_heads: int = 8, num_levels: int = 1, num_points: int = 4,
                 value_dim: int | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(value_dim or embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        scale = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * scale[None, None, :, None]
        bias = bias.expand(self.num_heads, self.num_levels, self.num_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, value: torch.Tensor,
                spatial_shapes: Sequence[tuple[int, int]]) -> torch.Tensor:
        b, nq, _ = query.shape
        m, n_levels, k = self.num_heads, self.num_levels, self.num_points
        shapes = [(int(h), int(w)) for h, w in spatial_shapes]
        if len(shapes) != n_levels:
            raise ValueError(f"{len(shapes)} spatial shapes given for {n_levels} levels")
        if sum(h * w for h, w in shapes) != value.shape[1]:
            raise ValueError(f"spatial shapes {shapes} do not cover the {value.shape[1]} values")
        if reference_points.dim() == 3:
            reference_points = reference_points[:, :, None, :].expand(b, nq, n_levels, 2)
        d = self.embed_dim // m
        projected = self.value_proj(value)  # B x Nv x C
        levels = []
        start = 0
        for h, w in shapes:
            level = projected[:, start:start + h * w].view(b, h, w, m, d)
            levels.append(level.permute(0, 3, 4, 1, 2).reshape(b * m, d, h, w))
            start += h * w
        offsets = self.sampling_offsets(query).view(b, nq, m, n_levels, k, 2)
        sizes = torch.tensor([[w, h] for h, w in shapes], dtype=offsets.dtype, device=offsets.device)
        locations = reference_points[:, :, None, :, None, :] + offsets / sizes[None, None, None, :, None, :]
        weights = self.attention_weights(query).view(b, nq, m, n_levels * k).softmax(dim=-1)
        weights = weights.view(b, nq, m, n_levels, k)
        return self.output_proj(sample_levels(levels, locations, weights))


def grid_reference_points(height: int, width: int, *, device: torch.device | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel centres of an H x W map as normalised (x, y) reference points: (H*W) x 2, row-major."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)
