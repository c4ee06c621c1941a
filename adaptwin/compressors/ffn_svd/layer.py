"""`LowRankLinear`: y = (x·Uᵀ)·Vᵀ + b with U = [Σ½V_rᵀ; A_l] and V = [U_rΣ½, B_l]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankLinear(nn.Module):
    """A linear layer factored through ``rank + lora_rank`` dimensions.

    ``in_factor`` (k, in) and ``out_factor`` (out, k), k = rank + lora_rank; the first ``rank`` of the
    k directions are the SVD's, the last ``lora_rank`` are LoRA's (the fine-tuner reads the split).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, lora_rank: int = 0, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.lora_rank = rank, lora_rank
        k = rank + lora_rank
        self.in_factor = nn.Parameter(torch.empty(k, in_features))
        self.out_factor = nn.Parameter(torch.empty(out_features, k))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., in) -> (..., k) -> (..., out); two GEMMs, never the dense out×in weight
        return F.linear(F.linear(x, self.in_factor), self.out_factor, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"lora_rank={self.lora_rank}, bias={self.bias is not None}")
