"""A low-rank adapter around one frozen ``nn.Linear`` (LoRA, Hu et al.), as SAM-Mix puts
on the attention projections of SAM's image encoder."""

from __future__ import annotations

import math

import torch
from torch import nn


class LoRALinear(nn.Module):
    """``y = base(x) + (alpha / rank) * B(A(dropout(x)))``.

    base: the ``nn.Linear`` adapted (in_features -> out_features); its parameters are
      frozen here (``requires_grad`` False) and never changed by this module;
    rank: r, the adapter's inner width; alpha: the scale numerator (None: alpha = rank,
      scale 1, as SAMed's LoRA for SAM, which adds B(A(x)) unscaled);
    dropout: on the adapter's input only (0: none).

    Children: ``base``; ``lora_a`` = A, ``Linear(in, r, bias=False)``, initialised as
    ``nn.Linear`` is (Kaiming uniform, a = sqrt(5)); ``lora_b`` = B,
    ``Linear(r, out, bias=False)``, zero -- so a fresh adapter adds exactly zero and its
    output equals ``base``'s bit for bit.

    forward(x: ... x in_features) -> ... x out_features.
    """

    def __init__(self, base: nn.Linear, *, rank: int = 8, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear adapts an nn.Linear, got {type(base).__name__}")
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.rank = int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.base = base
        base.requires_grad_(False)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_a = nn.Linear(base.in_features, self.rank, bias=False, **factory)
        self.lora_b = nn.Linear(self.rank, base.out_features, bias=False, **factory)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        """out x in: (alpha / rank) * B @ A, the adapter as a change of ``base.weight``."""
        return (self.lora_b.weight @ self.lora_a.weight) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new ``nn.Linear`` with weight W + (alpha / rank) * B @ A and ``base``'s bias
        (copies: neither ``base`` nor the adapter is changed), frozen like ``base``. Its
        output equals this module's in eval mode up to float rounding."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"
