"""DB-SAM's bilateral cross-attention, placed after each stage of the ViT branch.

Two deformable cross-attention layers (``deformable_attention.py``) exchange information
between the branches:
  deep <- shallow: the ViT tokens are the queries, the convolution features the keys/values;
  shallow <- deep: the reverse.
Both read the stage's input features (the two directions run side by side). Each is

    x = q + DeformAttn(LN_q(q), reference points = q's pixel centres, LN_v(v))
    x = x + FFN(LN(x))                                   (FFN: Linear, GELU, Linear)

and the updated deep features continue through the next frozen ViT blocks, the updated
shallow ones into the next stage's cross-attention.

Choices where the paper is silent (docs/DBSAM.md): pre-norm residuals (LN on the query,
the value and before the FFN); 4 sampling points per head and level; one level per
direction (each branch has one map); FFN hidden width 0.25 x the query width;
drop-path off by default.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops import stochastic_depth

from .deformable_attention import MultiScaleDeformableAttention, grid_reference_points


class DeformableCrossAttentionLayer(nn.Module):
    """One direction: queries attend to another map, then an FFN; both residual.

    Arguments: query_dim, value_dim. Keyword-only: num_heads, num_points, ffn_ratio,
    drop_path (stochastic depth of both residual branches, training only).

    forward(query: B x Hq x Wq x Cq, value: B x Hv x Wv x Cv, channels-last) -> B x Hq x Wq x Cq.
    """

    def __init__(self, query_dim: int, value_dim: int, *, num_heads: int, num_points: int = 4,
                 ffn_ratio: float = 0.25, drop_path: float = 0.0) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(query_dim)
        self.value_norm = nn.LayerNorm(value_dim)
        self.attn = MultiScaleDeformableAttention(query_dim, num_heads=num_heads, num_levels=1,
                                                  num_points=num_points, value_dim=value_dim)
        hidden = max(1, int(query_dim * ffn_ratio))
        self.ffn_norm = nn.LayerNorm(query_dim)
        self.ffn = nn.Sequential(nn.Linear(query_dim, hidden), nn.GELU(), nn.Linear(hidden, query_dim))
        self.drop_path = float(drop_path)

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        b, hq, wq, cq = query.shape
        _, hv, wv, cv = value.shape
        q = query.reshape(b, hq * wq, cq)
        ref = grid_reference_points(hq, wq, device=query.device, dtype=query.dtype).expand(b, -1, -1)
        attended = self.attn(self.query_norm(q), ref, self.value_norm(value.reshape(b, hv * wv, cv)), [(hv, wv)])
        x = q + stochastic_depth(attended, self.drop_path, "row", self.training)
        x = x + stochastic_depth(self.ffn(self.ffn_norm(x)), self.drop_path, "row", self.training)
        return x.view(b, hq, wq, cq)


class BilateralCrossAttention(nn.Module):
    """DB-SAM's bilateral cross-attention block.

    Arguments: deep_dim (ViT width at this stage), shallow_dim (convolution-branch width).
    Keyword-only: deep_heads, shallow_heads (heads of the layer whose queries are deep /
    shallow), num_points, ffn_ratio, drop_path; update_shallow: False leaves the
    shallow <- deep layer out and returns the shallow features unchanged (the last stage
    of the ablation without fusion, where nothing reads them afterwards).

    forward(deep: B x Hd x Wd x Cd (ViT tokens, channels-last, as SAM's blocks pass them),
      shallow: B x Cs x Hs x Ws (convolution features, channels-first))
      -> (deep': B x Hd x Wd x Cd, shallow': B x Cs x Hs x Ws); the grids may differ
      (TinyViT's first attention stage runs at twice the shallow grid).
    """

    def __init__(self, deep_dim: int, shallow_dim: int, *, deep_heads: int, shallow_heads: int,
                 num_points: int = 4, ffn_ratio: float = 0.25, drop_path: float = 0.0,
                 update_shallow: bool = True) -> None:
        super().__init__()
        self.deep_from_shallow = DeformableCrossAttentionLayer(
            deep_dim, shallow_dim, num_heads=deep_heads, num_points=num_points,
            ffn_ratio=ffn_ratio, drop_path=drop_path)
        self.shallow_from_deep = DeformableCrossAttentionLayer(
            shallow_dim, deep_dim, num_heads=shallow_heads, num_points=num_points,
            ffn_ratio=ffn_ratio, drop_path=drop_path) if update_shallow else None

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shallow_last = shallow.permute(0, 2, 3, 1)
        new_deep = self.deep_from_shallow(deep, shallow_last)
        if self.shallow_from_deep is None:
            return new_deep, shallow
        new_shallow = self.shallow_from_deep(shallow_last, deep)
        return new_deep, new_shallow.permute(0, 3, 1, 2)
